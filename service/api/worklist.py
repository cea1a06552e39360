"""``GET /v1/worklist`` (urgent first, then longest waiting), ``POST /v1/studies/{uid}/acknowledge`` and
``GET /v1/studies/{uid}/audit``: the loop from an AI flag to a person who saw it.

The acknowledgement's actor is the authenticated caller (:data:`service.api.auth.CallerDep`: the token's
name, or ``oidc:<user>`` for a person signed in through OIDC), never a name typed into the body: a reader
token must not be able to silence a STAT flag under a chief radiologist's name (issue 15). A typed ``by``
is kept in the audit detail as ``typed_by``, a note. Only with ``auth.open`` (no authentication at all,
loopback only) is the typed name the actor, there being no other.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query
from pydantic import BaseModel, Field

from service.api.auth import CallerDep
from service.api.deps import StateDep, StudyUID
from service.errors import InvalidUIDError, StudyNotFoundError
from service.results.digest import ResultDigest
from service.results.schema import PriorityName
from service.store.files import is_safe_uid
from service.store.worklist import WorklistEntry

__all__ = ["router"]

router = APIRouter(tags=["worklist"])


class PositiveFinding(BaseModel):
    model: str
    label: str
    probability: float
    urgency: PriorityName
    volume_ml: float | None = Field(
        None, description="measured size (segmentation model), total over the finding's segments"
    )
    max_axial_diameter_mm: float | None = Field(None, description="largest axial diameter of its lesions")


class Entry(BaseModel):
    study_uid: str
    accession_number: str | None
    priority: PriorityName = Field(
        description="what the worklist shows (AI priority, or promoted by waiting time)"
    )
    ai_priority: PriorityName | None = Field(
        description="most urgent priority any result asked for; never lowered"
    )
    last_result_priority: PriorityName | None = Field(description="the newest result's own priority")
    promoted: bool = Field(description="routine study promoted to urgent by worklist.max_wait_minutes")
    first_received: datetime
    waiting_seconds: float
    flagged_at: datetime | None
    acknowledged_at: datetime | None
    acknowledged_by: str | None = Field(description="the authenticated caller who acknowledged the flag")
    result_id: str | None
    result_status: str | None
    positive_findings: list[PositiveFinding]
    time_to_flag_seconds: float | None = Field(description="first instance received → worklist updated")


class Worklist(BaseModel):
    entries: list[Entry]


class Acknowledgement(BaseModel):
    by: str | None = Field(
        None,
        min_length=1,
        max_length=128,
        description="a name typed by the user, kept as a note; the actor is always the authenticated caller",
    )
    note: str | None = Field(None, max_length=1000)


class AuditEvent(BaseModel):
    at: datetime
    event: str
    actor: str
    detail: dict[str, Any]


class Audit(BaseModel):
    study_uid: str
    events: list[AuditEvent]


def _entry(e: WorklistEntry) -> Entry:
    r: ResultDigest | None = e.result
    ttf = None
    if r is not None and r.timestamps.first_instance_received and r.timestamps.worklist_updated:
        ttf = (r.timestamps.worklist_updated - r.timestamps.first_instance_received).total_seconds()
    return Entry(
        study_uid=e.study_uid,
        accession_number=e.accession_number,
        priority=e.priority,
        ai_priority=e.ai_priority,
        last_result_priority=e.last_result_priority,
        promoted=e.promoted,
        first_received=e.first_received,
        waiting_seconds=round(e.waiting_seconds, 3),
        flagged_at=e.flagged_at,
        acknowledged_at=e.acknowledged_at,
        acknowledged_by=e.acknowledged_by,
        result_id=r.result_id if r else None,
        result_status=r.status if r else None,
        positive_findings=[
            PositiveFinding(
                model=f.model,
                label=f.label,
                probability=f.probability,
                urgency=f.urgency,
                volume_ml=sum(s.volume_ml for s in f.segments) if f.segments else None,
                max_axial_diameter_mm=max((s.max_axial_diameter_mm for s in f.segments), default=None),
            )
            for f in (r.findings if r else [])
            if f.positive
        ],
        time_to_flag_seconds=ttf,
    )


def _check_uid(study_uid: str) -> None:
    if not is_safe_uid(study_uid):
        raise InvalidUIDError("the study UID in the path is not a valid UID", part="study_uid")


@router.get("/v1/worklist", response_model=Worklist)
async def worklist(
    state: StateDep,
    status: Annotated[Literal["open", "acknowledged", "all"], Query(description="acknowledgement")] = "open",
    priority: Annotated[PriorityName | None, Query(description="only this (shown) priority")] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 200,
) -> Worklist:
    """Studies by shown priority (stat, urgent, routine), then the longest waiting first."""
    entries = await state.worklist.entries(state=status, priority=priority, limit=limit)
    return Worklist(entries=[_entry(e) for e in entries])


@router.post("/v1/studies/{study_uid}/acknowledge", response_model=Entry, responses={404: {}})
async def acknowledge(
    study_uid: StudyUID, body: Acknowledgement, state: StateDep, caller: CallerDep
) -> Entry:
    """The caller saw the study's flag; audited under the caller's name. A later more urgent result
    re-opens it."""
    _check_uid(study_uid)
    if caller.via == "open":  # auth.open (loopback only): no identity exists, the typed name is all there is
        actor, typed_by = body.by or caller.actor, None
    else:
        actor, typed_by = caller.actor, body.by
    entry = await state.worklist.acknowledge(study_uid, actor, body.note, typed_by=typed_by)
    if entry is None:
        raise StudyNotFoundError("no instance of this study has been received", part="study_uid")
    return _entry(entry)


@router.get("/v1/studies/{study_uid}/audit", response_model=Audit, responses={404: {}})
async def audit(study_uid: StudyUID, state: StateDep) -> Audit:
    """Flags, re-runs and acknowledgements of the study, oldest first."""
    _check_uid(study_uid)
    if await state.worklist.entry(study_uid) is None:
        raise StudyNotFoundError("no instance of this study has been received", part="study_uid")
    events = await state.worklist.audit(study_uid)
    return Audit(
        study_uid=study_uid,
        events=[AuditEvent(at=e.at, event=e.event, actor=e.actor, detail=e.detail) for e in events],
    )
