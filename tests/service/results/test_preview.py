"""build_preview: a valid RGB Secondary Capture, banner on top, boxes in colour where the detections are."""

from __future__ import annotations

from io import BytesIO
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import (
    MultiFrameGrayscaleWordSecondaryCaptureImageStorage,
    SecondaryCaptureImageStorage,
    generate_uid,
)

from service.results.preview import (
    BANNER_TEXT,
    BOX_COLOURS,
    MAX_SIDE,
    MIN_SIDE,
    PREVIEW_SERIES_DESCRIPTION,
    build_preview,
    preview_scale,
)
from service.results.schema import Code, Detection, Finding, StudyResult
from service.results.sr import MANUFACTURER
from tests.service.dicom_factory import head_ct_series, make_dataset
from tests.service.results.dciodvfy import run_dciodvfy

NODULE = Code(scheme="SCT", value="786838002", meaning="Pulmonary nodule")


def chest_dataset(**kwargs: object) -> Dataset:
    """Left half black, right half white (stored 0 / 4000), so windowing is visible in the preview."""
    pixels = np.zeros((64, 64), dtype=np.uint16)
    pixels[:, 32:] = 4000
    return make_dataset(pixels=pixels, **kwargs)  # type: ignore[arg-type]


def nodule(ds: Dataset, detections: list[Detection], **overrides: object) -> Finding:
    values: dict[str, object] = {
        "model": "cxr-nodule",
        "model_version": "1.0.0",
        "model_sha256": "ab" * 32,
        "label": "nodule",
        "code": NODULE,
        "probability": 0.83,
        "threshold": 0.19,
        "positive": True,
        "urgent": False,
        "urgency": "routine",
        "series_uid": str(ds.SeriesInstanceUID),
        "key_instance_uid": str(ds.SOPInstanceUID),
        "detections": detections,
    }
    values.update(overrides)
    return Finding(**values)


def result_for(ds: Dataset, findings: list[Finding]) -> StudyResult:
    return StudyResult(
        result_id="res-0001",
        study_uid=ds.StudyInstanceUID,
        status="complete",
        priority="routine",
        findings=findings,
    )


def build(result: StudyResult, source: Dataset, **kwargs: object) -> Dataset:
    return build_preview(
        result,
        source,
        sop_instance_uid=generate_uid(),
        series_instance_uid=generate_uid(),
        **kwargs,  # type: ignore[arg-type]
    )


def write_and_check(sc: Dataset, tmp_path: Path) -> Dataset:
    path = tmp_path / f"{sc.SOPInstanceUID}.dcm"
    pydicom.dcmwrite(path, sc, enforce_file_format=True)
    errors, output = run_dciodvfy(path)
    assert errors == 0, output
    return pydicom.dcmread(path)


def banner_height(back: Dataset, source_rows: int, source_columns: int) -> int:
    return int(back.Rows) - round(source_rows * preview_scale(source_rows, source_columns))


