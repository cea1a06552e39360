"""The synthetic generator: determinism, DICOM validity, label format, and the shared preprocessing path."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pydicom
import pytest

from service.inference.preprocess import PreprocessSpec, preprocess_dataset
from training.data.formats.generic import load_generic
from training.data.formats.images import read_image_dataset
from training.data.synthetic import (
    CT_LABELS,
    CXR_LABELS,
    MANUFACTURER,
    MASK_FILE,
    generate_ct,
    generate_cxr,
    read_mask,
)
from training.data.synthetic.chest_anatomy import draw_chest, render_cxr
from training.data.synthetic.chest_findings import PTX_SIZES
from training.data.synthetic.ct_hemorrhage import HEMORRHAGE_TYPES, Anatomy, draw_hemorrhage, paint_hemorrhage


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
        masks = sorted(ct_set.rglob(MASK_FILE))
        assert len(masks) == 4
        for path in masks:
            with np.load(path) as a, np.load(again / path.relative_to(ct_set)) as b:
                np.testing.assert_array_equal(a["mask"], b["mask"])

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


@pytest.fixture(scope="module")
def drawn() -> list:
    """80 films straight from the renderer, with its record of what it drew."""
    out = []
    for i in range(80):
        rng = np.random.default_rng([99, i])
        chest = draw_chest(rng, "F" if i % 2 else "M")
        out.append(render_cxr(chest, rng, 256, 256, ap=i % 4 == 0))
    return out


class TestChestRealism:
    """What issue 14 asked of the chest generator, checked on the renderer's own record of what it drew."""

    def test_pneumothorax_sizes_run_from_rims_to_tension(self, drawn) -> None:
        sizes = {r.ptx_size for r in drawn if r.pneumothorax}
        assert {"rim", "moderate"} <= sizes <= set(PTX_SIZES)
        assert all(r.ptx_size == "" and r.ptx_depth == 0 for r in drawn if not r.pneumothorax)

    def test_mimics_and_devices_appear_in_negatives(self, drawn) -> None:
        seen = {name for r in drawn if not r.pneumothorax for name in r.extras}
        assert {"scapula", "skin_fold", "granuloma"} <= seen
        assert seen & {"cvc", "ecg", "ett", "ngt"}

    def test_nodule_boxes_contain_added_density(self, drawn) -> None:
        for r in drawn:
            for (x0, y0, x1, y1), radius in zip(r.boxes, r.nodule_radii, strict=True):
                assert 0 <= x0 < x1 <= 256 and 0 <= y0 < y1 <= 256
                assert abs((x1 - x0) - 2 * radius) < 1.5 or x0 == 0 or x1 == 256

    def test_info_columns(self, cxr_set: Path) -> None:
        rows = _rows(cxr_set / "labels.csv")
        for row in rows:
            assert row["info_processing"].split("+")[0] in ("none", "unsharp", "multiscale")
            assert (row["info_ptx_size"] in PTX_SIZES) == (row["pneumothorax"] == "1")


class TestHemorrhageMasks:
    """The per-pixel mask is what was painted: checked against the painting formula, then on the files."""

    @pytest.mark.parametrize("kind", sorted(HEMORRHAGE_TYPES))
    def test_mask_marks_exactly_the_painted_pixels(self, kind: str) -> None:
        size, before = 160, 30.0
        c = (np.arange(size, dtype=np.float32) + 0.5 - size / 2) * 0.9
        x, y = c[None, :].repeat(size, 0), c[:, None].repeat(size, 1)
        phi = np.arctan2(y, x)
        rho = np.sqrt((x / 62) ** 2 + (y / 70) ** 2)
        inner = ((1 - rho) * 66).astype(np.float32)
        vent = ((x / 6) ** 2 + ((y + 5) / 20) ** 2 < 1).astype(np.float32)
        sulcal = ((np.sin(x / 2.3) * np.cos(y / 3.1) > 0.6) & (inner < 8)).astype(np.float32)
        anatomy = Anatomy(x, y, phi, inner, sulcal, vent, 62.0, 70.0)
        for seed in range(40):
            hem = draw_hemorrhage(np.random.default_rng([seed, 5]), 28, 0.05, 150.0)
            if hem["kind"] != kind:
                continue
            k = int(round(hem["centre"]))
            hu = np.full((size, size), before, np.float32)
            label, box, after, mask = paint_hemorrhage(hem, k, hu.copy(), anatomy)
            assert mask.dtype == np.uint8 and set(np.unique(mask)) <= {0, 1}
            assert label == int(mask.any())
            if not label:
                assert box is None
                continue
            rows, cols = np.nonzero(mask)
            assert box == (cols.min(), rows.min(), cols.max() + 1, rows.max() + 1)
            rise = after - before
            full = (hem["hu"] - before) * 0.7  # the smallest full-coverage rise (zf = 0)
            assert (rise[mask == 1] > 0.5 * full - 6.5).all()  # painted (minus the IPH oedema halo)
            assert (rise[mask == 0] <= 0.5 * (hem["hu"] - before) + 1e-3).all()  # not (or barely) painted
            return
        pytest.skip(f"no {kind} among the drawn seeds")

    def test_files_masks_boxes_and_labels_agree(self, tmp_path: Path) -> None:
        generate_ct(tmp_path, 10, seed=21)
        records = load_generic(tmp_path)
        kinds, positives = set(), 0
        for record in records:
            mask = read_mask(tmp_path, record)
            ds = pydicom.dcmread(record.path)
            assert mask.shape == (ds.Rows, ds.Columns)
            assert record.labels["hemorrhage"] == int(mask.any())
            if not mask.any():
                assert not record.boxes
                continue
            positives += 1
            kinds.add(record.extra["info_hemorrhage_type"])
            rows, cols = np.nonzero(mask)
            (box,) = record.boxes
            extent = (cols.min(), rows.min(), cols.max() + 1, rows.max() + 1)
            assert (box.x0, box.y0, box.x1, box.y1) == extent
            hu = ds.pixel_array.astype(np.float32) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
            assert hu[mask == 1].mean() > 40  # blood (after kernel blur, noise and calibration offset)
        assert positives > 0 and len(kinds) >= 2
