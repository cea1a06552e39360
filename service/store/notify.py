"""Notifications outbox: webhook, escalation, HL7 and FHIR messages about flags, with retry and audit.

Rows are created in the result's own transaction (:class:`service.store.results.Results` calls
:func:`enqueue`), so a result is never stored without its notifications; escalations are created by
:meth:`NotifyStore.escalate`. What is sent is built at send time from the stored result (the payload is
not stored twice). Each successful send is written to the study's audit trail.
"""

from __future__ import annotations

import builtins
import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from urllib.parse import urlsplit

from sqlalchemy import insert, select, update
from sqlalchemy.orm import Session

from service.clock import utcnow
from service.results.schema import Priority, StudyResult
from service.store.database import Database
from service.store.db import (
    AuditRow,
    InstanceRow,
    NotificationRow,
    OutboxState,
    ResultRow,
    StudyRow,
)
from service.store.outbox import record_attempt

__all__ = ["NotificationInfo", "NotifyStore", "Targets", "enqueue", "shown_target"]

Targets = Callable[[StudyResult], Sequence[tuple[str, str]]]
"""(channel, target) pairs a stored result should notify; set by the app from the notify settings."""


def enqueue(s: Session, result: StudyResult, targets: Sequence[tuple[str, str]], now: datetime) -> None:
    """Add one pending notification per target (inside the caller's transaction)."""
    if not targets:
        return
    rank = Priority.of(result.priority)
    s.connection().execute(
        insert(NotificationRow),
        [
            {
                "study_uid": result.study_uid,
                "result_id": result.result_id,
                "channel": channel,
                "target": target,
                "state": OutboxState.PENDING,
                "priority": rank,
                "attempts": 0,
                "created_at": now,
                "next_attempt_at": now,
            }
            for channel, target in targets
        ],
    )


@dataclass(frozen=True)
class NotificationInfo:
    """What a sender gets: the message's target and everything it is about."""

    id: int
    channel: str
    target: str
    study_uid: str
    accession_number: str | None
    priority: int
    attempts: int
    result: StudyResult | None
    header_path: Path | None
    """One stored instance of the study (for demographics an HL7 PID segment needs), if any is left."""
    state: str = "sending"
    last_error: str | None = None
    created_at: datetime | None = None
    delivered_at: datetime | None = None


def shown_target(target: str) -> str:
    """A notification target as the API and the logs may show it: a URL without credentials, path or query.

    Chat webhooks (Slack, Teams, Mattermost) carry their key in the path, others in the query string or as
    ``user:password@``: the URL is a credential. The scheme, host and a short digest of the whole URL
    still tell two targets apart. Anything that is not an http(s) URL (an HL7 ``host:port``) is shown as is.
    """
    parts = urlsplit(target)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return target
    if not (parts.username or parts.password or parts.path.strip("/") or parts.query or parts.fragment):
        return target
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    try:
        port = f":{parts.port}" if parts.port is not None else ""
    except ValueError:  # a port that is not a number: show none
        port = ""
    digest = hashlib.sha256(target.encode()).hexdigest()[:8]
    return f"{parts.scheme}://{host}{port}/… (#{digest})"


