"""The worklist entry of each study: written with each result (:func:`apply_result`, inside the result's
transaction, by the raise-only rule of :func:`service.worklist.policy.raise_only`), read by the worklist
page and API, acknowledged by a radiologist (audited)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import ColumnElement, bindparam, case, func, insert, select, update
from sqlalchemy.orm import Session

from service.clock import utcnow
from service.results.digest import ResultDigest
from service.results.schema import Priority, StudyResult
from service.store.database import Database
from service.store.db import AuditRow, ResultRow, StudyRow
from service.worklist.policy import RANK_NAME, effective_priority, raise_only

__all__ = ["AuditEntry", "WorklistEntry", "WorklistStore", "apply_result", "audit_remote_requests"]


# Built once (they run with every result; see service/store/results.py for why).
_UPDATE_STUDY = update(StudyRow).where(StudyRow.study_uid == bindparam("study"))
_INSERT_AUDIT = insert(AuditRow)


def apply_result(s: Session, study_uid: str, current: int | None, result: StudyResult, now: datetime) -> None:
    """The study's worklist entry takes the result (never downgraded), with its audit event.

    Inside the result's own transaction (:class:`service.store.results.Results`), which holds the study
    row locked and read its ``current`` AI priority: the worklist never shows a priority whose result is
    not stored, nor misses one that is.
    """
    change = raise_only(current, result.priority)
    values: dict[str, object] = {
        "ai_priority": change.priority,
        "last_result_priority": Priority.of(result.priority),
        "flagged_at": now,
    }
    if change.event == "raised":  # more urgent than what was acknowledged or escalated: re-open
        values |= {"acknowledged_at": None, "acknowledged_by": None, "escalated_at": None}
    conn = s.connection()
    conn.execute(_UPDATE_STUDY, {"study": study_uid, **values})
    detail = {"result_id": result.result_id, "result_priority": result.priority}
    conn.execute(
        _INSERT_AUDIT,
        {
            "at": now,
            "study_uid": study_uid,
            "event": change.event,
            "actor": "pacs-triage",
            "detail": json.dumps(detail, sort_keys=True),
        },
    )


def audit_remote_requests(s: Session, study_uid: str, result: StudyResult, now: datetime) -> None:
    """One ``remote_inference`` audit event per request that took the study's data to a remote backend:
    which backend, which pseudonymous request id, what was sent (issue 18). In the result's transaction."""
    if not result.remote_requests:
        return
    s.connection().execute(
        _INSERT_AUDIT,
        [
            {
                "at": now,
                "study_uid": study_uid,
                "event": "remote_inference",
                "actor": "pacs-triage",
                "detail": json.dumps({**r.model_dump(), "result_id": result.result_id}, sort_keys=True),
            }
            for r in result.remote_requests
        ],
    )


@dataclass(frozen=True)
class WorklistEntry:
    study_uid: str
    accession_number: str | None
    priority: str
    """What the worklist shows: the AI priority, or urgent when the starvation guard promoted it."""
    ai_priority: str | None
    last_result_priority: str | None
    promoted: bool
    first_received: datetime
    waiting_seconds: float
    flagged_at: datetime | None
    acknowledged_at: datetime | None
    acknowledged_by: str | None
    result: ResultDigest | None
    rank: int = field(repr=False, default=2)


@dataclass(frozen=True)
class AuditEntry:
    at: datetime
    event: str
    actor: str
    detail: dict[str, object]


