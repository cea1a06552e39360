"""The store's modules on one database, as the app wires them (for tests outside the app)."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from datetime import timedelta
from io import BytesIO
from pathlib import Path

from pydicom import dcmread
from sqlalchemy import select
from sqlalchemy.orm import Session

from service.clock import utcnow
from service.results.schema import Code, Finding, StudyResult
from service.store.database import Database
from service.store.db import InstanceRow, JobRow
from service.store.instances import Instances
from service.store.jobs import JobInfo, Jobs
from service.store.notify import Targets
from service.store.outbox import Outbox
from service.store.results import Results
from service.store.retention import Retention
from service.store.slot_place import Replayed, replay_slots
from service.store.slots import SlotStore
from service.store.validate import ParsedInstance, parse_instance
from tests.service.dicom_factory import head_ct_series, to_bytes


@dataclass
class Kit:
    db: Database
    instances: Instances
    jobs: Jobs
    results: Results
    outbox: Outbox

    def close(self) -> None:
        self.db.close()

    async def finish(
        self,
        job: JobInfo,
        *,
        result_id: str | None = None,
        priority: str = "routine",
        findings: bool = False,
        pending: bool = False,
    ) -> StudyResult:
        """Save a minimal result for ``job`` on the study's current context (what a worker does); with
        ``findings``, one positive finding of ``priority`` (such a result is queued for rendering); with
        ``pending``, a measurements-pending one (the job goes on)."""
        ctx = await self.results.context(job.study_uid)
        result = StudyResult(
            result_id=result_id or f"r{job.id}",
            study_uid=job.study_uid,
            status="complete" if findings else "not_analysed",
            priority=priority,
            findings=[finding(priority)] if findings else [],
            supersedes=ctx.supersedes,
            measurements_pending=pending,
        )
        return await self.results.save(job, result)

    async def analyse_and_purge(self, study_uid: str) -> None:
        """The worker analyses ``study_uid`` (the job it claims), then retention purges the study two days
        later (its rows, then its files)."""
        job = await self.jobs.claim()
        assert job is not None and job.study_uid == study_uid
        await self.finish(job)
        retention = Retention(
            self.db,
            self.instances.instances_dir,
            self.instances.instances_dir.parent / "outputs",
            instance_days=1,
            interval=3600,
        )
        assert await retention.sweep(now=utcnow() + timedelta(days=2)) == 1


def finding(urgency: str = "stat", series_uid: str = "1.2") -> Finding:
    """A positive finding asking for ``urgency``."""
    return Finding(
        model="cxr-pneumothorax",
        model_version="1",
        model_sha256="0" * 64,
        label="pneumothorax",
        code=Code(scheme="SCT", value="36118008", meaning="Pneumothorax"),
        probability=0.9,
        threshold=0.5,
        positive=True,
        urgent=urgency != "routine",
        urgency=urgency,
        series_uid=series_uid,
    )


def open_kit(
    url: str,
    data: Path,
    *,
    worker_id: str | None = None,
    lease_seconds: float = 60.0,
    targets: Targets | None = None,
    synchronous: str = "NORMAL",
    **instances: object,
) -> Kit:
    db = Database(url, sqlite_synchronous=synchronous)
    inst = Instances(db, data / "instances", **instances)  # type: ignore[arg-type]
    jobs = Jobs(db, worker_id=worker_id, lease_seconds=lease_seconds)
    results = Results(db, jobs, targets=targets) if targets else Results(db, jobs)
    return Kit(db, inst, jobs, results, Outbox(db, data / "outputs", inst))


def counted_series(n: int) -> list[ParsedInstance]:
    """A head CT series of ``n`` slices that declares ``n`` (ImagesInAcquisition): full on its last row."""
    out = []
    for data in head_ct_series(n):
        ds = dcmread(BytesIO(data))
        ds.ImagesInAcquisition = n
        out.append(parse_instance(to_bytes(ds), "test"))
    return out


def fill(disk: Path, leave: int = 0) -> Path:
    """A file taking all but ``leave`` bytes of ``disk``'s free space (``leave`` 0: until ENOSPC)."""
    filler = disk / "filler.bin"
    with filler.open("wb", buffering=0) as fh:
        todo = shutil.disk_usage(disk).free - leave
        try:
            while todo > 0:
                todo -= fh.write(b"\0" * min(1 << 16, todo))
        except OSError:  # ENOSPC: full
            pass
    return filler


def instance_uids(kit: Kit) -> set[str]:
    """SOP Instance UIDs with a row in the database (what re-index, replay and retention leave)."""
    with Session(kit.db.engine) as s:
        return set(s.scalars(select(InstanceRow.sop_instance_uid)))


def replay_at_restart(kit: Kit) -> Replayed:
    """What the next start's replay of the kit's slots does; its ready slots are removed afterwards
    (``keep=False``: no listener follows)."""
    return replay_slots(slots_of(kit), kit.instances, quiet_seconds=60, keep=False)


def slots_of(kit: Kit) -> SlotStore:
    """The kit's slot directory, as the app places it (beside the instances)."""
    return SlotStore(kit.instances.instances_dir.parent / "slots")


def job_rows(kit: Kit) -> list[JobRow]:
    with Session(kit.db.engine) as s:
        return list(s.scalars(select(JobRow)))
