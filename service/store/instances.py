"""Received instances: the file written durably first, then its rows and its study's job in one transaction.

An instance already stored (same SOPInstanceUID) is not written again and counts as a success, as a
C-STORE retry must (PS3.4 B.2.3: the SCP may store a duplicate once). A file is written and fsynced
before its row commits and before anyone is told it is stored; a failed commit removes the files it wrote.
The DICOM listener answers once the file is durable and commits rows in groups after the answers
(:mod:`service.store.group_commit`, with :meth:`Instances.admit_blocking`, :meth:`Instances.stage` and
:meth:`Instances.commit_rows` here); the rows themselves are :mod:`service.store.rows`.

The study's job is scheduled in the same transaction (:func:`service.store.jobs.schedule`), so an instance
is never stored without the work it causes. When the caller can run the job at once (an HTTP request whose
study is complete on arrival) the job is also leased to it there (:meth:`Instances.ingest` with
``claim``): no second transaction, no worker wake-up, no queue in between.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from sqlalchemy import bindparam, select
from sqlalchemy.orm import Session

from service.clock import utcnow
from service.errors import SopInstanceConflictError, StudyTooLargeError
from service.store.database import Database
from service.store.db import InstanceRow, SeriesRow, StudyRow
from service.store.files import (
    Staged,
    check_free_space,
    instance_relname,
    instance_relpath,
    place_all,
    stage,
    write_durably,
)
from service.store.jobs import Jobs
from service.store.rows import Ingested, insert_rows
from service.store.validate import ParsedInstance

__all__ = ["Ingested", "InstanceRecord", "Instances", "sop_conflict"]

logger = logging.getLogger(__name__)


# One statement for both of admit's questions: each statement is a round of releasing and retaking the GIL
# on the listener's store thread, which, with the receive path's other threads busy, showed as more time
# than SQLite's lookup itself (a py-spy --native profile of one association, 2026-12-04); the saving was
# within the noise end to end.
_ADMIT = select(
    select(InstanceRow.study_uid).where(InstanceRow.sop_instance_uid == bindparam("sop")).scalar_subquery(),
    select(StudyRow.instance_count).where(StudyRow.study_uid == bindparam("study")).scalar_subquery(),
)
_HOLDERS = select(InstanceRow.sop_instance_uid, InstanceRow.study_uid).where(
    InstanceRow.sop_instance_uid.in_(bindparam("sops", expanding=True))
)


def sop_conflict(p: ParsedInstance, other: str) -> SopInstanceConflictError:
    """409 / 0xA900: the instance's UID already names an instance of study ``other``."""
    return SopInstanceConflictError(
        f"SOP Instance UID {p.sop_instance_uid} already names an instance of study {other};"
        " one UID is one instance (PS3.3 C.12.1.1.1): give this one its own UID",
        part="SOPInstanceUID",
        extra={"sop_instance_uid": p.sop_instance_uid, "conflicting_study": other},
    )


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
        staged: Sequence[Staged] | None = None,
    ) -> Ingested:
        """Store instances durably (files, then rows) and schedule a job per study.

        ``not_before`` is when the study may run: now for an HTTP request that has ended, now + quiet time
        for instances trickling in over DICOM (earlier once the study is known to be full, see
        :func:`service.assemble.study_gate`). With ``claim``, a study due at once is leased to that
        :class:`Jobs` in the same transaction and returned in :attr:`Ingested.claimed`. With ``staged``
        (a spooled request, :mod:`service.api.upload`: each instance's file already written and fsynced
        under a temporary name, in the same order), the new ones are renamed into place instead of
        written, and the others removed.
        """
        known = await self.db.read(self._known, [p.sop_instance_uid for p in instances], instances)
        fresh: dict[str, ParsedInstance] = {}
        mine: list[Staged] = []  # the staged files of ``fresh``; the others' are not wanted
        unwanted: list[Staged] = []
        for i, p in enumerate(instances):
            new = p.sop_instance_uid not in known and p.sop_instance_uid not in fresh
            if new:
                fresh[p.sop_instance_uid] = p
            if staged is not None:
                (mine if new else unwanted).append(staged[i])
        placed: list[ParsedInstance]  # whose files are in place: removed again if the rows fail
        failure: BaseException | None = None
        if staged is not None:
            await asyncio.to_thread(self._place_staged, mine, unwanted, list(fresh.values()))
            placed = list(fresh.values())
        else:
            written = await asyncio.gather(
                *(asyncio.to_thread(self.write, p) for p in fresh.values()), return_exceptions=True
            )
            placed = [
                p for p, w in zip(fresh.values(), written, strict=True) if not isinstance(w, BaseException)
            ]
            failure = next((w for w in written if isinstance(w, BaseException)), None)
        try:
            if failure is not None:
                raise failure
            return await self.db.run_grouped(
                insert_rows,
                list(fresh.values()),
                not_before,
                priority,
                claim,
                limit=self.max_instances_per_study,
            )
        except BaseException:
            await asyncio.to_thread(self._discard, placed)
            raise

    def _place_staged(self, mine: list[Staged], unwanted: list[Staged], fresh: list[ParsedInstance]) -> None:
        """A spooled request's files (blocking): the new ones renamed into place (one fsync per directory),
        the others removed; if placing fails, none is left, renamed or not."""
        for st in unwanted:
            st.discard()
        try:
            place_all(mine)
        except BaseException:
            for st in mine:
                st.discard()
            self._discard(fresh)  # those renamed already
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
        """:meth:`ingest` for one instance from a thread without an event loop (C-GET sub-operations in
        :mod:`service.api.retrievals`; the listener's C-STOREs go through the group commit instead).

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
                insert_rows,
                [instance],
                not_before,
                priority,
                None,
                hold_until,
                complete_when_full,
                limit=self.max_instances_per_study,
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
        instances (``max_instances_per_study``). One prepared statement on the thread's own read connection
        (:meth:`Database.read_row`): this is on every C-STORE's answer path."""
        holder, count = self.db.read_row(_ADMIT, {"sop": p.sop_instance_uid, "study": p.study_uid})
        if holder is not None:
            if holder != p.study_uid:
                raise sop_conflict(p, holder)
            return True
        limit = self.max_instances_per_study
        count = count or 0
        if limit and count + more > limit:
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
        return insert_rows(s, list(fresh.values()), not_before, 2, None, hold_until, complete_when_full)

    @staticmethod
    def _known(s: Session, sops: list[str], incoming: Sequence[ParsedInstance] = ()) -> set[str]:
        """The SOP UIDs already stored. With ``incoming``: a UID stored (or sent twice) in another study is
        a :class:`SopInstanceConflictError` (409 / 0xA900), never a duplicate acknowledged and dropped."""
        rows = s.connection().execute(_HOLDERS, {"sops": sops}).all()
        holder = dict(rows)
        for p in incoming:
            other = holder.setdefault(p.sop_instance_uid, p.study_uid)
            if other != p.study_uid:
                raise sop_conflict(p, other)
        return {sop for sop, _ in rows}

    # ---- reading ------------------------------------------------------------------------------------

    def record(self, p: ParsedInstance) -> InstanceRecord:
        """The record of an instance this process just ingested (no read back: the caller holds it)."""
        path = self.instances_dir / instance_relname(p.study_uid, p.series_uid, p.sop_instance_uid)
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