class NotifyStore:
    """The notifications outbox; ``instances_dir`` to find a study's stored instance for HL7 demographics."""

    def __init__(self, db: Database, instances_dir: Path) -> None:
        self.db = db
        self.instances_dir = instances_dir

    async def recover(self) -> int:
        return await self.db.run(self._recover)

    def _recover(self, s: Session) -> int:
        query = update(NotificationRow).where(NotificationRow.state == OutboxState.SENDING)
        if self.db.shared:  # other processes may be sending right now: only stale claims
            query = query.where(NotificationRow.claimed_at < utcnow() - timedelta(minutes=5))
        res = s.execute(query.values(state=OutboxState.PENDING))
        return int(res.rowcount or 0)  # type: ignore[attr-defined]

    async def claim(self, limit: int = 32) -> list[NotificationInfo]:
        return await self.db.run(self._claim, limit)

    def _claim(self, s: Session, limit: int) -> list[NotificationInfo]:
        now = utcnow()
        rows = s.scalars(
            select(NotificationRow)
            .where(NotificationRow.state == OutboxState.PENDING, NotificationRow.next_attempt_at <= now)
            .order_by(NotificationRow.priority, NotificationRow.next_attempt_at, NotificationRow.id)
            .limit(limit)
            .with_for_update(skip_locked=True)
        ).all()
        for r in rows:
            r.state, r.claimed_at = OutboxState.SENDING, now
        return [self._info(s, r) for r in rows]

    def _info(self, s: Session, r: NotificationRow) -> NotificationInfo:
        study = s.get(StudyRow, r.study_uid)
        body = (
            s.scalar(select(ResultRow.body).where(ResultRow.result_id == r.result_id))
            if r.result_id
            else None
        )
        if body is None:  # an escalation: the study's newest result
            body = s.scalars(
                select(ResultRow.body)
                .where(ResultRow.study_uid == r.study_uid)
                .order_by(ResultRow.created_at.desc(), ResultRow.job_id.desc())
            ).first()
        header = s.scalar(select(InstanceRow.path).where(InstanceRow.study_uid == r.study_uid).limit(1))
        return NotificationInfo(
            id=r.id,
            channel=r.channel,
            target=r.target,
            study_uid=r.study_uid,
            accession_number=study.accession_number if study else None,
            priority=r.priority,
            attempts=r.attempts,
            result=StudyResult.model_validate_json(body) if body else None,
            header_path=self.instances_dir / header if header else None,
            state=r.state,
            last_error=r.last_error,
            created_at=r.created_at,
            delivered_at=r.delivered_at,
        )

    async def finish(
        self, n: NotificationInfo, *, error: str | None, max_attempts: int, backoff: float
    ) -> str:
        return await self.db.run(self._finish, n, error, max_attempts, backoff)

    @staticmethod
    def _finish(s: Session, n: NotificationInfo, error: str | None, max_attempts: int, backoff: float) -> str:
        now = utcnow()
        row = s.get(NotificationRow, n.id)
        assert row is not None
        record_attempt(row, error, now, max_attempts, backoff, backoff_max=600.0)
        if row.state in (OutboxState.DONE, OutboxState.DEAD):
            detail = {
                "channel": row.channel,
                "target": shown_target(row.target),
                "attempts": row.attempts,
            }
            if row.state == OutboxState.DEAD:
                detail["error"] = (error or "")[:200]
            s.add(
                AuditRow(
                    at=now,
                    study_uid=row.study_uid,
                    event="notified" if row.state == OutboxState.DONE else "notify_failed",
                    actor="pacs-triage",
                    detail=json.dumps(detail, sort_keys=True),
                )
            )
        return row.state

    async def next_due(self) -> datetime | None:
        return await self.db.read(self._next_due)

    @staticmethod
    def _next_due(s: Session) -> datetime | None:
        return s.scalars(
            select(NotificationRow.next_attempt_at)
            .where(NotificationRow.state == OutboxState.PENDING)
            .order_by(NotificationRow.next_attempt_at)
        ).first()

    async def escalate(self, minutes: float, targets: Sequence[str]) -> int:
        """Queue escalations for urgent/stat flags unacknowledged for ``minutes``; returns the study count."""
        return await self.db.run(self._escalate, minutes, list(targets))

    @staticmethod
    def _escalate(s: Session, minutes: float, targets: list[str]) -> int:
        now = utcnow()
        studies = s.scalars(
            select(StudyRow)
            .where(
                StudyRow.ai_priority <= Priority.URGENT,
                StudyRow.acknowledged_at.is_(None),
                StudyRow.escalated_at.is_(None),
                StudyRow.flagged_at <= now - timedelta(minutes=minutes),
            )
            .with_for_update(skip_locked=True)
        ).all()
        for st in studies:
            st.escalated_at = now
            for target in targets:
                s.add(
                    NotificationRow(
                        study_uid=st.study_uid,
                        result_id=None,
                        channel="escalation",
                        target=target,
                        state=OutboxState.PENDING,
                        priority=st.ai_priority,
                        attempts=0,
                        created_at=now,
                        next_attempt_at=now,
                    )
                )
            detail = {"after_minutes": minutes, "targets": len(targets)}
            s.add(
                AuditRow(
                    at=now,
                    study_uid=st.study_uid,
                    event="escalated",
                    actor="pacs-triage",
                    detail=json.dumps(detail, sort_keys=True),
                )
            )
        return len(studies)

    async def list(self, state: str | None = None, limit: int = 200) -> list[NotificationInfo]:
        return await self.db.read(self._list, state, limit)

    def _list(
        self, s: Session, state: str | None, limit: int
    ) -> builtins.list[NotificationInfo]:  # list: the method
        query = select(NotificationRow)
        if state:
            query = query.where(NotificationRow.state == state)
        rows = s.scalars(query.order_by(NotificationRow.id.desc()).limit(limit)).all()
        return [self._info(s, r) for r in rows]
