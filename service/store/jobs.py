"""The job queue: one analysis of one study per job, claimed under a lease, stat first.

A job is a row (:class:`service.store.db.JobRow`). :func:`schedule` opens or moves a study's pending job
inside the ingest transaction; :meth:`Jobs.claim` flips the most urgent due one ``pending → running`` with a
lease; the lease is heart-beaten while the worker runs; the result is saved by
:mod:`service.store.results` in the transaction that flips the job to ``done``. A crash at any point leaves
either a job that runs again (:meth:`Jobs.recover`) or a finished job with exactly one result.

On PostgreSQL several worker processes claim with ``FOR UPDATE SKIP LOCKED``: they never wait for each
other and never take the same job; a worker that misses its heart-beats loses its jobs to the others.
"""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import bindparam, delete, func, insert, select, update
from sqlalchemy.orm import Session

from service.clock import utcnow
from service.errors import LeaseLostError
from service.store.database import Database
from service.store.db import JobRow, JobState

__all__ = ["JobInfo", "Jobs", "schedule"]


@dataclass(frozen=True)
class JobInfo:
    """A claimed job, as the worker holds it."""

    id: int
    study_uid: str
    priority: int
    attempts: int
    not_before: datetime


# Built once (they run with every arrival; see store/results.py for why).
_PENDING_FOR_UPDATE = (
    select(JobRow.id, JobRow.priority, JobRow.attempts)
    .where(JobRow.study_uid == bindparam("study"), JobRow.state == bindparam("pending"))
    .with_for_update()
)
_UPDATE_JOB = update(JobRow).where(JobRow.id == bindparam("job"))
_INSERT_JOB = insert(JobRow)


def schedule(
    s: Session,
    study_uid: str,
    not_before: datetime,
    priority: int,
    now: datetime,
    *,
    lease_to: Jobs | None = None,
) -> JobInfo | None:
    """One pending job per study: push its gate and raise its priority, or open a new one.

    Called inside the ingest transaction. A job already running or done does not see the new instances,
    so a new pending job is opened; its result will supersede the earlier one. With ``lease_to``, a job
    due now is leased to that :class:`Jobs` at once (returned): the caller runs it without a claim.
    """
    conn = s.connection()
    pending = conn.execute(_PENDING_FOR_UPDATE, {"study": study_uid, "pending": JobState.PENDING}).first()
    priority = min(priority, pending.priority) if pending is not None else priority
    values: dict[str, object] = {"not_before": not_before, "priority": priority}
    leased = lease_to is not None and not_before <= now
    attempts = (pending.attempts if pending is not None else 0) + int(leased)
    if leased:
        assert lease_to is not None
        values |= lease_to.lease_values(now, not_before, attempts)
    if pending is not None:
        conn.execute(_UPDATE_JOB, {"job": pending.id, **values})
        job_id = pending.id
    else:
        values |= {"study_uid": study_uid, "created_at": now, "state": values.get("state", JobState.PENDING)}
        values.setdefault("attempts", 0)
        job_id = conn.execute(_INSERT_JOB, values).inserted_primary_key[0]  # type: ignore[index]
    return JobInfo(int(job_id), study_uid, priority, attempts, not_before) if leased else None


