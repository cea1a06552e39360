"""The store's operations: ingest instances, schedule/claim/finish jobs, save and read results.

Synchronous SQLAlchemy calls run on a dedicated thread pool and never on the event loop. For SQLite the
pool has one thread: SQLite serialises writers anyway, and one writer thread turns "database is locked"
retries into a plain queue and makes check-then-insert (duplicate SOP instances) race-free. A server
database gets more threads; the duplicate check then also relies on the primary key.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import ParamSpec, TypeVar

from sqlalchemy import Engine, func, select, update
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.orm import Session

from service.assemble import SeriesFill, end_gate, study_gate
from service.config import AssemblySettings
from service.errors import SopInstanceConflictError, StorageFullError, StudyTooLargeError, TriageError
from service.results.schema import PRIORITY_RANK, StudyResult
from service.store.db import (
    AuditRow,
    InstanceRow,
    JobRow,
    ResultRow,
    SeriesRow,
    StudyRow,
    make_engine,
    utcnow,
)
from service.store.files import check_free_space, instance_relpath, write_durably
from service.store.notify import Targets, enqueue
from service.store.validate import ParsedInstance
from service.worklist.policy import raise_only

__all__ = ["InstanceRecord", "JobInfo", "LeaseLostError", "Store", "StudyStatus"]

logger = logging.getLogger(__name__)

P = ParamSpec("P")
T = TypeVar("T")


def _database_full(exc: OperationalError) -> bool:
    """SQLite's SQLITE_FULL (13) or PostgreSQL's disk_full (SQLSTATE 53100)."""
    orig = exc.orig
    return getattr(orig, "sqlite_errorcode", None) == 13 or getattr(orig, "sqlstate", None) == "53100"


class LeaseLostError(TriageError):
    """The job's lease expired and another worker took it: drop this attempt's work."""


@dataclass(frozen=True)
class JobInfo:
    id: int
    study_uid: str
    priority: int
    attempts: int
    not_before: datetime


@dataclass(frozen=True)
class InstanceRecord:
    sop_instance_uid: str
    series_uid: str
    sop_class_uid: str
    modality: str | None
    body_part: str | None
    path: Path
    expected_in_series: int | None = None
    """ImagesInAcquisition of the instance's series, when the sender declared it."""


@dataclass(frozen=True)
class StudyStatus:
    """What GET result needs: does the study exist, is work outstanding, the latest result."""

    exists: bool
    outstanding: bool
    result: StudyResult | None
    accession_number: str | None = None
    first_received: datetime | None = None
    last_received: datetime | None = None


