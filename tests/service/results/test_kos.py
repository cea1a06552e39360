"""build_kos: the Key Object Selection flags positive findings' key images; it passes dciodvfy and reads
back through highdicom with the same references."""

from __future__ import annotations

from io import BytesIO
from pathlib import Path

import highdicom as hd
import pydicom
import pytest
from pydicom.uid import KeyObjectSelectionDocumentStorage, generate_uid

from service.results.kos import KOS_SERIES_DESCRIPTION, KOS_TITLE, build_kos, key_images
from service.store.validate import OWN_MANUFACTURER
from tests.service.dicom_factory import SENTINEL_ID, head_ct_series, make_dataset
from tests.service.results.dciodvfy import run_dciodvfy
from tests.service.results.test_sr import HEMORRHAGE, PNEUMOTHORAX, finding, study_result


def _build(result: object, sources: dict[str, pydicom.Dataset]) -> hd.ko.KeyObjectSelectionDocument | None:
    return build_kos(result, sources, sop_instance_uid=generate_uid(), series_instance_uid=generate_uid())  # type: ignore[arg-type]


def test_kos_references_positive_key_images_and_passes_dciodvfy(tmp_path: Path) -> None:
    image = make_dataset()
    other = make_dataset(study_uid=image.StudyInstanceUID)
    negative = make_dataset(study_uid=image.StudyInstanceUID)
    result = study_result(
        str(image.StudyInstanceUID),
        [
            finding(image),  # nodule, positive
            finding(other, PNEUMOTHORAX, model="cxr-pneumothorax"),
            finding(image, PNEUMOTHORAX, model="cxr-pneumothorax-2"),  # the same image again: listed once
            finding(negative, positive=False),
        ],
    )
    assert key_images(result) == [image.SOPInstanceUID, other.SOPInstanceUID]
    kos = _build(result, {str(ds.SOPInstanceUID): ds for ds in (image, other, negative)})
    assert kos is not None
    path = tmp_path / "kos.dcm"
    pydicom.dcmwrite(path, kos, enforce_file_format=True)
    errors, output = run_dciodvfy(path)
    assert errors == 0, output

    back = pydicom.dcmread(path)
    assert back.SOPClassUID == KeyObjectSelectionDocumentStorage
    assert back.Modality == "KO" and back.StudyInstanceUID == image.StudyInstanceUID
    assert back.Manufacturer == OWN_MANUFACTURER and back.SeriesDescription == KOS_SERIES_DESCRIPTION
    assert back.PatientID == SENTINEL_ID  # patient and study attributes come from the images
    doc = hd.ko.KeyObjectSelectionDocument.from_dataset(back)
    assert doc.ConceptNameCodeSequence[0].CodeValue == KOS_TITLE.value
    referenced = [
        str(item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID)
        for item in back.ContentSequence
        if item.ValueType == "IMAGE"
    ]
    assert referenced == [image.SOPInstanceUID, other.SOPInstanceUID]
    evidence = back.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence
    assert {str(s.ReferencedSOPSequence[0].ReferencedSOPInstanceUID) for s in evidence} <= {
        image.SOPInstanceUID,
        other.SOPInstanceUID,
    }


def test_no_positive_key_image_no_kos() -> None:
    series = head_ct_series(2)
    ds = pydicom.dcmread(BytesIO(series[0]))
    negative = study_result(str(ds.StudyInstanceUID), [finding(ds, HEMORRHAGE, positive=False)])
    assert _build(negative, {str(ds.SOPInstanceUID): ds}) is None
    unlocated = study_result(str(ds.StudyInstanceUID), [finding(ds, HEMORRHAGE, key_instance_uid=None)])
    assert _build(unlocated, {}) is None


def test_missing_source_is_an_error() -> None:
    image = make_dataset()
    result = study_result(str(image.StudyInstanceUID), [finding(image)])
    with pytest.raises(ValueError, match="key images missing"):
        _build(result, {})