class Jobs:
    """Claim, heart-beat, recover, fail; ``worker_id`` names this process's leases."""

    def __init__(self, db: Database, *, worker_id: str | None = None, lease_seconds: float = 60.0) -> None:
        self.db = db
        self.worker_id = worker_id or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.lease = timedelta(seconds=lease_seconds)

    def lease_values(self, now: datetime, gate: datetime, attempts: int) -> dict[str, object]:
        """The columns that lease a job to this process (a claim, or an ingest that hands its complete
        study straight to a worker)."""
        return {
            "state": JobState.RUNNING,
            "claimed_at": now,
            "ready_at": gate,
            "attempts": attempts,
            "worker_id": self.worker_id,
            "lease_expires_at": now + self.lease,
        }

    def check_lease(
        self, job_id: int, state: str, worker_id: str | None, *, also: tuple[JobState, ...] = ()
    ) -> None:
        """Only the lease holder finishes a job: a worker that stalled past its lease lost the job to
        another one, and its late result must not be a second result. ``also``: other states in which
        the holder may still finish it (``failed``: the failed result written after the last attempt)."""
        if state not in (JobState.RUNNING, *also) or worker_id != self.worker_id:
            raise LeaseLostError(f"job {job_id} is no longer ours (state {state})")

    async def recover(self) -> int:
        """Give back jobs whose worker is gone; returns how many.

        One process on SQLite owns the database, so at its start every ``running`` job is a leftover of a
        crash. On a shared database other workers may be running right now: only jobs whose lease has
        expired are given back (their worker stopped heart-beating).
        """
        return await self.db.run(self._recover)

    def _recover(self, s: Session) -> int:
        """Stale ``running`` jobs back to ``pending``, except where their study already has a pending job
        (instances arrived while it ran, or were re-indexed at this start): that job analyses everything the
        stale one would have, so the stale one is folded into it (its priority kept, the row removed: it has
        no final result, a final result and ``done`` being one transaction; one that stored a
        measurements-pending result is finished with it instead) rather than breaking the one-pending-job
        rule, which made such a start fail. A job re-run from the start forgets its measurements-pending
        result (``result_id``), so the study counts as being analysed again."""
        stale = select(JobRow.id, JobRow.study_uid, JobRow.priority, JobRow.result_id).where(
            JobRow.state == JobState.RUNNING
        )
        if self.db.shared:
            stale = stale.where(JobRow.lease_expires_at < utcnow())
        jobs = s.execute(stale.with_for_update()).all()
        if not jobs:
            return 0
        pending = dict(
            s.execute(
                select(JobRow.study_uid, JobRow.id).where(
                    JobRow.state == JobState.PENDING,
                    JobRow.study_uid.in_(sorted({j.study_uid for j in jobs})),
                )
            ).all()
        )
        for job in jobs:
            if job.study_uid in pending:
                s.execute(
                    update(JobRow)
                    .where(JobRow.id == pending[job.study_uid], JobRow.priority > job.priority)
                    .values(priority=job.priority)
                )
                if job.result_id is None:
                    s.execute(delete(JobRow).where(JobRow.id == job.id))
                else:  # its measurements-pending result stays, its own; the pending job supersedes it
                    s.execute(
                        update(JobRow)
                        .where(JobRow.id == job.id)
                        .values(state=JobState.DONE, finished_at=utcnow(), worker_id=None)
                    )
            else:  # runs again from the start (a measurements-pending result it stored is superseded)
                s.execute(
                    update(JobRow)
                    .where(JobRow.id == job.id)
                    .values(state=JobState.PENDING, claimed_at=None, worker_id=None, result_id=None)
                )
        return len(jobs)

    async def claim(self) -> JobInfo | None:
        """Take the most urgent due job (stat first, then oldest) with a lease; None when there is none.

        ``FOR UPDATE SKIP LOCKED`` on PostgreSQL; SQLite ignores it (one writer thread). An idle worker
        asks a read connection first, so polling never takes the writer from ingest.
        """
        if await self.db.read(self._next_due_by, utcnow()) is None:
            return None
        return await self.db.run(self._claim)

    @staticmethod
    def _next_due_by(s: Session, now: datetime) -> int | None:
        return s.scalars(
            select(JobRow.id).where(JobRow.state == JobState.PENDING, JobRow.not_before <= now).limit(1)
        ).first()

    def _claim(self, s: Session) -> JobInfo | None:
        now = utcnow()
        job = s.scalars(
            select(JobRow)
            .where(JobRow.state == JobState.PENDING, JobRow.not_before <= now)
            .order_by(JobRow.priority, JobRow.not_before, JobRow.id)
            .limit(1)
            .with_for_update(skip_locked=True)
        ).first()
        if job is None:
            return None
        attempts = job.attempts + 1
        for column, value in self.lease_values(now, job.not_before, attempts).items():
            setattr(job, column, value)
        return JobInfo(job.id, job.study_uid, job.priority, attempts, job.not_before)

    async def heartbeat(self, job_ids: Sequence[int]) -> int:
        """Extend the leases of our running jobs; returns how many are still ours."""
        if not job_ids:
            return 0
        return await self.db.run(self._heartbeat, list(job_ids))

    def _heartbeat(self, s: Session, job_ids: list[int]) -> int:
        res = s.execute(
            update(JobRow)
            .where(
                JobRow.id.in_(job_ids), JobRow.state == JobState.RUNNING, JobRow.worker_id == self.worker_id
            )
            .values(lease_expires_at=utcnow() + self.lease)
        )
        return int(res.rowcount or 0)  # type: ignore[attr-defined]

    async def fail(self, job_id: int, error: str, max_attempts: int) -> JobState:
        """Record a failed attempt; the job goes back to pending until ``max_attempts``. Returns the state."""
        return await self.db.run(self._fail, job_id, error, max_attempts)

    def _fail(self, s: Session, job_id: int, error: str, max_attempts: int) -> JobState:
        job = s.get(JobRow, job_id, with_for_update=True)
        assert job is not None
        self.check_lease(job.id, job.state, job.worker_id)
        job.error = error[:2000]
        job.state = JobState.FAILED if job.attempts >= max_attempts else JobState.PENDING
        job.result_id = None  # a measurements-pending result it stored is superseded by the next attempt's
        job.not_before = utcnow() + timedelta(seconds=1)
        return JobState(job.state)

    async def release_holds(self, until: datetime) -> int:
        """At start: no association is open in a fresh process, so no job is held for one any more; a held
        job's gate becomes ``until`` (now + the quiet time). Returns how many were held."""
        return await self.db.run(self._release_holds, until)

    @staticmethod
    def _release_holds(s: Session, until: datetime) -> int:
        res = s.execute(
            update(JobRow)
            .where(JobRow.state == JobState.PENDING, JobRow.not_before > until)
            .values(not_before=until)
        )
        return int(res.rowcount or 0)  # type: ignore[attr-defined]

    async def backlog(self) -> int:
        """Jobs due and waiting for a worker: the back-pressure readiness and /metrics report."""
        return await self.db.read(self._backlog)

    @staticmethod
    def _backlog(s: Session) -> int:
        due = select(func.count()).where(JobRow.state == JobState.PENDING, JobRow.not_before <= utcnow())
        return int(s.scalar(due) or 0)

    async def next_due(self) -> datetime | None:
        """When the earliest pending job becomes due (for the worker's sleep)."""
        return await self.db.read(self._next_due)

    @staticmethod
    def _next_due(s: Session) -> datetime | None:
        return s.scalars(
            select(JobRow.not_before).where(JobRow.state == JobState.PENDING).order_by(JobRow.not_before)
        ).first()
