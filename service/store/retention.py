"""Retention: the service looks after its own disk.

A study's instance files are removed once all of these hold: its newest instance is older than
``retention.instance_days``; no job of it is pending or running; it has a result; and every object we
created for it was delivered (no delivery pending, sending or dead — a dead letter keeps its study, since
someone will want to re-send it). Its instance rows go with the files, so a late image re-opens the study
with only the new images. Results, outbox history and the study row stay: the REST result keeps working,
and ``purged_at`` says when the images went. Delivered output objects (SR, preview) are removed likewise.

Order per study: delete the instance rows (noting their paths) and mark ``purged_at`` in one transaction,
then unlink exactly those files — never the whole directory, since an instance of the same study may be
arriving meanwhile. A crash in between leaves orphan files (a few at most), which the start-up re-index
removes rather than indexing again (:mod:`service.store.reindex`); it never leaves rows pointing at
missing files.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from datetime import datetime, timedelta
from pathlib import Path

from sqlalchemy import delete, exists, select
from sqlalchemy.orm import Session

from service.clock import utcnow
from service.store.database import Database
from service.store.db import (
    DeliveryRow,
    InstanceRow,
    JobRow,
    JobState,
    OutboxState,
    OutputRow,
    ResultRow,
    StudyRow,
)

__all__ = ["Retention"]

logger = logging.getLogger(__name__)


class Retention:
    """:meth:`sweep` once, or :meth:`start` a loop that sweeps every ``interval`` seconds."""

    def __init__(
        self, db: Database, instances_dir: Path, outputs_dir: Path, *, instance_days: float, interval: float
    ) -> None:
        self.db = db
        self.instances_dir = instances_dir
        self.outputs_dir = outputs_dir
        self.keep = timedelta(days=instance_days)
        self.interval = interval
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self.keep > timedelta(0):
            self._task = asyncio.create_task(self._loop(), name="retention")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _loop(self) -> None:
        while True:
            try:
                await self.sweep()
            except Exception:  # a sweep that fails is retried next interval; ingest is unaffected
                logger.exception("retention sweep failed")
            await asyncio.sleep(self.interval)

    async def sweep(self, now: datetime | None = None) -> int:
        """Purge every eligible study; returns how many were purged."""
        cutoff = (now or utcnow()) - self.keep
        studies = await self.db.read(self._eligible, cutoff)
        for study_uid in studies:
            paths = await self.db.run(self._purge_rows, study_uid, now or utcnow())
            await asyncio.to_thread(self._unlink, paths)
        if studies:
            logger.info("retention: removed the instance files of %d delivered study(ies)", len(studies))
        return len(studies)

    @staticmethod
    def _eligible(s: Session, cutoff: datetime) -> list[str]:
        busy = exists().where(
            JobRow.study_uid == StudyRow.study_uid, JobRow.state.in_((JobState.PENDING, JobState.RUNNING))
        )
        has_result = exists().where(ResultRow.study_uid == StudyRow.study_uid)
        undelivered = exists().where(
            OutputRow.study_uid == StudyRow.study_uid,
            DeliveryRow.sop_instance_uid == OutputRow.sop_instance_uid,
            DeliveryRow.state != OutboxState.DONE,
        )
        has_files = exists().where(InstanceRow.study_uid == StudyRow.study_uid)
        return list(
            s.scalars(
                select(StudyRow.study_uid).where(
                    StudyRow.last_received < cutoff, has_result, has_files, ~busy, ~undelivered
                )
            )
        )

    def _purge_rows(self, s: Session, study_uid: str, now: datetime) -> list[Path]:
        """Delete the study's instance rows; returns the instance and delivered output files to remove."""
        paths = [
            self.instances_dir / p
            for p in s.scalars(select(InstanceRow.path).where(InstanceRow.study_uid == study_uid))
        ]
        paths += [
            self.outputs_dir / p
            for p in s.scalars(select(OutputRow.path).where(OutputRow.study_uid == study_uid))
        ]
        s.execute(delete(InstanceRow).where(InstanceRow.study_uid == study_uid))
        study = s.get(StudyRow, study_uid)
        assert study is not None
        study.purged_at = now
        study.instance_count = 0
        return paths

    @staticmethod
    def _unlink(paths: list[Path]) -> None:
        parents = set()
        for path in paths:
            path.unlink(missing_ok=True)
            parents.add(path.parent)
        for parent in parents:  # empty series / study directories go too; a non-empty one stays
            for d in (parent, parent.parent):
                with contextlib.suppress(OSError):
                    d.rmdir()
