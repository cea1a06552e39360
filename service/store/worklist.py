"""Worklist reads and acknowledgements on the store (the priority itself is written with each result, in
:meth:`service.store.repository.Store._save_result`, by :func:`service.worklist.policy.raise_only`)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from service.results.schema import StudyResult
from service.store.db import AuditRow, ResultRow, StudyRow, utcnow
from service.store.repository import Store
from service.worklist.policy import RANK_NAME, effective_priority

__all__ = ["AuditEntry", "WorklistEntry", "WorklistStore"]


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
    result: StudyResult | None
    rank: int = field(repr=False, default=2)


@dataclass(frozen=True)
class AuditEntry:
    at: datetime
    event: str
    actor: str
    detail: dict[str, object]


class WorklistStore:
    def __init__(self, store: Store, *, max_wait_minutes: float) -> None:
        self.store = store
        self.max_wait_minutes = max_wait_minutes

    async def entries(
        self, *, state: str = "open", priority: str | None = None, limit: int = 200
    ) -> list[WorklistEntry]:
        """Priority first (stat, urgent, routine), then longest waiting; ``state``: open|acknowledged|all."""
        return await self.store._call(self._entries, state, priority, limit)

    def _entries(self, state: str, priority: str | None, limit: int) -> list[WorklistEntry]:
        now = utcnow()
        with Session(self.store.engine) as s:
            query = select(StudyRow)
            if state == "open":
                query = query.where(StudyRow.acknowledged_at.is_(None))
            elif state == "acknowledged":
                query = query.where(StudyRow.acknowledged_at.is_not(None))
            studies = list(s.scalars(query))
            entries = [self._entry(st, now) for st in studies]
            if priority:
                entries = [e for e in entries if e.priority == priority]
            entries.sort(key=lambda e: (e.rank, e.first_received))
            entries = entries[:limit]
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
    def _latest_results(s: Session, study_uids: list[str]) -> dict[str, StudyResult]:
        if not study_uids:
            return {}
        rows = s.execute(
            select(ResultRow.study_uid, ResultRow.body)
            .where(ResultRow.study_uid.in_(study_uids))
            .order_by(ResultRow.created_at, ResultRow.job_id)
        ).all()
        return {uid: StudyResult.model_validate_json(body) for uid, body in rows}  # newest wins

    async def entry(self, study_uid: str) -> WorklistEntry | None:
        return await self.store._call(self._one, study_uid)

    def _one(self, study_uid: str) -> WorklistEntry | None:
        with Session(self.store.engine) as s:
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
        await self.store._call(self._acknowledge, study_uid, by, note, typed_by)
        return await self.entry(study_uid)

    def _acknowledge(self, study_uid: str, by: str, note: str | None, typed_by: str | None) -> None:
        now = utcnow()
        with Session(self.store.engine) as s, s.begin():
            st = s.get(StudyRow, study_uid)
            if st is None:
                return
            st.acknowledged_at, st.acknowledged_by = now, by
            detail = {"note": note} if note else {}
            if typed_by and typed_by != by:
                detail["typed_by"] = typed_by
            s.add(
                AuditRow(
                    at=now, study_uid=study_uid, event="acknowledged", actor=by, detail=json.dumps(detail)
                )
            )

    async def record(self, study_uid: str, event: str, actor: str, detail: dict[str, Any]) -> None:
        """One audit event for a write made through the API (a delivery re-queued, ...), by ``actor``."""
        await self.store._call(self._record, study_uid, event, actor, detail)

    def _record(self, study_uid: str, event: str, actor: str, detail: dict[str, Any]) -> None:
        with Session(self.store.engine) as s, s.begin():
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
        return await self.store._call(self._audit, study_uid)

    def _audit(self, study_uid: str) -> list[AuditEntry]:
        with Session(self.store.engine) as s:
            rows = s.scalars(select(AuditRow).where(AuditRow.study_uid == study_uid).order_by(AuditRow.id))
            return [AuditEntry(r.at, r.event, r.actor, json.loads(r.detail or "{}")) for r in rows]


def _with_result(entry: WorklistEntry, result: StudyResult | None) -> WorklistEntry:
    return replace(entry, result=result)
