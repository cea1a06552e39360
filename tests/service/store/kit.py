"""The store's modules on one database, as the app wires them (for tests outside the app)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from service.results.schema import StudyResult
from service.store.database import Database
from service.store.instances import Instances
from service.store.jobs import JobInfo, Jobs
from service.store.notify import Targets
from service.store.outbox import Outbox
from service.store.results import Results


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
        self, job: JobInfo, *, result_id: str | None = None, priority: str = "routine"
    ) -> StudyResult:
        """Save a minimal result for ``job`` on the study's current context (what a worker does)."""
        ctx = await self.results.context(job.study_uid)
        result = StudyResult(
            result_id=result_id or f"r{job.id}",
            study_uid=job.study_uid,
            status="not_analysed",
            priority=priority,  # type: ignore[arg-type]
            supersedes=ctx.supersedes,
        )
        return await self.results.save(job, result)


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
