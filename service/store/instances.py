"""Received instances: the file written durably first, then its rows and its study's job in one transaction.

An instance already stored (same SOPInstanceUID) is not written again and counts as a success, as a
C-STORE retry must (PS3.4 B.2.3: the SCP may store a duplicate once). A file is written and fsynced
before its row commits and before anyone is told it is stored; a failed commit removes the files it wrote.

The study's job is scheduled in the same transaction (:func:`service.store.jobs.schedule`), so an instance
is never stored without the work it causes. When the caller can run the job at once (an HTTP request whose
study is complete on arrival) the job is also leased to it there (:meth:`Instances.ingest` with
``claim``): no second transaction, no worker wake-up, no queue in between.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from sqlalchemy import Connection, insert, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from service.assemble import study_gate
from service.clock import utcnow
from service.errors import SopInstanceConflictError, StudyTooLargeError
from service.store.database import Database
from service.store.db import InstanceRow, JobRow, SeriesRow, StudyRow
from service.store.files import Staged, check_free_space, instance_relpath, stage, write_durably
from service.store.gates import any_counted, series_fill
from service.store.jobs import JobInfo, Jobs, schedule
from service.store.validate import ParsedInstance

__all__ = ["Ingested", "InstanceRecord", "Instances"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class InstanceRecord:
    """A stored image instance as analysis needs it (the file, and what routing reads from the rows)."""

    sop_instance_uid: str
    series_uid: str
    sop_class_uid: str
    modality: str | None
    body_part: str | None
    path: Path
    expected_in_series: int | None = None
    """ImagesInAcquisition of the instance's series, when the sender declared it."""


@dataclass(frozen=True)
class Ingested:
    """What one ingest did: the gate of each study it (re)scheduled and the jobs leased to the caller."""

    gates: list[datetime] = field(default_factory=list)
    claimed: list[JobInfo] = field(default_factory=list)
    whole: set[str] = field(default_factory=set)
    """Studies whose every stored instance came in this call: the caller holds all of them."""


