"""Results, DICOM headers and notifications shared by the HL7 and FHIR tests (and their conftest)."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from service.results.schema import Code, Finding, HopTimes, StudyResult
from service.store.notify import NotificationInfo
from tests.service.dicom_factory import SENTINEL_ACCESSION, make_dataset

NOW = datetime(2025, 3, 4, 5, 6, 7, tzinfo=UTC)
PTX = Code(scheme="SCT", value="36118008", meaning="Pneumothorax")
NODULE = Code(scheme="SCT", value="786838002", meaning="Pulmonary nodule")


def finding(code: Code, probability: float, urgency: str = "stat") -> Finding:
    positive = probability >= 0.5
    return Finding(
        model="cxr-pneumothorax",
        model_version="1.2.0",
        model_sha256="ab" * 32,
        label=code.meaning.lower(),
        code=code,
        probability=probability,
        threshold=0.5,
        positive=positive,
        urgent=positive and urgency != "routine",
        urgency=urgency,
        series_uid="1.2.3.4",
    )


def make_result(
    priority: str = "stat", result_id: str = "7d3c4a51-0b6e-4c0e-9f0a-3f8c2d1e5b7a"
) -> StudyResult:
    return StudyResult(
        result_id=result_id,
        study_uid="1.2.826.0.1.3680043.8.498.1",
        status="complete",
        priority=priority,
        findings=[finding(PTX, 0.93), finding(NODULE, 0.12, "routine")],
        timestamps=HopTimes(inference_done=NOW, result_stored=NOW),
    )


def header() -> Dataset:
    ds = make_dataset()
    ds.PatientSex = "F"
    ds.StudyDate, ds.StudyTime = "20250304", "050000.25"
    ds.StudyDescription = "XR CHEST PA|LAT"  # a field separator in DICOM text must be escaped
    ds.IssuerOfPatientID = "HOSP"
    qualifier = Dataset()
    qualifier.UniversalEntityID, qualifier.UniversalEntityIDType = "1.2.3.4.5", "ISO"
    qualifier.IdentifierTypeCode = "MR"
    ds.IssuerOfPatientIDQualifiersSequence = Sequence([qualifier])
    return ds


def notification(
    target: str,
    header_path: Path | None,
    result: StudyResult | None = None,
    *,
    channel: str = "hl7",
    notification_id: int = 41,
) -> NotificationInfo:
    result = result or make_result()
    return NotificationInfo(
        id=notification_id,
        channel=channel,
        target=target,
        study_uid=result.study_uid,
        accession_number=SENTINEL_ACCESSION,
        priority=0,
        attempts=0,
        result=result,
        header_path=header_path,
    )