class TestBuildPreview:
    def test_cr_with_two_boxes(self, tmp_path: Path) -> None:
        ds = chest_dataset()
        boxes = [(8, 8, 20, 20, 0.83), (36, 40, 50, 60, 0.31)]
        detections = [
            Detection(sop_instance_uid=ds.SOPInstanceUID, frame=1, x0=x0, y0=y0, x1=x1, y1=y1, score=s)
            for x0, y0, x1, y1, s in boxes
        ]
        back = write_and_check(build(result_for(ds, [nodule(ds, detections)]), ds), tmp_path)

        assert back.SOPClassUID == SecondaryCaptureImageStorage
        assert (back.StudyInstanceUID, back.PatientID) == (ds.StudyInstanceUID, ds.PatientID)
        assert back.Manufacturer == back.SecondaryCaptureDeviceManufacturer == MANUFACTURER
        assert (back.ConversionType, back.BurnedInAnnotation) == ("WSD", "YES")
        assert back.SeriesDescription == PREVIEW_SERIES_DESCRIPTION
        assert back.ImageComments.startswith(BANNER_TEXT)
        assert "Frame 1" in back.DerivationDescription
        (source_item,) = back.SourceImageSequence
        assert source_item.ReferencedSOPInstanceUID == ds.SOPInstanceUID
        assert source_item.ReferencedSOPClassUID == ds.SOPClassUID
        assert back.PhotometricInterpretation == "RGB"

        pixels = back.pixel_array
        scale = preview_scale(64, 64)
        top = banner_height(back, 64, 64)
        assert pixels.shape == (top + 64 * scale, 64 * scale, 3)
        assert max(pixels.shape[:2]) <= MAX_SIDE

        banner = pixels[: top - 2].reshape(-1, 3)
        black = np.all(banner == 0, axis=1).mean()
        white = np.all(banner >= 250, axis=1).mean()
        assert black > 0.6, "the banner is a dark band, not the image"
        assert white > 0.005, "the banner carries white text"

        for x0, y0, _, y1, _ in boxes:  # one finding: both boxes in its colour
            row = top + round((y0 + y1) / 2 * scale)  # middle of the left edge: away from the label
            assert tuple(pixels[row, round(x0 * scale)]) == BOX_COLOURS[0]
        # windowed source: the left half is dark, the right half bright, grey (R == G == B)
        assert tuple(pixels[top + 5, 5]) == (0, 0, 0)
        assert tuple(pixels[-5, -5]) == (255, 255, 255)

    def test_monochrome1_is_inverted(self, tmp_path: Path) -> None:
        ds = chest_dataset()
        ds.PhotometricInterpretation = "MONOCHROME1"
        back = write_and_check(build(result_for(ds, []), ds), tmp_path)
        top = banner_height(back, 64, 64)
        assert tuple(back.pixel_array[top + 5, 5]) == (255, 255, 255)
        assert tuple(back.pixel_array[-5, -5]) == (0, 0, 0)

    def test_ct_key_slice_without_boxes(self, tmp_path: Path) -> None:
        series = [pydicom.dcmread(BytesIO(raw)) for raw in head_ct_series(5)]
        key = series[2]
        finding = nodule(
            key,
            [],
            model="ct-hemorrhage",
            label="hemorrhage",
            code=Code(scheme="SCT", value="1386000", meaning="Intracranial hemorrhage"),
            positive=False,
            probability=0.1,
        )
        back = write_and_check(build(result_for(key, [finding]), key), tmp_path)

        assert back.SourceImageSequence[0].ReferencedSOPInstanceUID == key.SOPInstanceUID
        assert list(back.PatientOrientation) == ["L", "P"]  # from ImageOrientationPatient 1\0\0\0\1\0
        image = back.pixel_array[banner_height(back, 64, 64) :]
        assert np.all(image[..., 0] == image[..., 1]) and np.all(image[..., 1] == image[..., 2]), "no colour"

    def test_multiframe_draws_only_the_boxes_of_the_frame(self, tmp_path: Path) -> None:
        ds = make_dataset(modality="OT", sop_class=MultiFrameGrayscaleWordSecondaryCaptureImageStorage)
        ds.NumberOfFrames = 2
        ds.PixelData = np.zeros((2, 64, 64), dtype=np.uint16).tobytes()
        on_2 = Detection(sop_instance_uid=ds.SOPInstanceUID, frame=2, x0=10, y0=10, x1=30, y1=30, score=0.9)
        on_1 = Detection(sop_instance_uid=ds.SOPInstanceUID, frame=1, x0=40, y0=40, x1=60, y1=60, score=0.9)
        back = write_and_check(build(result_for(ds, [nodule(ds, [on_2, on_1])]), ds, frame=2), tmp_path)

        assert back.SourceImageSequence[0].ReferencedFrameNumber == 2
        pixels, top, scale = back.pixel_array, banner_height(back, 64, 64), preview_scale(64, 64)
        assert tuple(pixels[top + round(20 * scale), round(10 * scale)]) == BOX_COLOURS[0]
        assert tuple(pixels[top + round(50 * scale), round(40 * scale)]) != BOX_COLOURS[0]

    def test_large_image_is_capped(self) -> None:
        ds = make_dataset(rows=1600, columns=1200)
        sc = build(result_for(ds, []), ds)
        assert max(int(sc.Rows), int(sc.Columns)) <= MAX_SIDE
        assert sc.Rows > sc.Columns

    def test_narrow_image_is_centred_under_a_full_width_banner(self, tmp_path: Path) -> None:
        ds = make_dataset(rows=1024, columns=128, value=4000)
        ds.WindowCenter, ds.WindowWidth = 1000, 1000  # the dataset's VOI window: 4000 shows white
        back = write_and_check(build(result_for(ds, []), ds), tmp_path)
        assert back.Columns == MIN_SIDE
        assert back.Rows == MAX_SIDE  # shrunk to make room for the banner
        bottom = back.pixel_array[-100:]  # surely image, not banner
        assert np.all(bottom[:, :100] == 0), "black margin left of the image"
        assert np.all(bottom[:, MIN_SIDE // 2] == 255), "the (white) image in the middle"

    def test_frame_out_of_range_is_refused(self) -> None:
        ds = chest_dataset()
        with pytest.raises(ValueError, match="frame 2 out of range"):
            build(result_for(ds, []), ds, frame=2)


def test_preview_scale_bounds() -> None:
    assert preview_scale(64, 32) == 8.0
    assert preview_scale(800, 600) == 1.0
    assert preview_scale(2048, 1024) == 0.5
