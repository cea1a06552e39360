"""Loaders on fixtures in the exact published formats, and broken cases that must name a row or file."""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from service.inference.preprocess import PreprocessSpec, preprocess_dataset
from training.data.formats.generic import load_generic
from training.data.formats.images import png_to_dataset, read_image_dataset
from training.data.formats.nih import NIH_FINDINGS, load_nih_chestxray14
from training.data.formats.rsna import load_rsna_pneumonia
from training.data.records import LabelError
from training.data.synthetic import generate_cxr


def write_dicom(
    path: Path,
    patient_id: str = "P1",
    series_uid: str | None = None,
    position: float | None = None,
    instance: int | None = 1,
) -> Dataset:
    """A tiny but valid 8x8 CT-like DICOM Part 10 file."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID, ds.SOPInstanceUID = (
        ds.file_meta.MediaStorageSOPClassUID,
        ds.file_meta.MediaStorageSOPInstanceUID,
    )
    ds.PatientID = patient_id
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = series_uid or generate_uid()
    ds.Modality = "CT"
    if instance is not None:
        ds.InstanceNumber = instance
    if position is not None:
        ds.ImagePositionPatient = [0, 0, position]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.Rows = ds.Columns = 8
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = np.arange(64, dtype="<u2").tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return ds


def write_csv(path: Path, header: Sequence[str], rows: Sequence[Sequence[object]]) -> Path:
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)
    return path


@pytest.fixture
def generic(tmp_path: Path) -> Path:
    """Three DICOMs and a labels.csv with two labels, boxes and an informational column."""
    for name in ("a.dcm", "sub/b.dcm", "c.dcm"):
        write_dicom(tmp_path / name, patient_id=f"P-{name[-5]}")
    box = json.dumps([{"x0": 1, "y0": 2, "x1": 5, "y1": 6, "label": "nodule"}])
    write_csv(
        tmp_path / "labels.csv",
        ["file", "nodule", "effusion", "boxes", "modality", "info_note"],
        [["a.dcm", 1, 0, box, "CT", "x"], ["sub/b.dcm", 0, 1, "", "CT", ""], ["c.dcm", 0, 0, "[]", "", ""]],
    )
    return tmp_path


class TestGeneric:
    def test_reads_labels_boxes_and_identifiers(self, generic: Path) -> None:
        records = load_generic(generic)
        assert [r.path.name for r in records] == ["a.dcm", "b.dcm", "c.dcm"]
        assert [dict(r.labels) for r in records] == [
            {"nodule": 1, "effusion": 0},
            {"nodule": 0, "effusion": 1},
            {"nodule": 0, "effusion": 0},
        ]
        assert records[0].boxes[0].label == "nodule" and records[0].boxes[0].x1 == 5
        assert records[1].boxes == ()
        assert records[0].patient_id == "P-a" and records[0].extra == {"modality": "CT", "info_note": "x"}
        header = pydicom.dcmread(generic / "a.dcm")
        assert (
            records[0].sop_uid == header.SOPInstanceUID and records[0].series_uid == header.SeriesInstanceUID
        )
        assert all(r.slice_index is None for r in records)

    def test_label_names_selects_columns(self, generic: Path) -> None:
        records = load_generic(generic, label_names=["effusion"])
        assert dict(records[1].labels) == {"effusion": 1} and records[1].extra["nodule"] == "0"

    def test_synthetic_set_round_trip(self, tmp_path: Path) -> None:
        labels_csv = generate_cxr(tmp_path, 3, seed=1)
        with labels_csv.open(newline="") as fh:
            rows = list(csv.DictReader(fh))
        records = load_generic(tmp_path)
        assert len(records) == len(rows)
        for row, record in zip(rows, records, strict=True):
            assert record.patient_id == row["patient_id"] and record.study_uid == row["study_uid"]
            assert record.labels == {"pneumothorax": int(row["pneumothorax"]), "nodule": int(row["nodule"])}
            assert len(record.boxes) == len(json.loads(row["boxes"]))

    def test_slice_index_follows_position_not_file_order(self, tmp_path: Path) -> None:
        series = generate_uid()
        z = [10.0, -5.0, 0.0, 5.0]
        for k, position in enumerate(z):
            write_dicom(tmp_path / f"s{k}.dcm", series_uid=series, position=position, instance=len(z) - k)
        write_csv(tmp_path / "labels.csv", ["file", "bleed"], [[f"s{k}.dcm", 0] for k in range(4)])
        assert [r.slice_index for r in load_generic(tmp_path)] == [3, 0, 1, 2]

    def test_slice_index_falls_back_to_instance_number(self, tmp_path: Path) -> None:
        series = generate_uid()
        for k, instance in enumerate((3, 1, 2)):
            write_dicom(tmp_path / f"s{k}.dcm", series_uid=series, instance=instance)
        write_csv(tmp_path / "labels.csv", ["file", "bleed"], [[f"s{k}.dcm", 0] for k in range(3)])
        assert [r.slice_index for r in load_generic(tmp_path)] == [2, 0, 1]

    def test_corrupt_file_names_file_and_row(self, generic: Path) -> None:
        (generic / "sub/b.dcm").write_bytes(b"\x00" * 40 + b"not a dicom file")
        with pytest.raises(LabelError, match=r"labels\.csv row 3: file .*sub/b\.dcm.* not a readable DICOM"):
            load_generic(generic)

    def test_missing_file_names_row(self, generic: Path) -> None:
        (generic / "c.dcm").unlink()
        with pytest.raises(LabelError, match=r"labels\.csv row 4: file 'c\.dcm' not found"):
            load_generic(generic)

    def test_dicom_without_row_is_named(self, generic: Path) -> None:
        write_dicom(generic / "extra" / "d.dcm")
        with pytest.raises(LabelError, match=r"no label row for DICOM file\(s\) \['extra/d\.dcm'\]"):
            load_generic(generic)
        assert len(load_generic(generic, allow_unlabelled=True)) == 3

    def test_extensionless_dicom_without_row_is_found(self, generic: Path) -> None:
        write_dicom(generic / "IM0001")
        (generic / "README").write_text("not dicom")
        with pytest.raises(LabelError, match="IM0001"):
            load_generic(generic)

    @pytest.mark.parametrize(
        ("column", "value", "message"),
        [
            ("nodule", "yes", r"row 2: label 'nodule' must be 0 or 1, got 'yes'"),
            ("nodule", "2", r"row 2: label 'nodule' must be 0 or 1"),
            ("effusion", "", r"row 2: label 'effusion' must be 0 or 1, got ''"),
            ("boxes", "[{x0: 1}", r"row 2: boxes are not valid JSON"),
            ("boxes", '[{"x0": 1, "y0": 2}]', r"row 2: box .* needs numeric x0, y0, x1, y1 and a label"),
            ("boxes", '[{"x0": 5, "y0": 2, "x1": 1, "y1": 6, "label": "n"}]', r"row 2: box .* x1 <= x0"),
            ("boxes", '{"x0": 1}', r"row 2: boxes must be a JSON list"),
        ],
    )
    def test_bad_values_name_the_row(self, generic: Path, column: str, value: str, message: str) -> None:
        path = generic / "labels.csv"
        with path.open(newline="") as fh:
            rows = list(csv.reader(fh))
        rows[1][rows[0].index(column)] = value
        write_csv(path, rows[0], rows[1:])
        with pytest.raises(LabelError, match=message):
            load_generic(generic)

    def test_header_problems(self, generic: Path) -> None:
        write_csv(generic / "other.csv", ["path", "nodule"], [["a.dcm", 1]])
        with pytest.raises(LabelError, match="no 'file' column"):
            load_generic(generic, labels_csv=generic / "other.csv")
        write_csv(generic / "other.csv", ["file", "boxes", "patient_id"], [["a.dcm", "", "x"]])
        with pytest.raises(LabelError, match="no label columns"):
            load_generic(generic, labels_csv=generic / "other.csv", allow_unlabelled=True)
        with pytest.raises(LabelError, match="not found"):
            load_generic(generic, labels_csv=generic / "missing.csv")

    def test_duplicate_and_short_rows(self, generic: Path) -> None:
        write_csv(generic / "dup.csv", ["file", "nodule"], [["a.dcm", 1], ["a.dcm", 0]])
        with pytest.raises(LabelError, match=r"dup\.csv row 3: file 'a\.dcm' already listed in row 2"):
            load_generic(generic, labels_csv=generic / "dup.csv", allow_unlabelled=True)
        write_csv(generic / "short.csv", ["file", "nodule"], [["a.dcm"]])
        with pytest.raises(LabelError, match=r"short\.csv row 2: 1 fields"):
            load_generic(generic, labels_csv=generic / "short.csv", allow_unlabelled=True)

    def test_dicom_without_patient_id(self, generic: Path) -> None:
        write_dicom(generic / "a.dcm", patient_id="")
        with pytest.raises(LabelError, match=r"row 2: file .*a\.dcm' has no PatientID"):
            load_generic(generic)


RSNA_HEADER = ["patientId", "x", "y", "width", "height", "Target"]


@pytest.fixture
def rsna(tmp_path: Path) -> tuple[Path, Path]:
    images = tmp_path / "stage_2_train_images"
    pids = ["0004cfab-14fd-4e49-80ba-63a80b6bddd6", "00436515-870c-4b36-a041-de91049b9ab4"]
    for pid in pids:
        write_dicom(images / f"{pid}.dcm", patient_id=pid)
    labels = write_csv(
        tmp_path / "stage_2_train_labels.csv",
        RSNA_HEADER,
        [
            [pids[0], "", "", "", "", 0],
            [pids[1], "264.0", "152.0", "213.0", "379.0", 1],
            [pids[1], "562.0", "152.0", "256.0", "453.0", 1],
        ],
    )
    return labels, images


class TestRsnaPneumonia:
    def test_groups_boxes_per_patient(self, rsna: tuple[Path, Path]) -> None:
        records = load_rsna_pneumonia(*rsna)
        assert [r.labels for r in records] == [{"pneumonia": 0}, {"pneumonia": 1}]
        assert records[0].boxes == ()
        boxes = records[1].boxes
        assert [(b.x0, b.y0, b.x1, b.y1, b.label) for b in boxes] == [
            (264.0, 152.0, 477.0, 531.0, "pneumonia"),
            (562.0, 152.0, 818.0, 605.0, "pneumonia"),
        ]
        assert records[1].patient_id == "00436515-870c-4b36-a041-de91049b9ab4"

    @pytest.mark.parametrize(
        ("row", "message"),
        [
            (["new-id", "", "", "", "", 0], r"row 5: file 'new-id\.dcm' not found"),
            (
                ["00436515-870c-4b36-a041-de91049b9ab4", "", "", "", "", 0],
                r"row 5: Target 0 .* contradicts row 3",
            ),
            (["x", "1", "2", "", "4", 1], r"row 5: Target 1 needs numeric x, y, width, height"),
            (["x", "", "", "", "", "pos"], r"row 5: label 'Target' must be 0 or 1"),
            (["x", "1", "1", "1", "1", 0], r"row 5: Target 0 with a box"),
        ],
    )
    def test_broken_rows(self, rsna: tuple[Path, Path], row: list[object], message: str) -> None:
        labels, images = rsna
        with labels.open("a", newline="") as fh:
            csv.writer(fh, lineterminator="\n").writerow(row)
        with pytest.raises(LabelError, match=message):
            load_rsna_pneumonia(labels, images)

    def test_wrong_header(self, tmp_path: Path) -> None:
        labels = write_csv(tmp_path / "l.csv", ["patientId", "Target"], [["a", 0]])
        with pytest.raises(LabelError, match=r"columns \['x', 'y', 'width', 'height'\] missing"):
            load_rsna_pneumonia(labels, tmp_path)

    def test_corrupt_dicom(self, rsna: tuple[Path, Path]) -> None:
        labels, images = rsna
        (images / "0004cfab-14fd-4e49-80ba-63a80b6bddd6.dcm").write_bytes(b"garbage")
        with pytest.raises(LabelError, match=r"row 2: file .*0004cfab.* not a readable DICOM"):
            load_rsna_pneumonia(labels, images)


NIH_HEADER_LINE = (
    "Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,"
    "OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y],"
)


@pytest.fixture
def nih(tmp_path: Path) -> tuple[Path, Path, Path]:
    """Data_Entry_2017.csv, PNGs in the published images_00N/images/ layout, BBox_List_2017.csv."""
    images = tmp_path / "images"
    (images / "images_001" / "images").mkdir(parents=True)
    gradient = np.tile(np.arange(0, 256, 4, dtype=np.uint8), (48, 1))
    Image.fromarray(gradient).save(images / "images_001" / "images" / "00000001_000.png")
    Image.fromarray(gradient).save(images / "images_001" / "images" / "00000001_001.png")
    Image.fromarray(np.stack([gradient] * 4, axis=-1), mode="RGBA").save(images / "00000002_000.png")
    entries = tmp_path / "Data_Entry_2017.csv"
    entries.write_text(
        NIH_HEADER_LINE
        + "\n00000001_000.png,Cardiomegaly,0,1,58,M,PA,2682,2749,0.143,0.143,"
        + "\n00000001_001.png,Cardiomegaly|Emphysema,1,1,58,M,PA,2894,2729,0.143,0.143,"
        + "\n00000002_000.png,No Finding,0,2,81,M,AP,2500,2048,0.168,0.168,\n"
    )
    bbox = tmp_path / "BBox_List_2017.csv"
    bbox.write_text(
        "Image Index,Finding Label,Bbox [x,y,w,h],,,\n"
        "00000001_000.png,Cardiomegaly,10.5,20.25,30,12,,,\n"
        "00000001_000.png,Infiltrate,1,2,3,4,,,\n"
        "00099999_000.png,Mass,1,2,3,4,,,\n"
    )
    return entries, images, bbox


class TestNihChestXray14:
    def test_labels_patients_and_boxes(self, nih: tuple[Path, Path, Path]) -> None:
        entries, images, bbox = nih
        records = load_nih_chestxray14(entries, images, bbox)
        assert [r.patient_id for r in records] == ["1", "1", "2"]
        assert set(records[0].labels) == {f.lower() for f in NIH_FINDINGS}
        assert records[0].labels["cardiomegaly"] == 1 and sum(records[0].labels.values()) == 1
        assert records[1].labels["emphysema"] == 1 and sum(records[1].labels.values()) == 2
        assert sum(records[2].labels.values()) == 0
        assert [(b.x0, b.y0, b.x1, b.y1, b.label) for b in records[0].boxes] == [
            (10.5, 20.25, 40.5, 32.25, "cardiomegaly"),
            (1.0, 2.0, 4.0, 6.0, "infiltration"),
        ]
        assert records[0].path.parent.name == "images"  # found in the subfolder layout
        assert records[0].extra["view"] == "PA" and records[1].extra["follow_up"] == "1"
        assert len({r.study_uid for r in records}) == 3
        assert load_nih_chestxray14(entries, images)[0].study_uid == records[0].study_uid

    def test_png_goes_through_shared_preprocessing(self, nih: tuple[Path, Path, Path]) -> None:
        records = load_nih_chestxray14(*nih[:2])
        for record in records:
            ds = read_image_dataset(record.path)
            assert ds.PhotometricInterpretation == "MONOCHROME2" and ds.SamplesPerPixel == 1
            out = preprocess_dataset(ds, PreprocessSpec(height=32, width=64, keep_aspect=False))
            row = out.array[0, 0, 16]
            assert row[0] == pytest.approx(0.0, abs=0.02) and row[-1] == pytest.approx(252 / 255, abs=0.02)

    def test_sixteen_bit_png(self, tmp_path: Path) -> None:
        array = (np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000).astype(np.uint16)
        Image.fromarray(array).save(tmp_path / "x.png")
        ds = png_to_dataset(tmp_path / "x.png")
        assert ds.BitsAllocated == 16 and np.array_equal(ds.pixel_array, array)
        assert "WindowCenter" not in ds

    def test_unknown_finding_and_missing_image(self, nih: tuple[Path, Path, Path]) -> None:
        entries, images, _ = nih
        text = entries.read_text()
        entries.write_text(text.replace("Cardiomegaly|Emphysema", "Cardiomegaly|Tumour"))
        with pytest.raises(LabelError, match=r"Data_Entry_2017\.csv row 3: unknown finding 'Tumour'"):
            load_nih_chestxray14(entries, images)
        entries.write_text(text + "00000003_000.png,No Finding,0,3,40,F,PA,1,1,1,1,\n")
        with pytest.raises(LabelError, match=r"row 5: image '00000003_000\.png' not found"):
            load_nih_chestxray14(entries, images)

    def test_corrupt_png_names_file(self, tmp_path: Path) -> None:
        (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 20)
        with pytest.raises(LabelError, match=r"bad\.png' is not a readable PNG"):
            read_image_dataset(tmp_path / "bad.png")
        with pytest.raises(LabelError, match="not found"):
            read_image_dataset(tmp_path / "none.dcm")
        (tmp_path / "bad.dcm").write_bytes(b"junk")
        with pytest.raises(LabelError, match=r"bad\.dcm' is not a readable DICOM"):
            read_image_dataset(tmp_path / "bad.dcm")

    def test_short_box_row_names_row(self, nih: tuple[Path, Path, Path]) -> None:
        entries, images, bbox = nih
        bbox.write_text(bbox.read_text() + "00000001_000.png,Mass,1\n")
        with pytest.raises(LabelError, match=r"BBox_List_2017\.csv row 5: 3 fields"):
            load_nih_chestxray14(entries, images, bbox)