class WorklistStore:
    def __init__(self, db: Database, *, max_wait_minutes: float) -> None:
        self.db = db
        self.max_wait_minutes = max_wait_minutes

    async def entries(
        self, *, state: str = "open", priority: str | None = None, limit: int = 200, offset: int = 0
    ) -> list[WorklistEntry]:
        """Priority first (stat, urgent, routine), then longest waiting; ``state``: open|acknowledged|all.

        One page (``offset``, ``limit``) sorted and cut by the database, on a read connection: a page
        refresh costs the page, not the whole study table, and never waits for ingest.
        """
        return await self.db.read(self._entries, state, priority, limit, offset)

    def _rank(self, now: datetime) -> ColumnElement[int]:
        """The shown priority in SQL, as :func:`service.worklist.policy.effective_priority` computes it."""
        ai = func.coalesce(StudyRow.ai_priority, Priority.ROUTINE)
        if self.max_wait_minutes <= 0:
            return ai
        starved = (ai == Priority.ROUTINE) & (
            StudyRow.first_received < now - timedelta(minutes=self.max_wait_minutes)
        )
        return case((starved, Priority.URGENT), else_=ai)

    def _entries(
        self, s: Session, state: str, priority: str | None, limit: int, offset: int
    ) -> list[WorklistEntry]:
        now = utcnow()
        rank = self._rank(now)
        query = select(StudyRow)
        if state == "open":
            query = query.where(StudyRow.acknowledged_at.is_(None))
        elif state == "acknowledged":
            query = query.where(StudyRow.acknowledged_at.is_not(None))
        if priority:
            query = query.where(rank == Priority.of(priority))
        query = query.order_by(rank, StudyRow.first_received, StudyRow.study_uid).offset(offset).limit(limit)
        entries = [self._entry(st, now) for st in s.scalars(query)]
        results = self._latest_results(s, [e.study_uid for e in entries])
        return [_with_result(e, results.get(e.study_uid)) for e in entries]

    def _entry(self, st: StudyRow, now: datetime) -> WorklistEntry:
        rank, promoted = effective_priority(st.ai_priority, st.first_received, now, self.max_wait_minutes)
        return WorklistEntry(
            study_uid=st.study_uid,
            accession_number=st.accession_number,
            priority=RANK_NAME[rank],
            ai_priority=RANK_NAME.get(st.ai_priority) if st.ai_priority is not None else None,
            last_result_priority=(
                RANK_NAME.get(st.last_result_priority) if st.last_result_priority is not None else None
            ),
            promoted=promoted,
            first_received=st.first_received,
            waiting_seconds=(now - st.first_received).total_seconds(),
            flagged_at=st.flagged_at,
            acknowledged_at=st.acknowledged_at,
            acknowledged_by=st.acknowledged_by,
            result=None,
            rank=rank,
        )

    @staticmethod
    def _latest_results(s: Session, study_uids: list[str]) -> dict[str, ResultDigest]:
        """Each study's newest result, as much of it as a row shows (:mod:`service.results.digest`)."""
        if not study_uids:
            return {}
        rows = s.execute(
            select(ResultRow.study_uid, ResultRow.body)
            .where(ResultRow.study_uid.in_(study_uids))
            .order_by(ResultRow.created_at, ResultRow.job_id)
        ).all()
        newest = {uid: body for uid, body in rows}  # noqa: C416 (rows of two): oldest first, the newest wins
        return {uid: ResultDigest.model_validate_json(body) for uid, body in newest.items()}  # only it parsed

    async def entry(self, study_uid: str) -> WorklistEntry | None:
        return await self.db.read(self._one, study_uid)

    def _one(self, s: Session, study_uid: str) -> WorklistEntry | None:
        st = s.get(StudyRow, study_uid)
        if st is None:
            return None
        entry = self._entry(st, utcnow())
        return _with_result(entry, self._latest_results(s, [study_uid]).get(study_uid))

    async def acknowledge(
        self, study_uid: str, by: str, note: str | None, *, typed_by: str | None = None
    ) -> WorklistEntry | None:
        """Record who acknowledged the study's flag (audited); None if the study is unknown.

        ``by`` is the authenticated principal (the audit actor); ``typed_by``, a name typed by the user,
        is kept in the audit detail as a note only (issue 15: a reader token acknowledged as someone else).
        """
        await self.db.run(self._acknowledge, study_uid, by, note, typed_by)
        return await self.entry(study_uid)

    @staticmethod
    def _acknowledge(s: Session, study_uid: str, by: str, note: str | None, typed_by: str | None) -> None:
        now = utcnow()
        st = s.get(StudyRow, study_uid)
        if st is None:
            return
        st.acknowledged_at, st.acknowledged_by = now, by
        detail = {"note": note} if note else {}
        if typed_by and typed_by != by:
            detail["typed_by"] = typed_by
        s.add(
            AuditRow(at=now, study_uid=study_uid, event="acknowledged", actor=by, detail=json.dumps(detail))
        )

    async def record(self, study_uid: str, event: str, actor: str, detail: dict[str, Any]) -> None:
        """One audit event for a write made through the API (a delivery re-queued, ...), by ``actor``."""
        await self.db.run(self._record, study_uid, event, actor, detail)

    @staticmethod
    def _record(s: Session, study_uid: str, event: str, actor: str, detail: dict[str, Any]) -> None:
        s.add(
            AuditRow(
                at=utcnow(),
                study_uid=study_uid,
                event=event,
                actor=actor,
                detail=json.dumps(detail, sort_keys=True),
            )
        )

    async def audit(self, study_uid: str) -> list[AuditEntry]:
        return await self.db.read(self._audit, study_uid)

    @staticmethod
    def _audit(s: Session, study_uid: str) -> list[AuditEntry]:
        rows = s.scalars(select(AuditRow).where(AuditRow.study_uid == study_uid).order_by(AuditRow.id))
        return [AuditEntry(r.at, r.event, r.actor, json.loads(r.detail or "{}")) for r in rows]


def _with_result(entry: WorklistEntry, result: ResultDigest | None) -> WorklistEntry:
    return replace(entry, result=result)