class Instances:
    """Files under ``instances_dir`` and their rows."""

    def __init__(
        self,
        db: Database,
        instances_dir: Path,
        *,
        disk_high_watermark: float = 1.0,
        max_instances_per_study: int | None = None,
    ) -> None:
        self.db = db
        self.instances_dir = instances_dir
        self.disk_high_watermark = disk_high_watermark
        self.max_instances_per_study = max_instances_per_study
        instances_dir.mkdir(parents=True, exist_ok=True)

    # ---- ingest -------------------------------------------------------------------------------------

    async def ingest(
        self,
        instances: Sequence[ParsedInstance],
        *,
        not_before: datetime,
        priority: int = 2,
        claim: Jobs | None = None,
    ) -> Ingested:
        """Store instances durably (files, then rows) and schedule a job per study.

        ``not_before`` is when the study may run: now for an HTTP request that has ended, now + quiet time
        for instances trickling in over DICOM (earlier once the study is known to be full, see
        :func:`service.assemble.study_gate`). With ``claim``, a study due at once is leased to that
        :class:`Jobs` in the same transaction and returned in :attr:`Ingested.claimed`.
        """
        known = await self.db.read(self._known, [p.sop_instance_uid for p in instances], instances)
        fresh: dict[str, ParsedInstance] = {}
        for p in instances:
            if p.sop_instance_uid not in known:
                fresh.setdefault(p.sop_instance_uid, p)
        written = await asyncio.gather(
            *(asyncio.to_thread(self.write, p) for p in fresh.values()), return_exceptions=True
        )
        failure = next((w for w in written if isinstance(w, BaseException)), None)
        try:
            if failure is not None:
                raise failure
            return await self.db.run(self._insert_retrying, list(fresh.values()), not_before, priority, claim)
        except BaseException:
            ok = [p for p, w in zip(fresh.values(), written, strict=True) if not isinstance(w, BaseException)]
            await asyncio.to_thread(self._discard, ok)
            raise

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
        (its series became full), so the caller wakes the workers only then. ``hold_until``: the
        association is open, so a series short of its declared count waits until then rather than for
        the quiet timer (:func:`service.assemble.study_gate`).
        """
        if self.db.read_blocking(self._known, [instance.sop_instance_uid], [instance]):
            return False, False
        self.write(instance)
        try:
            done = self.db.run_blocking(
                self._insert_retrying, [instance], not_before, priority, None, hold_until, complete_when_full
            )
        except BaseException:
            self._discard([instance])
            raise
        now = utcnow()
        return True, any(gate <= now for gate in done.gates)

    def write(self, p: ParsedInstance) -> None:
        """The instance's file, durable (file and directory fsynced) when this returns; its row is the
        caller's (:meth:`ingest`, or the listener's group commit, :mod:`service.store.group_commit`)."""
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
        committed = self.db.read_blocking(self._known, [p.sop_instance_uid for p in written])
        for p in written:
            if p.sop_instance_uid not in committed:
                rel = instance_relpath(p.study_uid, p.series_uid, p.sop_instance_uid)
                (self.instances_dir / rel).unlink(missing_ok=True)

    def admit_blocking(self, p: ParsedInstance, more: int) -> bool:
        """Before a DICOM instance whose row comes later is answered, the checks its row would make: True
        if it is stored already (a duplicate); :class:`SopInstanceConflictError` if its UID names an
        instance of another study; :class:`StudyTooLargeError` if its study cannot take ``more``
        instances (``max_instances_per_study``). One read, on the calling thread."""
        return bool(self.db.read_blocking(self._admit, p, more))

    def _admit(self, s: Session, p: ParsedInstance, more: int) -> bool:
        if self._known(s, [p.sop_instance_uid], [p]):
            return True
        limit = self.max_instances_per_study
        if limit:
            count = s.scalar(select(StudyRow.instance_count).where(StudyRow.study_uid == p.study_uid)) or 0
            if count + more > limit:
                raise StudyTooLargeError(
                    f"the study already has {max(count, limit)} instances, the configured maximum",
                    part="StudyInstanceUID",
                )
        return False

    def stage(self, p: ParsedInstance) -> Staged:
        """The first half of :meth:`write`: the file fsynced under a temporary name; ``place()`` it."""
        check_free_space(self.instances_dir, self.disk_high_watermark)
        return stage(
            self.instances_dir, instance_relpath(p.study_uid, p.series_uid, p.sop_instance_uid), p.data
        )

    def commit_rows(
        self,
        s: Session,
        acknowledged: list[ParsedInstance],
        *,
        not_before: datetime,
        hold_until: datetime | None,
        complete_when_full: bool,
    ) -> Ingested:
        """Rows (and jobs) for instances whose files are durable and whose sender was already told so, in
        the caller's transaction: the group commit and the start-up re-index. Instances already stored
        are skipped, and the study limit is not applied again: an acknowledged instance is never dropped."""
        fresh: dict[str, ParsedInstance] = {}
        for p in acknowledged:
            fresh.setdefault(p.sop_instance_uid, p)
        return self._insert_retrying(
            s, list(fresh.values()), not_before, 2, None, hold_until, complete_when_full, enforce_limit=False
        )

    @staticmethod
    def _known(s: Session, sops: list[str], incoming: Sequence[ParsedInstance] = ()) -> set[str]:
        """The SOP UIDs already stored. With ``incoming``: a UID stored (or sent twice) in another study is
        a :class:`SopInstanceConflictError` (409 / 0xA900), never a duplicate acknowledged and dropped."""
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
        s: Session,
        fresh: list[ParsedInstance],
        not_before: datetime,
        priority: int,
        claim: Jobs | None,
        hold_until: datetime | None = None,
        complete_when_full: bool = True,
        enforce_limit: bool = True,
    ) -> Ingested:
        """:meth:`_insert`, again after losing a race with another process (same instance, series or
        pending job inserted meanwhile): the retry sees their rows and joins them."""
        for attempt in range(4):
            try:
                with s.begin_nested():
                    return self._insert(
                        s, fresh, not_before, priority, claim, hold_until, complete_when_full, enforce_limit
                    )
            except IntegrityError:
                if attempt == 3:
                    raise
                logger.debug("ingest lost an insert race; retrying")
        raise AssertionError("unreachable")

    def _insert(
        self,
        s: Session,
        fresh: list[ParsedInstance],
        not_before: datetime,
        priority: int,
        claim: Jobs | None,
        hold_until: datetime | None = None,
        complete_when_full: bool = True,
        enforce_limit: bool = True,
    ) -> Ingested:
        """Rows for the fresh instances; the gate of each study (re)scheduled, and the jobs claimed.

        Plain SQL statements (SQLAlchemy Core), a few per study rather than per instance: this runs once
        per HTTP request and once per C-STORE, on the one writer thread.
        """
        now = utcnow()
        done = Ingested()
        conn = s.connection()
        sops = [p.sop_instance_uid for p in fresh]
        stored = set(
            conn.scalars(select(InstanceRow.sop_instance_uid).where(InstanceRow.sop_instance_uid.in_(sops)))
        )
        new = [
            p for p in fresh if p.sop_instance_uid not in stored
        ]  # stored meanwhile: once, still a success
        if not new:
            return done
        by_study: dict[str, list[ParsedInstance]] = {}
        for p in new:
            by_study.setdefault(p.study_uid, []).append(p)
        for study_uid, items in by_study.items():
            if self._add_study(conn, study_uid, items, now, enforce_limit):
                done.whole.add(study_uid)
        self._add_series(conn, new)
        conn.execute(
            insert(InstanceRow),
            [
                {
                    "sop_instance_uid": p.sop_instance_uid,
                    "series_uid": p.series_uid,
                    "study_uid": p.study_uid,
                    "sop_class_uid": p.sop_class_uid,
                    "transfer_syntax_uid": p.transfer_syntax_uid,
                    "path": instance_relpath(p.study_uid, p.series_uid, p.sop_instance_uid).as_posix(),
                    "received_at": now,
                    "role": p.role,
                }
                for p in new
            ],
        )
        # Only studies that gained an image need (re-)analysis: an SR, a presentation state or our own
        # result coming back from the PACS changes nothing.
        images = sorted({p.study_uid for p in new if p.role == "image"})
        for study_uid in images:
            # Only a series with a known count can make the study full: skip the count query for the
            # common case of senders that do not say (radiographs, most MR).
            counted = any(p.expected_in_series for p in by_study[study_uid]) or (
                hold_until is not None and any_counted(s, study_uid)
            )
            gate = (
                study_gate(
                    not_before,
                    now,
                    series_fill(s, study_uid),
                    hold_until=hold_until,
                    complete_when_full=complete_when_full,
                )
                if counted and (not_before > now or hold_until is not None)
                else not_before
            )
            job = schedule(s, study_uid, gate, priority, now, lease_to=claim)
            done.gates.append(gate)
            if job is not None:
                done.claimed.append(job)
        # A study of non-image objects only (SR, RT, waveforms, no pixel data) still gets an answer: one
        # job, whose result says "not analysed" and why, unless the study already has a job of its own.
        for study_uid in sorted({p.study_uid for p in new if p.role == "other"} - set(images)):
            if conn.scalars(select(JobRow.id).where(JobRow.study_uid == study_uid).limit(1)).first() is None:
                schedule(s, study_uid, not_before, priority, now)
                done.gates.append(not_before)
        return done

    def _add_study(
        self,
        conn: Connection,
        study_uid: str,
        items: list[ParsedInstance],
        now: datetime,
        enforce_limit: bool,
    ) -> bool:
        """Count the study's new instances in; True when it had none before (the caller holds them all)."""
        # Row lock (PostgreSQL): ingests of one study by several processes take turns.
        row = conn.execute(
            select(StudyRow.instance_count, StudyRow.accession_number)
            .where(StudyRow.study_uid == study_uid)
            .with_for_update()
        ).first()
        count = row.instance_count if row is not None else 0
        limit = self.max_instances_per_study if enforce_limit else None
        if limit and count + len(items) > limit:
            raise StudyTooLargeError(
                f"the study already has {max(count, limit)} instances, the configured maximum",
                part="StudyInstanceUID",
            )
        accession = next((p.accession_number[:16] for p in items if p.accession_number), None)
        if row is None:
            conn.execute(
                insert(StudyRow).values(
                    study_uid=study_uid,
                    first_received=now,
                    last_received=now,
                    instance_count=len(items),
                    accession_number=accession,
                )
            )
            return True
        values: dict[str, object] = {"instance_count": count + len(items), "last_received": now}
        if accession and not row.accession_number:
            values["accession_number"] = accession
        conn.execute(update(StudyRow).where(StudyRow.study_uid == study_uid).values(**values))
        return count == 0  # 0: retention purged its earlier instances

    @staticmethod
    def _add_series(conn: Connection, new: list[ParsedInstance]) -> None:
        """A row per new series; a count the sender declares now fills one it had not declared before."""
        first: dict[str, ParsedInstance] = {}
        expected: dict[str, int] = {}
        for p in new:
            first.setdefault(p.series_uid, p)
            if p.expected_in_series is not None:
                expected.setdefault(p.series_uid, p.expected_in_series)
        known = dict(
            conn.execute(
                select(SeriesRow.series_uid, SeriesRow.expected_instances).where(
                    SeriesRow.series_uid.in_(first)
                )
            ).all()
        )
        for uid, p in first.items():
            if uid not in known:
                conn.execute(
                    insert(SeriesRow).values(
                        series_uid=uid,
                        study_uid=p.study_uid,
                        modality=p.modality,
                        body_part=p.body_part,
                        expected_instances=expected.get(uid),
                    )
                )
            elif known[uid] is None and uid in expected:
                conn.execute(
                    update(SeriesRow)
                    .where(SeriesRow.series_uid == uid)
                    .values(expected_instances=expected[uid])
                )

    # ---- reading ------------------------------------------------------------------------------------

    def record(self, p: ParsedInstance) -> InstanceRecord:
        """The record of an instance this process just ingested (no read back: the caller holds it)."""
        path = self.instances_dir / instance_relpath(p.study_uid, p.series_uid, p.sop_instance_uid)
        return InstanceRecord(
            p.sop_instance_uid,
            p.series_uid,
            p.sop_class_uid,
            p.modality,
            p.body_part,
            path,
            p.expected_in_series,
        )

    async def records(self, study_uid: str) -> list[InstanceRecord]:
        """The study's image instances, by series then SOP Instance UID."""
        return await self.db.read(self._records, study_uid)

    def _records(self, s: Session, study_uid: str) -> list[InstanceRecord]:
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
        return await self.db.read(self._other_instances, study_uid)

    @staticmethod
    def _other_instances(s: Session, study_uid: str) -> list[tuple[str, str]]:
        rows = s.execute(
            select(InstanceRow.series_uid, InstanceRow.sop_class_uid)
            .where(InstanceRow.study_uid == study_uid, InstanceRow.role == "other")
            .distinct()
            .order_by(InstanceRow.series_uid)
        ).all()
        return [(series, sop_class) for series, sop_class in rows]

    async def paths(self, sop_uids: Sequence[str]) -> dict[str, Path]:
        """Stored files of the given instances by SOP Instance UID; instances no longer stored are absent."""
        return await self.db.read(self._paths, list(sop_uids))

    def _paths(self, s: Session, sop_uids: list[str]) -> dict[str, Path]:
        rows = s.execute(
            select(InstanceRow.sop_instance_uid, InstanceRow.path).where(
                InstanceRow.sop_instance_uid.in_(sop_uids)
            )
        ).all()
        return {sop: self.instances_dir / path for sop, path in rows}
