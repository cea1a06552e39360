"""STOW-RS: ``POST /dicomweb/studies[/{study}]`` (PS3.18 10.5), the DICOMweb door to the same store.

The body is received, split and each part checked as ``POST /v1/studies`` does
(:func:`service.api.upload.receive`, :func:`service.store.validate.parse_instance`; a large body is
spooled to disk as it arrives, never held whole), and the good parts
go through the same durable :meth:`service.store.instances.Instances.ingest` (file fsynced, then row)
before we answer. What differs is the answer, which is the Store Instances Response dataset a DICOMweb
client expects (PS3.18 10.5.3) in ``application/dicom+json``:

- ``ReferencedSOPSequence`` (0008,1199): each stored instance with its RetrieveURL;
- ``FailedSOPSequence`` (0008,1198): each refused part with its ``FailureReason`` (0008,1197), the code
  :func:`service.errors.stow_failure_reason` gives its error (PS3.18 Table 10.5.3-2): 0xC000 cannot
  understand (not DICOM, bad UIDs), 0xC122 transfer syntax not supported (no decoder here), 0xA700 out of
  resources (disk or database full, study too large), 0xA900 data set does not match (its
  StudyInstanceUID is not the one in the URL, or its SOP Instance UID already names another instance:
  stored in another study, or with other content, :mod:`service.store.duplicates`);
- status 200 when every instance was stored, 202 when some were and some were not, 409 when none was.

Like the DICOM listener (and unlike ``POST /v1/studies``, whose only purpose is analysis), STOW-RS is a
storage service: objects without pixel data (SR, presentation states) are stored, not analysed. Also like
the listener, the study is analysed after the assembly quiet time (or as soon as every series is full):
a DICOMweb sender may store a study in several requests, one instance each.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from io import BytesIO

from fastapi import APIRouter, Header, Request
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from service.api.deps import StateDep, StudyUID
from service.api.dicomweb_common import DICOM_JSON, DicomJSONResponse, dicom_json, study_url
from service.api.stow import DICOM_TYPES, BodyPart
from service.api.upload import Upload, receive
from service.assemble import ready_after
from service.errors import (
    STOW_FAILURE_REASONS,
    InvalidInstanceError,
    PacsTriageError,
    SopInstanceConflictError,
    StorageFullError,
    StudyMismatchError,
    UnsupportedMediaTypeError,
    stow_failure_reason,
)
from service.store.duplicates import find_conflicts
from service.store.validate import ParsedInstance, parse_instance

__all__ = ["router"]

logger = logging.getLogger(__name__)

router = APIRouter(tags=["dicomweb"])


@dataclass(frozen=True)
class _Failed:
    label: str
    sop_class_uid: str | None
    sop_instance_uid: str | None
    error: PacsTriageError

    @property
    def reason(self) -> int:
        return stow_failure_reason(self.error)

    @classmethod
    def of(cls, p: ParsedInstance, error: PacsTriageError, label: str = "instance") -> _Failed:
        return cls(label, p.sop_class_uid, p.sop_instance_uid, error)


def _uids(part: BodyPart) -> tuple[str | None, str | None]:
    """SOP Class and Instance UID of a refused part, when its header can be read at all."""
    try:
        ds = dcmread(BytesIO(part.data), stop_before_pixels=True, force=True)
        return str(ds.get("SOPClassUID", "")) or None, str(ds.get("SOPInstanceUID", "")) or None
    except Exception:  # not DICOM at all: nothing to name it by
        return None, None


def _check(part: BodyPart, study_uid: str | None) -> ParsedInstance | _Failed:
    """Parse one part (blocking: on a thread); a part that cannot be stored becomes a failure."""
    try:
        if part.content_type and part.content_type not in DICOM_TYPES:
            raise InvalidInstanceError(
                f"content type {part.content_type} is not application/dicom", part=part.label
            )
        parsed = parse_instance(part.data, part.label, images_only=False)
    except InvalidInstanceError as exc:
        return _Failed(part.label, *_uids(part), exc)
    if study_uid is not None and parsed.study_uid != study_uid:
        mismatch = StudyMismatchError(
            "its StudyInstanceUID is not the study in the request URL", part=part.label
        )
        return _Failed.of(parsed, mismatch, part.label)
    return parsed


def _response(
    request: Request, study_uid: str | None, good: list[ParsedInstance], failed: list[_Failed]
) -> Dataset:
    """The Store Instances Response Module (PS3.18 Table 10.5.3-3)."""
    ds = Dataset()
    studies = {p.study_uid for p in good}
    if good and (study_uid is not None or len(studies) == 1):
        ds.RetrieveURL = study_url(request, study_uid or next(iter(studies)))
    if failed:
        items = []
        for f in failed:
            item = Dataset()
            item.ReferencedSOPClassUID = f.sop_class_uid or ""
            item.ReferencedSOPInstanceUID = f.sop_instance_uid or ""
            item.FailureReason = f.reason
            items.append(item)
        ds.FailedSOPSequence = Sequence(items)
    if good:
        items = []
        for p in good:
            item = Dataset()
            item.ReferencedSOPClassUID = p.sop_class_uid
            item.ReferencedSOPInstanceUID = p.sop_instance_uid
            item.RetrieveURL = study_url(
                request, p.study_uid, "series", p.series_uid, "instances", p.sop_instance_uid
            )
            items.append(item)
        ds.ReferencedSOPSequence = Sequence(items)
    return ds


_STOW_BODY = {
    "required": True,
    "description": 'DICOM Part 10 instances as multipart/related; type="application/dicom" (PS3.18 10.5.1)',
    "content": {
        'multipart/related; type="application/dicom"': {"schema": {"type": "string", "format": "binary"}}
    },
}
_STOW_ANSWER = {"content": {DICOM_JSON: {"schema": {"type": "object"}}}}
_STOW_RESPONSES: dict[int | str, dict[str, object]] = {
    200: {"description": "Every instance stored (Store Instances Response, PS3.18 10.5.3)", **_STOW_ANSWER},
    202: {"description": "Some instances stored, some refused (FailedSOPSequence)", **_STOW_ANSWER},
    409: {"description": "No instance stored (FailedSOPSequence says why)", **_STOW_ANSWER},
    400: {},
    413: {},
    415: {},
    422: {},
}


async def _ingest(state: StateDep, upload: Upload[_Failed]) -> list[ParsedInstance]:
    """Store the good instances durably, less the SOP Instance UID conflicts, which join the failures;
    what was stored.

    The ingest is all or nothing: a conflict that appeared since :func:`find_conflicts` looked (another
    request storing the UID in another study meanwhile) refuses that instance and the rest is tried again;
    a full disk refuses them all (the ingest removed what it wrote).
    """
    instances, failed = state.instances, upload.bad
    conflicts = await find_conflicts(instances.db, instances.instances_dir, upload.good, upload.staged)
    failed.extend(_Failed.of(upload.good[i], exc) for i, exc in sorted(conflicts.items()))
    # Each good instance with its staged file (a spooled request), in body order.
    todo = [
        (p, upload.staged[i] if upload.staged is not None else None)
        for i, p in enumerate(upload.good)
        if i not in conflicts
    ]
    while todo:
        good = [p for p, _ in todo]
        staged = [st for _, st in todo if st is not None] if upload.staged is not None else None
        try:
            await instances.ingest(good, not_before=ready_after(state.settings, "dicom"), staged=staged)
        except SopInstanceConflictError as exc:
            sop = exc.extra.get("sop_instance_uid")
            named = [p for p in good if p.sop_instance_uid == sop] or good  # none named: refuse all
            failed.extend(_Failed.of(p, exc) for p in named)
            todo = [(p, st) for p, st in todo if p not in named]
            continue
        except StorageFullError as exc:
            failed.extend(_Failed.of(p, exc) for p in good)
            return []
        state.metrics.instances_received.labels(source="dicomweb").inc(len(good))
        state.notifier.work.set()
        return good
    return []


async def _store(
    request: Request, state: StateDep, content_type: str | None, study_uid: str | None
) -> DicomJSONResponse:
    settings = state.settings
    media = (content_type or "").split(";", 1)[0].strip().lower()
    if media != "multipart/related":
        raise UnsupportedMediaTypeError(
            f'STOW-RS takes multipart/related; type="application/dicom", not {media or "no content type"}',
            part="Content-Type",
        )
    upload = await receive(
        request, content_type, settings.api, state.instances, lambda part: _check(part, study_uid)
    )
    try:
        good = await _ingest(state, upload)
    finally:
        await upload.release()  # what the ingest did not take (conflicts)
    failed = upload.bad
    logger.info("STOW-RS: %d instance(s) stored, %d part(s) refused", len(good), len(failed))
    status = 200 if not failed else 202 if good else 409
    headers = {}
    if failed:  # PS3.18 8.6.2 / RFC 7234 5.5: a human-readable reason beside the codes
        first = failed[0]
        words = STOW_FAILURE_REASONS[first.reason]
        text = f"{first.label}: {words}: {first.error.detail}".replace('"', "'")
        text = "".join(
            c if " " <= c <= "~" else "?" for c in text
        )  # a header is ASCII: a file name may not be
        more = f" (and {len(failed) - 1} more)" if len(failed) > 1 else ""
        headers["Warning"] = f'299 pacs-triage "{text[:300]}{more}"'
    return DicomJSONResponse(
        dicom_json(_response(request, study_uid, good, failed)), status_code=status, headers=headers
    )


@router.post(
    "/studies", status_code=200, responses=_STOW_RESPONSES, openapi_extra={"requestBody": _STOW_BODY}
)
async def stow_studies(
    request: Request, state: StateDep, content_type: str | None = Header(None)
) -> DicomJSONResponse:
    """Store Instances (PS3.18 10.5): any studies; see the module docstring for the answer."""
    return await _store(request, state, content_type, None)


@router.post(
    "/studies/{study_uid}",
    status_code=200,
    responses=_STOW_RESPONSES,
    openapi_extra={"requestBody": _STOW_BODY},
)
async def stow_study(
    study_uid: StudyUID, request: Request, state: StateDep, content_type: str | None = Header(None)
) -> DicomJSONResponse:
    """Store Instances of one study: instances of any other study are refused with 0xA900."""
    return await _store(request, state, content_type, study_uid)
