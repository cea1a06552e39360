"""The outbox: result objects (SR, preview) we created, and their delivery to each destination.

Two durable stages, each its own transaction, so a crash anywhere is repaired by running the stage again:

1. **render**: a result row with ``rendered_at`` NULL still needs its objects. Writing them records the
   output rows, one delivery row per destination and ``rendered_at`` together. A crash before that commit
   leaves the result unrendered; it is rendered again (new UIDs: nothing was sent yet).
2. **deliver**: a delivery row is ``pending`` until a destination answered success (``done``, final: never
   sent again) or it failed ``max_attempts`` times (``dead``: visible in the API, can be re-queued). A row
   left ``sending`` by a crash goes back to ``pending``; at worst that one object is sent twice with the
   same SOP Instance UID, which a PACS stores once.
"""

from __future__ import annotations

import builtins
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from service.clock import utcnow
from service.results.schema import Priority, StudyResult
from service.store.database import Database
from service.store.db import DeliveryRow, NotificationRow, OutboxState, OutputRow, ResultRow
from service.store.instances import Instances

__all__ = ["DeliveryInfo", "NewOutput", "Outbox", "OutputRef", "PendingRender", "record_attempt"]


@dataclass(frozen=True)
class PendingRender:
    result: StudyResult


@dataclass(frozen=True)
class NewOutput:
    """An object written to disk by the renderer, to be recorded with its deliveries."""

    sop_instance_uid: str
    series_uid: str
    sop_class_uid: str
    kind: str
    relpath: str


@dataclass(frozen=True)
class OutputRef:
    """Enough of an earlier object to reference it (an SR's predecessor)."""

    study_uid: str
    series_uid: str
    sop_instance_uid: str
    sop_class_uid: str
    result_id: str | None = None
    """The result it was made for."""


@dataclass(frozen=True)
class DeliveryInfo:
    id: int
    sop_instance_uid: str
    destination: str
    state: str
    priority: int
    attempts: int
    kind: str
    study_uid: str
    path: Path
    next_attempt_at: datetime
    delivered_at: datetime | None
    last_error: str | None


def record_attempt(
    row: DeliveryRow | NotificationRow,
    error: str | None,
    now: datetime,
    max_attempts: int,
    backoff: float,
    backoff_max: float,
) -> None:
    """One attempt on an outbox row: ``done``; or ``pending`` after an exponential backoff; or ``dead``."""
    row.attempts += 1
    if error is None:
        row.state, row.delivered_at, row.last_error = OutboxState.DONE, now, None
        return
    row.last_error = error[:2000]
    if row.attempts >= max_attempts:
        row.state = OutboxState.DEAD
        return
    row.state = OutboxState.PENDING
    row.next_attempt_at = now + timedelta(seconds=min(backoff_max, backoff * 2 ** (row.attempts - 1)))


RENDER_LEASE = timedelta(minutes=5)
"""How long a renderer owns a result (several worker processes on one database); rendering takes a second."""

SENDING_LEASE = timedelta(minutes=5)
"""A delivery left ``sending`` this long on a shared database belongs to a process that died."""


