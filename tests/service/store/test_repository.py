"""The job store: durable ingest, stat-first claiming, crash recovery, results that supersede.

Every test runs on both backends: SQLite (the embedded default) and a real PostgreSQL (scale-out).
"""

from __future__ import annotations

import asyncio
from datetime import timedelta
from pathlib import Path

import pytest
from pydicom.uid import generate_uid

from service.results.schema import StudyResult
from service.store.db import utcnow
from service.store.repository import Store
from service.store.validate import parse_instance
from tests.service.dicom_factory import chest

pytestmark = pytest.mark.anyio


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.e2e)])
def store(request: pytest.FixtureRequest, tmp_path: Path):
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    else:
        url = request.getfixturevalue("postgres_url")
    s = Store(url, tmp_path / "instances")
    yield s
    s.close()


def _instance(study: str | None = None):
    return parse_instance(chest(study_uid=study or generate_uid()), "part 1")


def _result(job_id: int, study: str):
    return lambda prev, st: StudyResult(
        result_id=f"r{job_id}", study_uid=study, status="not_analysed", priority="routine", supersedes=prev
    )


async def test_stat_is_claimed_before_older_routine(store: Store) -> None:
    routine, stat = _instance(), _instance()
    now = utcnow()
    await store.ingest([routine], not_before=now - timedelta(seconds=5), priority=2)
    await store.ingest([stat], not_before=now, priority=0)
    first = await store.claim()
    assert first is not None and first.study_uid == stat.study_uid and first.attempts == 1
    second = await store.claim()
    assert second is not None and second.study_uid == routine.study_uid
    assert await store.claim() is None


async def test_quiet_gate_and_recover(store: Store) -> None:
    inst = _instance()
    await store.ingest([inst], not_before=utcnow() + timedelta(hours=1))
    assert await store.claim() is None  # not due yet
    await store.ingest([_instance(inst.study_uid)], not_before=utcnow())  # a later instance moves the gate
    store.lease = timedelta(milliseconds=1)  # on PostgreSQL only an expired lease is given back
    job = await store.claim()
    assert job is not None
    await asyncio.sleep(0.01)
    assert await store.recover() == 1  # "crash": the running job goes back to pending
    again = await store.claim()
    assert again is not None and again.id == job.id and again.attempts == 2


async def test_results_supersede_and_are_written_once(store: Store) -> None:
    inst = _instance()
    await store.ingest([inst], not_before=utcnow())
    job = await store.claim()
    assert job is not None
    first = await store.save_result(job.id, _result(job.id, inst.study_uid))
    assert first.supersedes is None
    # Same instance again: nothing new, so no new job.
    await store.ingest([inst], not_before=utcnow())
    assert await store.claim() is None
    await store.ingest([_instance(inst.study_uid)], not_before=utcnow())
    job2 = await store.claim()
    assert job2 is not None
    second = await store.save_result(job2.id, _result(job2.id, inst.study_uid))
    assert second.supersedes == first.result_id
    status = await store.study_status(inst.study_uid)
    assert status.result == second and not status.outstanding
    assert await store.count_results(inst.study_uid) == 2


async def test_failures_retry_then_fail(store: Store) -> None:
    inst = _instance()
    await store.ingest([inst], not_before=utcnow())
    job = await store.claim()
    assert job is not None
    assert await store.fail(job.id, "boom", max_attempts=2) == "pending"
    await asyncio.sleep(1.05)  # a failed attempt waits a second before the job is due again
    again = await store.claim()
    assert again is not None and again.id == job.id and again.attempts == 2
    assert await store.fail(job.id, "boom", max_attempts=2) == "failed"


async def test_an_expired_lease_moves_the_job_and_refuses_the_late_result(tmp_path: Path) -> None:
    """Two workers on one database (as on PostgreSQL): A stalls past its lease, B takes the job over, A's
    late result is refused, B's is the one result."""
    from service.store.repository import LeaseLostError

    url = f"sqlite:///{tmp_path / 'shared.sqlite'}"
    a = Store(url, tmp_path / "instances", worker_id="A", lease_seconds=0.2)
    b = Store(url, tmp_path / "instances", worker_id="B", lease_seconds=0.2)
    a.shared = b.shared = True  # behave as on a server database: leases, no reset at start
    try:
        inst = _instance()
        await a.ingest([inst], not_before=utcnow())
        job = await a.claim()
        assert job is not None
        assert await b.recover() == 0 and await b.claim() is None  # A's lease is live
        assert await a.heartbeat([job.id]) == 1
        await asyncio.sleep(0.3)  # A stops heart-beating
        assert await b.recover() == 1
        taken = await b.claim()
        assert taken is not None and taken.id == job.id and taken.attempts == 2
        assert await a.heartbeat([job.id]) == 0  # A learns it lost the job
        with pytest.raises(LeaseLostError):
            await a.save_result(job.id, _result(job.id, inst.study_uid))
        await b.save_result(taken.id, _result(taken.id, inst.study_uid))
        assert await b.count_results(inst.study_uid) == 1
    finally:
        a.close()
        b.close()
