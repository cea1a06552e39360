"""``POST /v1/studies`` (store DICOM, start analysis) and ``GET /v1/studies/{study_uid}/result``.

Partial success follows STOW-RS (PS3.18 10.5.3): good parts are stored and analysed, and when any part
was refused the answer is a 409 problem whose ``failed`` member lists each refused part with its reason
(and ``stored`` the SOP Instance UIDs kept). A request in which no part could be stored is refused: with
the part's own status (415 not DICOM, 422 no pixel data / bad UID / undecodable transfer syntax) when it
had one part, else 422 listing every part.

A study that is whole in the request is analysed in one pass (:func:`_store_and_start`): the models run on
the parsed datasets while the files are written and fsynced, and ``Prefer: wait`` answers as soon as the
result is saved; nothing is answered before what it reports (the instances, the result) is durable.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections.abc import Callable
from datetime import datetime
from typing import Any, Literal, cast

from fastapi import APIRouter, Header, Query, Request
from fastapi.responses import JSONResponse

from service.api.deps import StateDep, StudyUID
from service.api.stow import DICOM_TYPES, BodyPart
from service.api.upload import Upload, receive
from service.assemble import ready_after
from service.errors import (
    InvalidInstanceError,
    InvalidUIDError,
    NotDicomError,
    PacsTriageError,
    PartialStoreError,
    ResultNotReadyError,
    StudyNotFoundError,
)
from service.results.schema import Priority, StudyResult
from service.store.files import Staged, is_safe_uid
from service.store.validate import ParsedInstance, parse_instance

__all__ = ["router"]

logger = logging.getLogger(__name__)

router = APIRouter(prefix="/v1/studies", tags=["studies"])

_WAIT_RE = re.compile(r"(?:^|[,;\s])wait\s*=\s*(\d+(?:\.\d+)?)", re.IGNORECASE)


def _prefer_wait(prefer: str | None, cap: float) -> float:
    """Seconds from ``Prefer: wait=N`` (RFC 7240), capped by settings; 0 when absent."""
    match = _WAIT_RE.search(prefer or "")
    return min(float(match.group(1)), cap) if match else 0.0


def _location(study_uid: str) -> str:
    return f"/v1/studies/{study_uid}/result"


def _failure(part: str, exc: PacsTriageError) -> dict[str, Any]:
    return {
        "part": part,
        "type": exc.type,
        "title": exc.title,
        "status": exc.http_status,
        "detail": exc.detail,
    }


async def _read_until(
    state: Any, study_uid: str, timeout: float, done: Callable[[Any, bool], bool]
) -> tuple[Any, bool]:
    """Read the study's status and whether the DICOM listener still holds rows of it (acknowledged, not
    committed yet) until ``done(status, holding)`` says so or ``timeout`` seconds passed; the last read.

    Woken by a stored result (the notifier is watched before the reads, so a result saved after them wakes
    this), and reading again at least every second: rows committed meanwhile, or a result another process
    saved (a shared database), wake nobody here. The rows before the result: rows are committed before
    the listener stops counting them as held, so a study it does not hold now has its acknowledged rows in
    what the status read sees."""
    deadline = time.monotonic() + timeout
    while True:
        with state.notifier.watch(study_uid) as stored:
            holding = state.listener is not None and state.listener.rows_waiting(study_uid)
            status = await state.results.status(study_uid)
            left = deadline - time.monotonic()
            if done(status, holding) or left <= 0:
                return status, holding
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stored.wait(), min(left, 1.0))


async def _wait_for_result(state: Any, study_uid: str, timeout: float) -> StudyResult | None:
    """The study's newest result once no job is outstanding, or None after ``timeout`` seconds."""

    def ready(status: Any, _holding: bool) -> bool:
        return status.result is not None and not status.outstanding

    status, holding = await _read_until(state, study_uid, timeout, ready)
    return cast(StudyResult, status.result) if ready(status, holding) else None


_DICOM_BODY = {"schema": {"type": "string", "format": "binary"}}