class Outbox:
    """The render queue and the deliveries; ``instances`` finds the stored images a rendering needs."""

    def __init__(self, db: Database, outputs_dir: Path, instances: Instances) -> None:
        self.db = db
        self.instances = instances
        self.outputs_dir = outputs_dir
        outputs_dir.mkdir(parents=True, exist_ok=True)

    # ---- render stage --------------------------------------------------------------------------------

    async def pending_renders(self) -> list[PendingRender]:
        """Results still needing objects, newest per study only (older ones are marked done, unrendered)."""
        return await self.db.run(self._pending_renders)

    def _pending_renders(self, s: Session) -> list[PendingRender]:
        now = utcnow()
        rows = s.scalars(
            select(ResultRow)
            .where(
                ResultRow.rendered_at.is_(None),
                (ResultRow.render_lease_until.is_(None)) | (ResultRow.render_lease_until < now),
            )
            .order_by(ResultRow.created_at)
            .with_for_update(skip_locked=True)
        ).all()
        newest: dict[str, ResultRow] = {}
        for row in rows:
            older = newest.get(row.study_uid)
            if older is not None:
                older.rendered_at = now  # superseded before it was rendered: nothing to send
            newest[row.study_uid] = row
        for row in newest.values():  # ours to render for a while; another process skips them
            row.render_lease_until = now + RENDER_LEASE
        return [PendingRender(StudyResult.model_validate_json(r.body)) for r in newest.values()]

    async def source_paths(self, sop_uids: Sequence[str]) -> dict[str, Path]:
        """Stored files of the instances a rendering references (see :meth:`Instances.paths`)."""
        return await self.instances.paths(sop_uids)

    async def latest_sr(self, study_uid: str) -> OutputRef | None:
        """The newest SR we wrote for the study: the next SR names it as its predecessor."""
        return await self.db.read(self._latest_sr, study_uid)

    def _latest_sr(self, s: Session, study_uid: str) -> OutputRef | None:
        row = s.scalars(
            select(OutputRow)
            .where(OutputRow.study_uid == study_uid, OutputRow.kind == "sr")
            .order_by(OutputRow.created_at.desc())
        ).first()
        if row is None:
            return None
        return OutputRef(
            row.study_uid, row.series_uid, row.sop_instance_uid, row.sop_class_uid, row.result_id
        )

    async def record(
        self, result: StudyResult, outputs: Sequence[NewOutput], destinations: Sequence[str]
    ) -> None:
        """Outputs, their deliveries and ``rendered_at`` in one transaction."""
        await self.db.run(self._record, result, list(outputs), list(destinations))

    def _record(
        self, s: Session, result: StudyResult, outputs: list[NewOutput], destinations: list[str]
    ) -> None:
        now = utcnow()
        row = s.get(ResultRow, result.result_id)
        if row is None or row.rendered_at is not None:
            return  # rendered meanwhile (cannot happen with one renderer; harmless if it does)
        for out in outputs:
            s.add(
                OutputRow(
                    sop_instance_uid=out.sop_instance_uid,
                    result_id=result.result_id,
                    study_uid=result.study_uid,
                    series_uid=out.series_uid,
                    sop_class_uid=out.sop_class_uid,
                    kind=out.kind,
                    path=out.relpath,
                    created_at=now,
                )
            )
        s.flush()
        for out in outputs:
            for dest in destinations:
                s.add(
                    DeliveryRow(
                        sop_instance_uid=out.sop_instance_uid,
                        destination=dest,
                        state=OutboxState.PENDING,
                        priority=Priority.of(result.priority),
                        attempts=0,
                        created_at=now,
                        next_attempt_at=now,
                    )
                )
        row.rendered_at = now

    # ---- deliver stage -------------------------------------------------------------------------------

    async def recover(self) -> int:
        """Deliveries left ``sending`` by a crash go back to ``pending``; returns how many."""
        return await self.db.run(self._recover)

    def _recover(self, s: Session) -> int:
        if not self.db.shared:  # renders cut short by a crash: ours again now, not in 5 minutes
            s.execute(
                update(ResultRow)
                .where(ResultRow.rendered_at.is_(None), ResultRow.render_lease_until.is_not(None))
                .values(render_lease_until=None)
            )
        query = update(DeliveryRow).where(DeliveryRow.state == OutboxState.SENDING)
        if self.db.shared:  # other processes may be sending right now: only stale claims
            query = query.where(DeliveryRow.claimed_at < utcnow() - SENDING_LEASE)
        res = s.execute(query.values(state=OutboxState.PENDING))
        return int(res.rowcount or 0)  # type: ignore[attr-defined]

    async def claim(self, limit: int = 64) -> list[DeliveryInfo]:
        """Due deliveries, most urgent first, marked ``sending``."""
        return await self.db.run(self._claim, limit)

    def _claim(self, s: Session, limit: int) -> list[DeliveryInfo]:
        now = utcnow()
        rows = s.execute(
            select(DeliveryRow, OutputRow)
            .join(OutputRow, OutputRow.sop_instance_uid == DeliveryRow.sop_instance_uid)
            .where(DeliveryRow.state == OutboxState.PENDING, DeliveryRow.next_attempt_at <= now)
            .order_by(DeliveryRow.priority, DeliveryRow.next_attempt_at, DeliveryRow.id)
            .limit(limit)
            .with_for_update(of=DeliveryRow, skip_locked=True)
        ).all()
        infos = []
        for d, o in rows:
            d.state, d.claimed_at = OutboxState.SENDING, now
            infos.append(self._info(d, o))
        return infos

    def _info(self, d: DeliveryRow, o: OutputRow) -> DeliveryInfo:
        return DeliveryInfo(
            id=d.id,
            sop_instance_uid=d.sop_instance_uid,
            destination=d.destination,
            state=d.state,
            priority=d.priority,
            attempts=d.attempts,
            kind=o.kind,
            study_uid=o.study_uid,
            path=self.outputs_dir / o.path,
            next_attempt_at=d.next_attempt_at,
            delivered_at=d.delivered_at,
            last_error=d.last_error,
        )

    async def finish(
        self, delivery_id: int, *, error: str | None, max_attempts: int, backoff: float, backoff_max: float
    ) -> str:
        """Record one attempt: ``done`` on success, else ``pending`` with exponential backoff or ``dead``."""
        return await self.db.run(self._finish, delivery_id, error, max_attempts, backoff, backoff_max)

    @staticmethod
    def _finish(
        s: Session, delivery_id: int, error: str | None, max_attempts: int, backoff: float, backoff_max: float
    ) -> str:
        now = utcnow()
        d = s.get(DeliveryRow, delivery_id)
        assert d is not None
        record_attempt(d, error, now, max_attempts, backoff, backoff_max)
        return d.state

    async def next_due(self) -> datetime | None:
        return await self.db.read(self._next_due)

    def _next_due(self, s: Session) -> datetime | None:
        return s.scalars(
            select(DeliveryRow.next_attempt_at)
            .where(DeliveryRow.state == OutboxState.PENDING)
            .order_by(DeliveryRow.next_attempt_at)
        ).first()

    # ---- reading and operator actions ------------------------------------------------------------------

    async def list(self, state: str | None = None, limit: int = 200) -> list[DeliveryInfo]:
        return await self.db.read(self._list, state, limit)

    def _list(
        self, s: Session, state: str | None, limit: int
    ) -> builtins.list[DeliveryInfo]:  # list: the method
        query = select(DeliveryRow, OutputRow).join(
            OutputRow, OutputRow.sop_instance_uid == DeliveryRow.sop_instance_uid
        )
        if state:
            query = query.where(DeliveryRow.state == state)
        rows = s.execute(query.order_by(DeliveryRow.id.desc()).limit(limit)).all()
        return [self._info(d, o) for d, o in rows]

    async def requeue(self, delivery_id: int) -> DeliveryInfo | None:
        """A dead delivery back to ``pending`` with its attempts reset (after fixing the destination)."""
        return await self.db.run(self._requeue, delivery_id)

    def _requeue(self, s: Session, delivery_id: int) -> DeliveryInfo | None:
        d = s.get(DeliveryRow, delivery_id)
        if d is None:
            return None
        if d.state == OutboxState.DEAD:
            d.state, d.attempts, d.next_attempt_at = OutboxState.PENDING, 0, utcnow()
        o = s.get(OutputRow, d.sop_instance_uid)
        assert o is not None
        return self._info(d, o)