class Store:
    """Files under ``instances_dir`` plus SQL rows; every public method is a coroutine."""

    def __init__(
        self,
        url: str,
        instances_dir: Path,
        *,
        sqlite_synchronous: str = "FULL",
        disk_high_watermark: float = 1.0,
        max_instances_per_study: int | None = None,
        worker_id: str | None = None,
        lease_seconds: float = 60.0,
    ) -> None:
        self.instances_dir = instances_dir
        self.shared = not url.startswith("sqlite")
        """A server database that other processes use too: leases instead of resetting at start."""
        self.worker_id = worker_id or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.lease = timedelta(seconds=lease_seconds)
        self.disk_high_watermark = disk_high_watermark
        self.max_instances_per_study = max_instances_per_study
        self.notification_targets: Targets = lambda _result: ()
        """Which notifications a stored result creates (set by the app from the notify settings)."""
        instances_dir.mkdir(parents=True, exist_ok=True)
        self.engine: Engine = make_engine(url, sqlite_synchronous=sqlite_synchronous)
        workers = 1 if url.startswith("sqlite") else 4
        self._db = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="store-db")

    async def _call(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._db, lambda: fn(*args, **kwargs))

    def close(self) -> None:
        self._db.shutdown(wait=True)
        self.engine.dispose()

    # ---- ingest -------------------------------------------------------------------------------------

    async def ingest(
        self, instances: Sequence[ParsedInstance], *, not_before: datetime, priority: int = 2
    ) -> list[str]:
        """Store instances durably (file then row) and schedule a job per study; returns stored SOP UIDs.

        An instance already stored (same SOPInstanceUID) is not written again and counts as a success, as
        a C-STORE retry must. ``not_before`` is when the study may run: now for an HTTP request that has
        ended, now + quiet time for instances trickling in over DICOM (earlier once the study is known to
        be full, see :func:`service.assemble.study_gate`).
        """
        known = await self._call(self._known_sops, [p.sop_instance_uid for p in instances], instances)
        fresh: dict[str, ParsedInstance] = {}
        for p in instances:
            if p.sop_instance_uid not in known:
                fresh.setdefault(p.sop_instance_uid, p)
        written = await asyncio.gather(
            *(asyncio.to_thread(self._write, p) for p in fresh.values()), return_exceptions=True
        )
        failure = next((w for w in written if isinstance(w, BaseException)), None)
        try:
            if failure is not None:
                raise failure
            await self._call(self._insert_retrying, list(fresh.values()), not_before, priority)
        except BaseException:
            await asyncio.to_thread(
                self._discard,
                [p for p, w in zip(fresh.values(), written, strict=True) if not isinstance(w, BaseException)],
            )
            raise
        return [p.sop_instance_uid for p in instances]

    def ingest_blocking(
        self,
        instance: ParsedInstance,
        *,
        not_before: datetime,
        priority: int = 2,
        hold_until: datetime | None = None,
        complete_when_full: bool = True,
    ) -> tuple[bool, bool]:
        """:meth:`ingest` for one instance from a listener thread (no event loop hop).

        Returns ``(new, due_now)``: whether the instance was new, and whether its study's job may run now
        (its series became full), so the caller wakes the workers only then. The DICOM listener answers
        each C-STORE on its association's own thread: it writes the file there and queues only the two
        short DB calls on the store's DB thread. ``hold_until``: the association is open, so a series short
        of its declared count waits until then rather than for the quiet timer
        (:func:`service.assemble.study_gate`).
        """
        if self._db.submit(self._known_sops, [instance.sop_instance_uid], [instance]).result():
            return False, False
        self._write(instance)
        try:
            gates = self._db.submit(
                self._insert_retrying, [instance], not_before, priority, hold_until, complete_when_full
            ).result()
        except BaseException:
            self._discard([instance])
            raise
        now = utcnow()
        return True, any(gate <= now for gate in gates)

    def _write(self, p: ParsedInstance) -> None:
        check_free_space(self.instances_dir, self.disk_high_watermark)
        write_durably(
            self.instances_dir, instance_relpath(p.study_uid, p.series_uid, p.sop_instance_uid), p.data
        )

    def _discard(self, written: list[ParsedInstance]) -> None:
        """Remove files whose row was never committed, so a failed store leaves nothing behind.

        A file whose row exists (the same instance committed meanwhile by another association) is kept.
        """
        if not written:
            return
        committed = self._db.submit(self._known_sops, [p.sop_instance_uid for p in written]).result()
        for p in written:
            if p.sop_instance_uid not in committed:
                rel = instance_relpath(p.study_uid, p.series_uid, p.sop_instance_uid)
                (self.instances_dir / rel).unlink(missing_ok=True)

    def _known_sops(self, sops: list[str], incoming: Sequence[ParsedInstance] = ()) -> set[str]:
        """The SOP UIDs already stored. With ``incoming``: a UID stored (or sent twice) in another study is
        a :class:`SopInstanceConflictError` (409 / 0xA900), never a duplicate acknowledged and dropped."""
        with Session(self.engine) as s:
            rows = s.execute(
                select(InstanceRow.sop_instance_uid, InstanceRow.study_uid).where(
                    InstanceRow.sop_instance_uid.in_(sops)
                )
            ).all()
        holder = dict(rows)
        for p in incoming:
            other = holder.setdefault(p.sop_instance_uid, p.study_uid)
            if other != p.study_uid:
                raise SopInstanceConflictError(
                    f"SOP Instance UID {p.sop_instance_uid} already names an instance of study {other};"
                    " one UID is one instance (PS3.3 C.12.1.1.1): give this one its own UID",
                    part="SOPInstanceUID",
                    extra={"sop_instance_uid": p.sop_instance_uid, "conflicting_study": other},
                )
        return {sop for sop, _ in rows}

    def _insert_retrying(
        self,
        fresh: list[ParsedInstance],
        not_before: datetime,
        priority: int,
        hold_until: datetime | None = None,
        complete_when_full: bool = True,
    ) -> list[datetime]:
        """:meth:`_insert`, again after losing a race with another process (same instance, series or
        pending job inserted meanwhile): the retry sees their rows and joins them."""
        for attempt in range(4):
            try:
                return self._insert(fresh, not_before, priority, hold_until, complete_when_full)
            except IntegrityError:
                if attempt == 3:
                    raise
                logger.debug("ingest lost an insert race; retrying")
            except OperationalError as exc:
                if _database_full(exc):  # the sender should retry later (0xA700 / 507), like a full disk
                    raise StorageFullError("the database has no space left; try again later") from exc
                raise
        raise AssertionError("unreachable")

    def _insert(
        self,
        fresh: list[ParsedInstance],
        not_before: datetime,
        priority: int,
        hold_until: datetime | None = None,
        complete_when_full: bool = True,
    ) -> list[datetime]:
        """Rows for the fresh instances; returns the gate of each study (re)scheduled."""
        now = utcnow()
        gates: list[datetime] = []
        # Only studies that gained an image need (re-)analysis: a retry, an SR or our own result coming
        # back from the PACS changes nothing.
        studies = sorted({p.study_uid for p in fresh if p.role == "image"})
        # A study of non-image objects only (SR, RT, waveforms, no pixel data) still gets an answer: one
        # job, whose result says "not analysed" and why, unless the study already has a job of its own.
        others = sorted({p.study_uid for p in fresh if p.role == "other"} - set(studies))
        with Session(self.engine) as s, s.begin():
            for p in fresh:
                if s.get(InstanceRow, p.sop_instance_uid) is not None:
                    continue  # stored meanwhile by a concurrent request: stored once, still a success
                # Row lock (PostgreSQL): ingests of one study by several processes take turns.
                study = s.get(StudyRow, p.study_uid, with_for_update=True)
                if study is None:
                    study = StudyRow(
                        study_uid=p.study_uid, first_received=now, last_received=now, instance_count=0
                    )
                    s.add(study)
                if self.max_instances_per_study and study.instance_count >= self.max_instances_per_study:
                    raise StudyTooLargeError(
                        f"the study already has {study.instance_count} instances, the configured maximum",
                        part="StudyInstanceUID",
                    )
                study.instance_count += 1
                study.last_received = now
                if p.accession_number and not study.accession_number:
                    study.accession_number = p.accession_number[:16]
                series = s.get(SeriesRow, p.series_uid)
                if series is None:
                    s.add(
                        SeriesRow(
                            series_uid=p.series_uid,
                            study_uid=p.study_uid,
                            modality=p.modality,
                            body_part=p.body_part,
                            expected_instances=p.expected_in_series,
                        )
                    )
                elif series.expected_instances is None and p.expected_in_series is not None:
                    series.expected_instances = p.expected_in_series
                s.flush()
                s.add(
                    InstanceRow(
                        sop_instance_uid=p.sop_instance_uid,
                        series_uid=p.series_uid,
                        study_uid=p.study_uid,
                        sop_class_uid=p.sop_class_uid,
                        transfer_syntax_uid=p.transfer_syntax_uid,
                        path=instance_relpath(p.study_uid, p.series_uid, p.sop_instance_uid).as_posix(),
                        received_at=now,
                        role=p.role,
                    )
                )
            s.flush()
            for study_uid in studies:
                if s.get(StudyRow, study_uid) is not None:
                    # Only a series with a known count can make the study full: skip the count query
                    # for the common case of senders that do not say (radiographs, most MR).
                    counted = any(p.expected_in_series for p in fresh if p.study_uid == study_uid) or (
                        hold_until is not None and self._any_counted(s, study_uid)
                    )
                    gate = (
                        study_gate(
                            not_before,
                            now,
                            self._fill(s, study_uid),
                            hold_until=hold_until,
                            complete_when_full=complete_when_full,
                        )
                        if counted and (not_before > now or hold_until is not None)
                        else not_before
                    )
                    self._schedule(s, study_uid, gate, priority, now)
                    gates.append(gate)
            for study_uid in others:
                if s.scalars(select(JobRow.id).where(JobRow.study_uid == study_uid)).first() is None:
                    self._schedule(s, study_uid, not_before, priority, now)
                    gates.append(not_before)
        return gates

    @staticmethod
    def _any_counted(s: Session, study_uid: str) -> bool:
        """Does a series of the study declare its count (then a held gate must not fall back to the timer)?"""
        return (
            s.scalars(
                select(SeriesRow.series_uid).where(
                    SeriesRow.study_uid == study_uid, SeriesRow.expected_instances.is_not(None)
                )
            ).first()
            is not None
        )

    @staticmethod
    def _fill(s: Session, study_uid: str) -> list[SeriesFill]:
        """(expected, received) for each image series of the study."""
        rows = s.execute(
            select(SeriesRow.expected_instances, func.count(InstanceRow.sop_instance_uid))
            .join(InstanceRow, InstanceRow.series_uid == SeriesRow.series_uid)
            .where(SeriesRow.study_uid == study_uid, InstanceRow.role == "image")
            .group_by(SeriesRow.series_uid, SeriesRow.expected_instances)
        ).all()
        return [(expected, int(n)) for expected, n in rows]

    @staticmethod
    def _schedule(s: Session, study_uid: str, not_before: datetime, priority: int, now: datetime) -> None:
        """One pending job per study: push its gate and raise its priority, or open a new one.

        A job already running or done does not see the new instances, so a new pending job is opened; its
        result will supersede the earlier one.
        """
        pending = s.scalars(
            select(JobRow).where(JobRow.study_uid == study_uid, JobRow.state == "pending")
        ).first()
        if pending is None:
            s.add(
                JobRow(
                    study_uid=study_uid,
                    state="pending",
                    priority=priority,
                    attempts=0,
                    created_at=now,
                    not_before=not_before,
                )
            )
        else:
            pending.not_before = not_before
            pending.priority = min(pending.priority, priority)

    def association_ended(
        self,
        study_uids: Sequence[str],
        *,
        released: bool,
        quiet_until: datetime,
        settings: AssemblySettings,
    ) -> bool:
        """No association of these studies is open any more: move their gates on that evidence.

        Blocking (called from the listener's association thread). Returns whether a job became due now,
        so the caller wakes the workers only then. See :func:`service.assemble.end_gate`.
        """
        if not study_uids:
            return False
        return self._db.submit(
            self._association_ended, list(study_uids), released, quiet_until, settings
        ).result()

    def _association_ended(
        self, study_uids: list[str], released: bool, quiet_until: datetime, settings: AssemblySettings
    ) -> bool:
        now = utcnow()
        due = False
        with Session(self.engine) as s, s.begin():
            for study_uid in study_uids:
                pending = s.scalars(
                    select(JobRow)
                    .where(JobRow.study_uid == study_uid, JobRow.state == "pending")
                    .with_for_update()
                ).first()
                if pending is None:
                    continue
                modalities = s.scalars(
                    select(SeriesRow.modality)
                    .join(InstanceRow, InstanceRow.series_uid == SeriesRow.series_uid)
                    .where(SeriesRow.study_uid == study_uid, InstanceRow.role == "image")
                    .distinct()
                ).all()
                gate = end_gate(
                    now,
                    self._fill(s, study_uid),
                    modalities,
                    quiet_until=quiet_until,
                    released=released,
                    settings=settings,
                )
                if gate is not None and gate < pending.not_before:
                    pending.not_before = gate
                due = due or pending.not_before <= now
        return due

    async def release_holds(self, until: datetime) -> int:
        """At start: no association is open in a fresh process, so no job is held for one any more; a held
        job's gate becomes ``until`` (now + the quiet time). Returns how many were held."""
        return await self._call(self._release_holds, until)

    def _release_holds(self, until: datetime) -> int:
        with Session(self.engine) as s, s.begin():
            res = s.execute(
                update(JobRow)
                .where(JobRow.state == "pending", JobRow.not_before > until)
                .values(not_before=until)
            )
            return int(res.rowcount or 0)  # type: ignore[attr-defined]

    # ---- jobs ---------------------------------------------------------------------------------------

    async def recover(self) -> int:
        """Give back jobs whose worker is gone; returns how many.

        One process on SQLite owns the database, so at its start every ``running`` job is a leftover of a
        crash. On a shared database other workers may be running right now: only jobs whose lease has
        expired are given back (their worker stopped heart-beating).
        """
        return await self._call(self._recover)

    def _recover(self) -> int:
        with Session(self.engine) as s, s.begin():
            query = update(JobRow).where(JobRow.state == "running")
            if self.shared:
                query = query.where(JobRow.lease_expires_at < utcnow())
            res = s.execute(query.values(state="pending", claimed_at=None, worker_id=None))
            return int(res.rowcount or 0)  # type: ignore[attr-defined]

    async def claim(self) -> JobInfo | None:
        """Take the most urgent due job (stat first, then oldest) with a lease; None when there is none.

        ``FOR UPDATE SKIP LOCKED`` on PostgreSQL: workers on several machines never wait for each other
        and never take the same job; SQLite ignores it (one writer thread).
        """
        return await self._call(self._claim)

    def _claim(self) -> JobInfo | None:
        now = utcnow()
        with Session(self.engine) as s, s.begin():
            job = s.scalars(
                select(JobRow)
                .where(JobRow.state == "pending", JobRow.not_before <= now)
                .order_by(JobRow.priority, JobRow.not_before, JobRow.id)
                .limit(1)
                .with_for_update(skip_locked=True)
            ).first()
            if job is None:
                return None
            info = JobInfo(job.id, job.study_uid, job.priority, job.attempts + 1, job.not_before)
            job.state, job.claimed_at, job.ready_at, job.attempts = (
                "running",
                now,
                job.not_before,
                info.attempts,
            )
            job.worker_id, job.lease_expires_at = self.worker_id, now + self.lease
            return info

    async def heartbeat(self, job_ids: Sequence[int]) -> int:
        """Extend the leases of our running jobs; returns how many are still ours."""
        if not job_ids:
            return 0
        return await self._call(self._heartbeat, list(job_ids))

    def _heartbeat(self, job_ids: list[int]) -> int:
        with Session(self.engine) as s, s.begin():
            res = s.execute(
                update(JobRow)
                .where(JobRow.id.in_(job_ids), JobRow.state == "running", JobRow.worker_id == self.worker_id)
                .values(lease_expires_at=utcnow() + self.lease)
            )
            return int(res.rowcount or 0)  # type: ignore[attr-defined]

    async def backlog(self) -> int:
        """Jobs due and waiting for a worker: the back-pressure readiness and /metrics report."""
        return await self._call(self._backlog)

    def _backlog(self) -> int:
        with Session(self.engine) as s:
            return int(
                s.scalar(select(func.count()).where(JobRow.state == "pending", JobRow.not_before <= utcnow()))
                or 0
            )

    async def next_due(self) -> datetime | None:
        """When the earliest pending job becomes due (for the worker's sleep)."""
        return await self._call(self._next_due)

    def _next_due(self) -> datetime | None:
        with Session(self.engine) as s:
            return s.scalars(
                select(JobRow.not_before).where(JobRow.state == "pending").order_by(JobRow.not_before)
            ).first()

    async def instances(self, study_uid: str) -> list[InstanceRecord]:
        return await self._call(self._instances, study_uid)

    def _instances(self, study_uid: str) -> list[InstanceRecord]:
        with Session(self.engine) as s:
            rows = s.execute(
                select(InstanceRow, SeriesRow)
                .join(SeriesRow, SeriesRow.series_uid == InstanceRow.series_uid)
                .where(InstanceRow.study_uid == study_uid, InstanceRow.role == "image")
                .order_by(InstanceRow.series_uid, InstanceRow.sop_instance_uid)
            ).all()
            return [
                InstanceRecord(
                    sop_instance_uid=i.sop_instance_uid,
                    series_uid=i.series_uid,
                    sop_class_uid=i.sop_class_uid,
                    modality=se.modality,
                    body_part=se.body_part,
                    path=self.instances_dir / i.path,
                    expected_in_series=se.expected_instances,
                )
                for i, se in rows
            ]

    async def other_instances(self, study_uid: str) -> list[tuple[str, str]]:
        """(series UID, SOP class UID) of the study's stored instances that are not images to analyse."""
        return await self._call(self._other_instances, study_uid)

    def _other_instances(self, study_uid: str) -> list[tuple[str, str]]:
        with Session(self.engine) as s:
            rows = s.execute(
                select(InstanceRow.series_uid, InstanceRow.sop_class_uid)
                .where(InstanceRow.study_uid == study_uid, InstanceRow.role == "other")
                .distinct()
                .order_by(InstanceRow.series_uid)
            ).all()
            return [(series, sop_class) for series, sop_class in rows]

    async def save_result(
        self, job_id: int, build: Callable[[str | None, StudyStatus], StudyResult]
    ) -> StudyResult:
        """Build and store the job's result and mark the job done in one transaction.

        ``build(supersedes, status)`` gets the previous result id and the study's timestamps; atomicity
        means a crash leaves either no result and a job to re-run, or both: a result is never written twice.
        """
        return await self._call(self._save_result, job_id, build)

    def _save_result(
        self, job_id: int, build: Callable[[str | None, StudyStatus], StudyResult]
    ) -> StudyResult:
        with Session(self.engine) as s, s.begin():
            job = s.get(JobRow, job_id, with_for_update=True)
            assert job is not None
            self._check_lease(job, also=("failed",))
            study = s.get(StudyRow, job.study_uid, with_for_update=True)
            assert study is not None
            prev = s.scalars(
                select(ResultRow.result_id)
                .where(ResultRow.study_uid == job.study_uid)
                .order_by(ResultRow.created_at.desc(), ResultRow.job_id.desc())
            ).first()
            status = StudyStatus(
                exists=True,
                outstanding=False,
                result=None,
                accession_number=study.accession_number,
                first_received=study.first_received,
                last_received=study.last_received,
            )
            result = build(prev, status)
            now = utcnow()
            s.add(
                ResultRow(
                    result_id=result.result_id,
                    study_uid=job.study_uid,
                    job_id=job_id,
                    created_at=now,
                    supersedes=prev,
                    body=result.model_dump_json(),
                )
            )
            job.state = "failed" if result.status == "failed" else "done"
            job.finished_at, job.result_id = now, result.result_id
            self._update_worklist(s, study, result, now)
            return result

    def _update_worklist(self, s: Session, study: StudyRow, result: StudyResult, now: datetime) -> None:
        """The study's worklist entry takes the result, in the result's own transaction (never downgraded)."""
        change = raise_only(study.ai_priority, result.priority)
        study.ai_priority, study.last_result_priority, study.flagged_at = (
            change.priority,
            PRIORITY_RANK[result.priority],
            now,
        )
        if change.event == "raised":  # more urgent than what was acknowledged or escalated: re-open
            study.acknowledged_at = study.acknowledged_by = study.escalated_at = None
        detail = {"result_id": result.result_id, "result_priority": result.priority}
        s.add(
            AuditRow(
                at=now,
                study_uid=study.study_uid,
                event=change.event,
                actor="pacs-triage",
                detail=json.dumps(detail, sort_keys=True),
            )
        )
        enqueue(s, result, self.notification_targets(result), now)

    def _check_lease(self, job: JobRow, *, also: tuple[str, ...] = ()) -> None:
        """Only the lease holder finishes a job: a worker that stalled past its lease lost the job to
        another one, and its late result must not be a second result. ``also``: other states in which
        the holder may still finish it (``failed``: the failed result written after the last attempt)."""
        if job.state not in ("running", *also) or job.worker_id != self.worker_id:
            raise LeaseLostError(f"job {job.id} is no longer ours (state {job.state})")

    async def fail(self, job_id: int, error: str, max_attempts: int) -> str:
        """Record a failed attempt; the job goes back to pending until ``max_attempts``. Returns the state."""
        return await self._call(self._fail, job_id, error, max_attempts)

    def _fail(self, job_id: int, error: str, max_attempts: int) -> str:
        with Session(self.engine) as s, s.begin():
            job = s.get(JobRow, job_id, with_for_update=True)
            assert job is not None
            self._check_lease(job)
            job.error = error[:2000]
            job.state = "failed" if job.attempts >= max_attempts else "pending"
            job.not_before = utcnow() + timedelta(seconds=1)
            return job.state

    # ---- reading ------------------------------------------------------------------------------------

    async def study_status(self, study_uid: str) -> StudyStatus:
        return await self._call(self._study_status, study_uid)

    def _study_status(self, study_uid: str) -> StudyStatus:
        with Session(self.engine) as s:
            study = s.get(StudyRow, study_uid)
            if study is None:
                return StudyStatus(exists=False, outstanding=False, result=None)
            outstanding = (
                s.scalars(
                    select(JobRow.id).where(
                        JobRow.study_uid == study_uid, JobRow.state.in_(("pending", "running"))
                    )
                ).first()
                is not None
            )
            body = s.scalars(
                select(ResultRow.body)
                .where(ResultRow.study_uid == study_uid)
                .order_by(ResultRow.created_at.desc(), ResultRow.job_id.desc())
            ).first()
            result = StudyResult.model_validate_json(body) if body else None
            return StudyStatus(True, outstanding, result, study.accession_number)

    async def count_results(self, study_uid: str) -> int:
        return await self._call(self._count_results, study_uid)

    def _count_results(self, study_uid: str) -> int:
        with Session(self.engine) as s:
            return len(s.scalars(select(ResultRow.result_id).where(ResultRow.study_uid == study_uid)).all())
