"""The job queue: stat-first claiming, the quiet gate, crash recovery, retries, leases between workers."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from pathlib import Path

import pytest
from pydicom.uid import generate_uid
from sqlalchemy import select
from sqlalchemy.orm import Session

from service.clock import utcnow
from service.errors import LeaseLostError
from service.store import jobs as jobs_module
from service.store.db import JobRow, JobState
from service.store.validate import ParsedInstance, parse_instance
from tests.service.dicom_factory import chest
from tests.service.store.kit import Kit, open_kit

pytestmark = pytest.mark.anyio


def _instance(study: str | None = None) -> ParsedInstance:
    return parse_instance(chest(study_uid=study or generate_uid()), "part 1")


async def test_stat_is_claimed_before_older_routine(kit: Kit) -> None:
    routine, stat = _instance(), _instance()
    now = utcnow()
    await kit.instances.ingest([routine], not_before=now - timedelta(seconds=5), priority=2)
    await kit.instances.ingest([stat], not_before=now, priority=0)
    assert await kit.jobs.backlog() == 2
    first = await kit.jobs.claim()
    assert first is not None and first.study_uid == stat.study_uid and first.attempts == 1
    second = await kit.jobs.claim()
    assert second is not None and second.study_uid == routine.study_uid
    assert await kit.jobs.claim() is None
    assert await kit.jobs.backlog() == 0


async def test_quiet_gate_and_recover(kit: Kit) -> None:
    inst = _instance()
    gate = utcnow() + timedelta(hours=1)
    await kit.instances.ingest([inst], not_before=gate)
    assert await kit.jobs.claim() is None  # not due yet
    assert await kit.jobs.next_due() == gate
    await kit.instances.ingest([_instance(inst.study_uid)], not_before=utcnow())  # a later instance moves it
    kit.jobs.lease = timedelta(milliseconds=1)  # on PostgreSQL only an expired lease is given back
    job = await kit.jobs.claim()
    assert job is not None
    await asyncio.sleep(0.01)
    assert await kit.jobs.recover() == 1  # "crash": the running job goes back to pending
    again = await kit.jobs.claim()
    assert again is not None and again.id == job.id and again.attempts == 2


async def test_recover_folds_a_running_job_into_its_studys_pending_one(kit: Kit) -> None:
    """A crash while a study's job runs and a later instance (or one re-indexed at start) opened a pending
    job beside it: the start must not break the one-pending-job rule (it used to fail with an
    IntegrityError); the pending job, which sees every instance, is the one analysis left, as urgent as
    the more urgent of the two."""
    inst = _instance()
    await kit.instances.ingest([inst], not_before=utcnow(), priority=3)
    kit.jobs.lease = timedelta(milliseconds=1)  # on PostgreSQL only an expired lease is given back
    running = await kit.jobs.claim()
    assert running is not None
    await kit.instances.ingest([_instance(inst.study_uid)], not_before=utcnow(), priority=4)
    await asyncio.sleep(0.01)
    assert await kit.jobs.recover() == 1
    job = await kit.jobs.claim()
    assert job is not None and job.id != running.id and job.priority == 3
    with Session(kit.db.engine) as s:
        assert s.scalars(select(JobRow.id).where(JobRow.study_uid == inst.study_uid)).all() == [job.id]


async def test_failures_retry_then_fail(kit: Kit) -> None:
    inst = _instance()
    await kit.instances.ingest([inst], not_before=utcnow())
    job = await kit.jobs.claim()
    assert job is not None
    assert await kit.jobs.fail(job.id, "boom", max_attempts=2) is JobState.PENDING
    await asyncio.sleep(1.05)  # a failed attempt waits a second before the job is due again
    again = await kit.jobs.claim()
    assert again is not None and again.id == job.id and again.attempts == 2
    assert await kit.jobs.fail(job.id, "boom", max_attempts=2) is JobState.FAILED


async def test_an_expired_lease_moves_the_job_and_refuses_the_late_result(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two workers on one database (as on PostgreSQL): A stalls past its lease, B takes the job over, A's
    late result is refused, B's is the one result. The leases' clock is the test's: with a real 0.2 s lease
    a loaded machine (CI, 2026-12-06) took longer than the lease between A's claim and B's look."""
    url = f"sqlite:///{tmp_path / 'shared.sqlite'}"
    a = open_kit(url, tmp_path, worker_id="A", lease_seconds=60)
    b = open_kit(url, tmp_path, worker_id="B", lease_seconds=60)
    a.db.shared = b.db.shared = True  # behave as on a server database: leases, no reset at start
    try:
        inst = _instance()
        await a.instances.ingest([inst], not_before=utcnow())
        clock = [utcnow()]
        monkeypatch.setattr(jobs_module, "utcnow", lambda: clock[0])
        job = await a.jobs.claim()
        assert job is not None
        assert await b.jobs.recover() == 0 and await b.jobs.claim() is None  # A's lease is live
        assert await a.jobs.heartbeat([job.id]) == 1
        clock[0] += timedelta(seconds=61)  # A stops heart-beating
        assert await b.jobs.recover() == 1
        taken = await b.jobs.claim()
        assert taken is not None and taken.id == job.id and taken.attempts == 2
        assert await a.jobs.heartbeat([job.id]) == 0  # A learns it lost the job
        with pytest.raises(LeaseLostError):
            await a.finish(job)
        await b.finish(taken)
        assert await b.results.count(inst.study_uid) == 1
    finally:
        a.close()
        b.close()