@router.post(
    "",
    status_code=202,
    responses={200: {"model": StudyResult}, 400: {}, 409: {}, 413: {}, 415: {}, 422: {}, 507: {}},
    openapi_extra={
        "requestBody": {
            "required": True,
            "description": "DICOM Part 10 instances: STOW-RS multipart/related, form files, or one instance",
            "content": {
                'multipart/related; type="application/dicom"': _DICOM_BODY,
                "multipart/form-data": {"schema": {"type": "object", "additionalProperties": True}},
                "application/dicom": _DICOM_BODY,
            },
        }
    },
)
async def store_study(
    request: Request,
    state: StateDep,
    content_type: str | None = Header(None),
    prefer: str | None = Header(None),
    priority: Literal["stat", "urgent", "routine"] = Query(
        "routine", description="requested priority: stat work is inferred first"
    ),
) -> JSONResponse:
    """Store DICOM instances durably, then analyse the study; see the module docstring for partial success."""
    settings = state.settings

    def check(p: BodyPart) -> ParsedInstance | tuple[str, PacsTriageError]:
        try:
            if p.content_type and p.content_type not in DICOM_TYPES and p.filename is None:
                raise NotDicomError(f"content type {p.content_type} is not application/dicom", part=p.label)
            return parse_instance(p.data, p.label, keep_truncated=settings.store.keep_truncated)
        except InvalidInstanceError as exc:
            return p.label, exc

    upload = await receive(request, content_type, settings.api, state.instances, check)
    try:
        return await _stored(state, upload, prefer, priority)
    finally:
        await upload.release()  # what the ingest did not take (nothing, once it has placed them)


async def _stored(
    state: Any,
    upload: Upload[tuple[str, PacsTriageError]],
    prefer: str | None,
    priority: str,
) -> JSONResponse:
    settings = state.settings
    good, bad = upload.good, upload.bad
    if not good:
        if len(bad) == 1:
            raise bad[0][1]
        raise InvalidInstanceError(
            f"none of the {len(bad)} parts could be stored",
            part=bad[0][0],
            extra={"failed": [_failure(label, exc) for label, exc in bad]},
        )
    # The request delimits what the client sent: the study is ready now, no quiet timer (assemble.py).
    not_before = ready_after(settings, "rest")
    studies = sorted({g.study_uid for g in good})
    stored = sorted({g.sop_instance_uid for g in good})
    wait = _prefer_wait(prefer, settings.api.max_wait_seconds)
    job = await _store_and_start(
        state,
        good,
        studies,
        not_before,
        Priority.of(priority),
        one_pass=not bad and not any(g.truncated for g in good) and upload.staged is None,
        staged=upload.staged,
    )
    state.metrics.instances_received.labels(source="rest").inc(len(good))
    logger.info(
        "stored %d instance(s) of %d study(ies); %d part(s) refused", len(stored), len(studies), len(bad)
    )
    location = _location(studies[0])
    if bad:
        raise PartialStoreError(
            f"{len(bad)} of {upload.parts} parts were not stored; the others were stored and will be"
            " analysed",
            part=bad[0][0],
            extra={
                "failed": [_failure(label, exc) for label, exc in bad],
                "stored": stored,
                "studies": studies,
                "location": location,
            },
        )
    if wait > 0 and len(studies) == 1:
        result = await (_await_job(job, wait) if job else _wait_for_result(state, studies[0], wait))
        if result is not None:
            return JSONResponse(
                result.model_dump(mode="json"),
                status_code=200,
                headers={"Preference-Applied": f"wait={wait:g}"},
            )
    results = [_location(s) for s in studies]
    answer: dict[str, Any] = {"studies": studies, "stored": stored, "results": results}
    truncated = [{"sop_instance_uid": g.sop_instance_uid, "why": g.truncated} for g in good if g.truncated]
    if truncated:  # kept by store.keep_truncated: said, never silent
        answer["truncated"] = truncated
    return JSONResponse(
        answer,
        status_code=202,
        headers={"Location": location},
    )


