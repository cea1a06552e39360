"""build_gsps: a Grayscale Softcopy Presentation State drawing the positive findings' boxes over the original
images; it passes dciodvfy and reads back through highdicom with the boxes where the detector put them."""

from __future__ import annotations

from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.uid import GrayscaleSoftcopyPresentationStateStorage, generate_uid

from service.results.gsps import GSPS_LAYER, GSPS_SERIES_DESCRIPTION, boxes, build_gsps
from service.results.schema import Detection, StudyResult
from service.store.validate import OWN_MANUFACTURER
from tests.service.dicom_factory import SENTINEL_ID, make_dataset
from tests.service.results.dciodvfy import run_dciodvfy
from tests.service.results.test_sr import PNEUMOTHORAX, finding, study_result


def _build(
    result: StudyResult, sources: dict[str, pydicom.Dataset]
) -> hd.pr.GrayscaleSoftcopyPresentationState | None:
    return build_gsps(result, sources, sop_instance_uid=generate_uid(), series_instance_uid=generate_uid())


def _box(ds: pydicom.Dataset, x0: float, y0: float, score: float = 0.9) -> Detection:
    return Detection(
        sop_instance_uid=str(ds.SOPInstanceUID), frame=1, x0=x0, y0=y0, x1=x0 + 20, y1=y0 + 12, score=score
    )


def test_gsps_draws_positive_boxes_and_passes_dciodvfy(tmp_path: Path) -> None:
    image = make_dataset()
    image.WindowCenter, image.WindowWidth = 1000, 2000
    other = make_dataset(study_uid=image.StudyInstanceUID)  # another series of the study
    quiet = make_dataset(study_uid=image.StudyInstanceUID)
    result = study_result(
        str(image.StudyInstanceUID),
        [
            finding(image, detections=[_box(image, 10, 30), _box(image, 5, 2, 0.6)]),
            finding(other, PNEUMOTHORAX, model="cxr-pneumothorax", detections=[_box(other, 30, 40)]),
            finding(quiet, positive=False, detections=[_box(quiet, 1, 1)]),  # negative: not drawn
        ],
    )
    assert set(boxes(result)) == {(image.SOPInstanceUID, 1), (other.SOPInstanceUID, 1)}
    gsps = _build(result, {str(ds.SOPInstanceUID): ds for ds in (image, other, quiet)})
    assert gsps is not None
    path = tmp_path / "gsps.dcm"
    pydicom.dcmwrite(path, gsps, enforce_file_format=True)
    errors, output = run_dciodvfy(path)
    assert errors == 0, output

    back = pydicom.dcmread(path)
    assert back.SOPClassUID == GrayscaleSoftcopyPresentationStateStorage and back.Modality == "PR"
    assert back.StudyInstanceUID == image.StudyInstanceUID and back.PatientID == SENTINEL_ID
    assert back.Manufacturer == OWN_MANUFACTURER and back.SeriesDescription == GSPS_SERIES_DESCRIPTION
    assert [layer.GraphicLayer for layer in back.GraphicLayerSequence] == [GSPS_LAYER]
    drawn = {
        str(a.ReferencedImageSequence[0].ReferencedSOPInstanceUID): a for a in back.GraphicAnnotationSequence
    }
    assert set(drawn) == {image.SOPInstanceUID, other.SOPInstanceUID}
    first = drawn[image.SOPInstanceUID]
    assert [g.GraphicType for g in first.GraphicObjectSequence] == ["POLYLINE", "POLYLINE"]
    corners = np.asarray(first.GraphicObjectSequence[0].GraphicData, dtype=float).reshape(-1, 2)
    assert corners.tolist() == [[10, 30], [30, 30], [30, 42], [10, 42], [10, 30]]  # closed, in pixels
    assert first.GraphicObjectSequence[0].GraphicAnnotationUnits == "PIXEL"
    assert [t.UnformattedTextValue for t in first.TextObjectSequence] == ["nodule 0.90", "nodule 0.60"]
    referenced = {
        str(i.ReferencedSOPInstanceUID)
        for s in back.ReferencedSeriesSequence
        for i in s.ReferencedImageSequence
    }
    assert (
        referenced == {image.SOPInstanceUID, other.SOPInstanceUID} and quiet.SOPInstanceUID not in referenced
    )
    voi = back.SoftcopyVOILUTSequence[0]
    assert (float(voi.WindowCenter), float(voi.WindowWidth)) == (1000.0, 2000.0)  # the image's own window


def test_no_positive_box_no_gsps() -> None:
    image = make_dataset()
    study = str(image.StudyInstanceUID)
    assert _build(study_result(study, [finding(image)]), {}) is None  # positive, but no box
    negative = study_result(study, [finding(image, positive=False, detections=[_box(image, 1, 1)])])
    assert _build(negative, {}) is None


def test_missing_source_is_an_error() -> None:
    image = make_dataset()
    result = study_result(str(image.StudyInstanceUID), [finding(image, detections=[_box(image, 1, 1)])])
    with pytest.raises(ValueError, match="images with boxes missing"):
        _build(result, {})
