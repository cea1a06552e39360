"""Every C-STORE status of :func:`service.ingest.attempt.store_attempt`, each through a real association
(pynetdicom as the SCU, our listener on a real SQLite store), plus the mapping it reads from the error tree.

Out of resources from a full disk and cannot-understand from a bad UID are in test_scp.py; here the study
size limit (0xA700), another study's UID (0xA900), a duplicate (success), a named failure of ours (0x0110)
and a bug (0xC211). The last two are fault injections into the store's admission step (the real group
commit calls it), as test_scp.py injects ENOSPC into fsync: no real peer makes our code fail.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from io import BytesIO

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pynetdicom import AE
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from service.errors import (
    BadInputError,
    InvalidUIDError,
    LeaseLostError,
    PacsTriageError,
    SopInstanceConflictError,
    StorageError,
    StorageFullError,
    StudyMismatchError,
    StudyTooLargeError,
    TruncatedDatasetError,
)
from service.ingest.attempt import (
    STATUS_CANNOT_UNDERSTAND,
    STATUS_OUT_OF_RESOURCES,
    STATUS_PROCESSING_FAILURE,
    STATUS_UNEXPECTED,
    Attempt,
    store_attempt,
)
from service.ingest.scp import DicomListener
from service.store.db import InstanceRow
from service.store.instances import Instances
from tests.service.dicom_factory import make_dataset, to_bytes


def _ds(**kwargs: str | int) -> Dataset:
    return dcmread(BytesIO(to_bytes(make_dataset(**kwargs))))  # type: ignore[arg-type]


def _send(port: int, datasets: list[Dataset]) -> list[tuple[int, str]]:
    """C-STORE each dataset on one association: ``(status, error comment)`` of each answer."""
    ae = AE(ae_title="MODALITY")
    for ds in datasets:
        ae.add_requested_context(ds.SOPClassUID, [ds.file_meta.TransferSyntaxUID])
    assoc = ae.associate("127.0.0.1", port, ae_title="PACS_TRIAGE")
    assert assoc.is_established
    try:
        answers = [assoc.send_c_store(ds) for ds in datasets]
    finally:
        assoc.release()
    return [(int(a.Status), str(a.get("ErrorComment", ""))) for a in answers]


def _stored(store: Instances, listener: DicomListener) -> int:
    assert listener.flush(30)
    with Session(store.db.engine) as s:
        return int(s.scalar(select(func.count()).select_from(InstanceRow)) or 0)


def test_a_study_over_its_instance_limit_is_out_of_resources(
    store: Instances, listen: Callable[..., DicomListener]
) -> None:
    store.max_instances_per_study = 1
    listener = listen()
    study = "1.2.826.0.1.3680043.8.498.71"
    answers = _send(listener.port, [_ds(study_uid=study), _ds(study_uid=study, instance_number=2)])
    assert answers[0] == (0x0000, "")
    assert answers[1] == (STATUS_OUT_OF_RESOURCES, "too many instances in the study")
    assert _stored(store, listener) == 1


def test_a_uid_of_another_study_is_a9xx_and_a_duplicate_is_success(
    store: Instances, listen: Callable[..., DicomListener]
) -> None:
    listener = listen()
    first = _ds()
    again = _ds(
        study_uid=first.StudyInstanceUID, series_uid=first.SeriesInstanceUID, sop_uid=first.SOPInstanceUID
    )
    elsewhere = _ds(sop_uid=first.SOPInstanceUID)  # same SOP Instance UID, a new study
    answers = _send(listener.port, [first, again, elsewhere])
    assert answers[0] == (0x0000, "") and answers[1] == (0x0000, "")  # PS3.4 B.2.3: one copy is kept
    assert answers[2] == (0xA900, "SOP Instance UID conflict")
    assert _stored(store, listener) == 1


def test_a_named_failure_of_ours_is_processing_failure(
    store: Instances, listen: Callable[..., DicomListener], monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(*_args: object) -> bool:
        raise StorageError("the database answered with an error")

    listener = listen()
    monkeypatch.setattr(store, "admit_blocking", refuse)
    assert _send(listener.port, [_ds()]) == [
        (STATUS_PROCESSING_FAILURE, "the database answered with an error")
    ]
    monkeypatch.undo()
    assert _stored(store, listener) == 0
    assert not [p for p in store.instances_dir.rglob("*") if p.is_file()]


def test_a_bug_is_c211_with_its_traceback_and_the_association_goes_on(
    store: Instances,
    listen: Callable[..., DicomListener],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    real = store.admit_blocking
    calls: list[int] = []

    def first_call_fails(*args: object) -> bool:
        calls.append(1)
        if len(calls) == 1:
            raise KeyError("a bug")
        return real(*args)  # type: ignore[arg-type]

    listener = listen()
    monkeypatch.setattr(store, "admit_blocking", first_call_fails)
    with caplog.at_level(logging.ERROR, logger="service.ingest.attempt"):
        answers = _send(listener.port, [_ds(), _ds()])
    assert answers == [(STATUS_UNEXPECTED, "internal error storing"), (0x0000, "")]
    (record,) = [r for r in caplog.records if r.name == "service.ingest.attempt"]
    assert record.exc_info is not None and record.exc_info[0] is KeyError
    assert _stored(store, listener) == 1


@pytest.mark.parametrize(
    ("error", "status", "comment"),
    [
        (
            InvalidUIDError("StudyInstanceUID is not a UID"),
            STATUS_CANNOT_UNDERSTAND,
            "StudyInstanceUID is not a UID",
        ),
        (TruncatedDatasetError("PixelData is cut short"), STATUS_CANNOT_UNDERSTAND, "PixelData is cut short"),
        (StudyMismatchError("another study"), 0xA900, "another study"),
        (SopInstanceConflictError("in study 1.2.3"), 0xA900, "SOP Instance UID conflict"),
        (StorageFullError("the data disk is 97% full"), STATUS_OUT_OF_RESOURCES, "disk full"),
        (StudyTooLargeError("over 5000"), STATUS_OUT_OF_RESOURCES, "too many instances in the study"),
        (LeaseLostError("lease lost"), STATUS_PROCESSING_FAILURE, "lease lost"),
        (OSError(5, "Input/output error"), STATUS_OUT_OF_RESOURCES, "cannot write the instance"),
        (ZeroDivisionError(), STATUS_UNEXPECTED, "internal error storing"),
    ],
)
def test_each_error_maps_to_the_status_its_class_carries(error: Exception, status: int, comment: str) -> None:
    with store_attempt("MODALITY@127.0.0.1") as attempt:
        raise error
    assert (attempt.status, attempt.comment) == (status, comment)
    if isinstance(error, PacsTriageError):
        assert attempt.status == error.dimse_status


def test_nothing_is_success_unless_the_body_says_stored() -> None:
    with store_attempt("MODALITY@127.0.0.1") as attempt:
        pass  # the body returned without storing
    assert attempt.failed and attempt.status == STATUS_PROCESSING_FAILURE
    done = Attempt()
    done.stored(False)
    assert not done.failed and done.outcome == "duplicate"


def test_the_families_carry_the_dimse_statuses() -> None:
    assert BadInputError.dimse_status == STATUS_CANNOT_UNDERSTAND
    assert StorageFullError.dimse_status == STATUS_OUT_OF_RESOURCES
    assert PacsTriageError.dimse_status == STATUS_PROCESSING_FAILURE
    assert issubclass(StudyTooLargeError, StorageError) and issubclass(
        SopInstanceConflictError, BadInputError
    )
