"""The job store: durable ingest, stat-first claiming, crash recovery, results that supersede."""

from __future__ import annotations

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


@pytest.fixture
def store(tmp_path: Path):
    s = Store(f"sqlite:///{tmp_path / 'db.sqlite'}", tmp_path / "instances")
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
    job = await store.claim()
    assert job is not None
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
    assert await store.fail(job.id, "boom", max_attempts=1) == "failed"