async def _store_and_start(
    state: Any,
    good: list[ParsedInstance],
    studies: list[str],
    not_before: datetime,
    priority: int,
    *,
    one_pass: bool,
    staged: list[Staged] | None = None,
) -> asyncio.Task[StudyResult | None] | None:
    """Store the instances durably and start their study's analysis; the task analysing it, if ours.

    One pass, when this process infers and the request holds one whole study: its analysis starts on the
    parsed datasets at once, while the files are written and fsynced; the ingest transaction creates the
    job and leases it to this process; the worker then saves the result as soon as both are done. If the
    study already had instances (the job covers more than this request holds), the job reads those from
    the store and takes this request's from memory. Otherwise (several studies, an API-only process,
    models still warming up, a spooled request whose instances are ``staged`` files, not in memory) the
    job goes to the queue and a worker is woken.
    """
    worker, engine = state.worker, state.engine
    if not (
        one_pass and len(studies) == 1 and state.settings.runs_workers and getattr(engine, "ready", True)
    ):
        await state.instances.ingest(good, not_before=not_before, priority=priority, staged=staged)
        state.notifier.work.set()
        return None
    records = [state.instances.record(g) for g in good]
    datasets = {g.sop_instance_uid: g.dataset for g in good if g.dataset is not None}
    prepared = worker.analyse(records, datasets, priority)
    try:
        ingested = await state.instances.ingest(
            good, not_before=not_before, priority=priority, claim=state.jobs
        )
    except BaseException:
        prepared.analysis.cancel()
        with contextlib.suppress(BaseException):
            await prepared.analysis
        raise
    if not ingested.claimed:  # nothing new (a repeated request): no job, the earlier result stands
        prepared.analysis.cancel()
        with contextlib.suppress(BaseException):
            await prepared.analysis
        return None
    (job,) = ingested.claimed
    if job.study_uid not in ingested.whole:  # earlier instances too: analyse them all, ours from memory
        prepared.analysis.cancel()
        with contextlib.suppress(BaseException):
            await prepared.analysis
        return cast("asyncio.Task[StudyResult | None]", worker.adopt(job, datasets=datasets))
    context = ingested.created.get(job.study_uid)  # a new study: its facts need no read back
    return cast("asyncio.Task[StudyResult | None]", worker.adopt(job, prepared, context=context))


async def _await_job(task: asyncio.Task[StudyResult | None], timeout: float) -> StudyResult | None:
    """The job's result once saved, or None after ``timeout`` seconds (the job goes on regardless)."""
    with contextlib.suppress(TimeoutError):
        return await asyncio.wait_for(asyncio.shield(task), timeout)
    return None


def _check_uid(study_uid: str) -> None:
    if not is_safe_uid(study_uid):
        raise InvalidUIDError("the study UID in the path is not a valid UID", part="study_uid")


@router.get("/{study_uid}/result", response_model=StudyResult, responses={202: {}, 404: {}})
async def get_result(study_uid: StudyUID, state: StateDep, prefer: str | None = Header(None)) -> JSONResponse:
    """Newest result: 200 when no analysis is outstanding, 202 + Retry-After while one is, 404 if unknown.

    Instances the DICOM listener acknowledged whose rows wait for the next group commit count as
    outstanding work (202), never as an unknown study: their sender was told they are stored.

    ``Prefer: wait=N`` (RFC 7240, capped by ``api.max_wait_seconds``): while the analysis is outstanding,
    hold the request until the result is stored (woken by it, no polling) or N seconds pass, then answer as
    without it. A RIS or script waiting for a flag need not poll; polling every 10 ms cost the service a
    third of a core and its worker's thread the GIL (bench/RESULTS.md, session 24).
    """
    _check_uid(study_uid)
    wait = _prefer_wait(prefer, state.settings.api.max_wait_seconds)

    def unknown(status: Any, holding: bool) -> bool:  # answered at once, whatever the wait
        return not status.exists and not holding

    def ready(status: Any, holding: bool) -> bool:
        return not (holding or status.outstanding or status.result is None)

    status, holding = await _read_until(state, study_uid, wait, lambda s, h: unknown(s, h) or ready(s, h))
    if unknown(status, holding):
        raise StudyNotFoundError("no instance of this study has been received", part="study_uid")
    if ready(status, holding):
        headers = {"Preference-Applied": f"wait={wait:g}"} if wait > 0 else None
        return JSONResponse(status.result.model_dump(mode="json"), headers=headers)
    raise ResultNotReadyError(
        "the study is being analysed; retry after the indicated delay",
        part="study_uid",
        extra={
            "location": _location(study_uid),
            "previous_result_id": getattr(status.result, "result_id", None),
        },
    )
