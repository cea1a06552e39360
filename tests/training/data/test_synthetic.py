"""The synthetic generator: determinism, DICOM validity, label format, and the shared preprocessing path."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pydicom
import pytest

from service.inference.preprocess import PreprocessSpec, preprocess_dataset
from training.data.formats import load_generic, read_image_dataset
from training.data.synthetic import CT_LABELS, CXR_LABELS, MANUFACTURER, generate_ct, generate_cxr


def _rows(labels_csv: Path) -> list[dict[str, str]]:
    with labels_csv.open(newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def _pixels(folder: Path) -> dict[str, bytes]:
    return {
        p.relative_to(folder).as_posix(): pydicom.dcmread(p).PixelData for p in sorted(folder.rglob("*.dcm"))
    }


@pytest.fixture(scope="module")
def cxr_set(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("cxr")
    generate_cxr(out, 12, seed=7)
    return out


@pytest.fixture(scope="module")
def ct_set(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ct")
    generate_ct(out, 4, seed=7)
    return out


class TestDeterminism:
    def test_same_seed_same_labels_and_pixels(self, cxr_set: Path, tmp_path: Path) -> None:
        again = tmp_path / "again"
        generate_cxr(again, 12, seed=7)
        assert (again / "labels.csv").read_bytes() == (cxr_set / "labels.csv").read_bytes()
        assert _pixels(again) == _pixels(cxr_set)

    def test_ct_same_seed_same_output(self, ct_set: Path, tmp_path: Path) -> None:
        again = tmp_path / "again"
        generate_ct(again, 4, seed=7)
        assert (again / "labels.csv").read_bytes() == (ct_set / "labels.csv").read_bytes()
        assert _pixels(again) == _pixels(ct_set)

    def test_other_seed_differs(self, cxr_set: Path, tmp_path: Path) -> None:
        other = tmp_path / "other"
        generate_cxr(other, 12, seed=8)
        assert (other / "labels.csv").read_bytes() != (cxr_set / "labels.csv").read_bytes()

    def test_output_does_not_depend_on_worker_count(self, tmp_path: Path) -> None:
        one, two = tmp_path / "one", tmp_path / "two"
        generate_cxr(one, 3, seed=5, workers=1)
        generate_cxr(two, 3, seed=5, workers=2)
        assert (one / "labels.csv").read_bytes() == (two / "labels.csv").read_bytes()
        assert _pixels(one) == _pixels(two)


class TestChestRadiographs:
    def test_labels_csv_is_generic_format(self, cxr_set: Path) -> None:
        rows = _rows(cxr_set / "labels.csv")
        assert len(rows) >= 12  # one or two studies per patient
        for row in rows:
            assert (cxr_set / row["file"]).is_file()
            assert {row[label] for label in CXR_LABELS} <= {"0", "1"}
            boxes = json.loads(row["boxes"])
            assert (row["nodule"] == "1") == bool(boxes)
            assert all(b["label"] == "nodule" and b["x1"] > b["x0"] and b["y1"] > b["y0"] for b in boxes)

    def test_dicom_attributes(self, cxr_set: Path) -> None:
        seen_classes, seen_photometric = set(), set()
        for path in sorted(cxr_set.rglob("*.dcm")):
            ds = pydicom.dcmread(path)
            assert (
                ds.preamble is not None
                and ds.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
            )
            assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
            assert ds.PatientID.startswith("SYN") and ds.Manufacturer == MANUFACTURER
            assert ds.BodyPartExamined == "CHEST" and ds.ViewPosition in ("PA", "AP")
            assert (ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.SamplesPerPixel) == (16, 12, 11, 1)
            assert ds.pixel_array.max() < 4096 and len(ds.ImagerPixelSpacing) == 2
            if ds.Modality == "DX":
                assert ds.PresentationIntentType == "FOR PRESENTATION"
                assert ds.PresentationLUTShape == (
                    "INVERSE" if ds.PhotometricInterpretation == "MONOCHROME1" else "IDENTITY"
                )
            seen_classes.add(ds.SOPClassUID)
            seen_photometric.add(ds.PhotometricInterpretation)
        assert seen_classes == {"1.2.840.10008.5.1.4.1.1.1", "1.2.840.10008.5.1.4.1.1.1.1"}
        assert seen_photometric == {"MONOCHROME1", "MONOCHROME2"}

    def test_monochrome1_renders_like_monochrome2(self, cxr_set: Path) -> None:
        """After the shared pipeline inverts MONOCHROME1, lungs are dark and the mediastinum bright."""
        spec = PreprocessSpec(height=128, width=128)
        for record in load_generic(cxr_set):
            image = preprocess_dataset(read_image_dataset(record.path), spec).array[0, 0]
            centre, lateral = image[40:90, 60:68].mean(), image[40:90, 30:40].mean()
            assert centre > lateral + 0.1, record.extra["info_photometric"]

    def test_patients_have_several_studies(self, cxr_set: Path) -> None:
        records = load_generic(cxr_set)
        per_patient: dict[str, set[str]] = {}
        for record in records:
            per_patient.setdefault(record.patient_id, set()).add(record.study_uid)
        assert len(per_patient) == 12
        assert max(len(studies) for studies in per_patient.values()) == 2


class TestHeadCt:
    def test_series_loads_with_slice_order_and_hu(self, ct_set: Path) -> None:
        records = load_generic(ct_set)
        series: dict[str, list] = {}
        for record in records:
            series.setdefault(record.series_uid, []).append(record)
        assert len(series) == 4
        for members in series.values():
            assert 24 <= len(members) <= 32
            ordered = sorted(members, key=lambda r: r.slice_index)
            z = [
                float(pydicom.dcmread(r.path, stop_before_pixels=True).ImagePositionPatient[2])
                for r in ordered
            ]
            assert z == sorted(z) and np.allclose(np.diff(z), 5.0)
        ds = read_image_dataset(records[len(records) // 2].path)
        assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.2" and ds.BodyPartExamined == "HEAD"
        assert (float(ds.RescaleIntercept), float(ds.RescaleSlope), float(ds.SliceThickness)) == (-1024, 1, 5)
        hu = ds.pixel_array.astype(np.float32) + float(ds.RescaleIntercept)
        assert hu.min() < -900 and hu.max() > 600  # air outside, bone in the skull

    def test_hemorrhage_labels_are_contiguous_with_boxes(self, tmp_path: Path) -> None:
        generate_ct(tmp_path, 6, seed=11)
        rows = _rows(tmp_path / "labels.csv")
        assert set(CT_LABELS) <= set(rows[0])
        positives = 0
        for uid in {r["series_uid"] for r in rows}:
            members = sorted((r for r in rows if r["series_uid"] == uid), key=lambda r: int(r["info_slice"]))
            flags = [int(r["hemorrhage"]) for r in members]
            if any(flags):
                positives += 1
                on = [i for i, f in enumerate(flags) if f]
                assert on == list(range(on[0], on[-1] + 1)) and 1 <= len(on) <= 6
            for r in members:
                assert (r["hemorrhage"] == "1") == bool(json.loads(r["boxes"]))
        assert 0 < positives < 6

    def test_preprocess_with_brain_window(self, ct_set: Path) -> None:
        spec = PreprocessSpec(height=128, width=128, window_source="model", window_center=40, window_width=80)
        record = load_generic(ct_set)[10]
        out = preprocess_dataset(read_image_dataset(record.path), spec)
        assert out.array.shape == (1, 1, 128, 128) and 0 <= out.array.min() and out.array.max() <= 1
