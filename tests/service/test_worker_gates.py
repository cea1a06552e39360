"""Idle workers sleep until woken; one gate watcher reads when the next job is due and wakes them then.

Each idle worker used to poll the queue itself (two reads per worker every ``poll_seconds``): an idle
service with four workers made 16 reads a second. Here the real app runs with four workers, and the jobs
store is watched (a spy around the real methods, which still run).
"""

from __future__ import annotations

import asyncio
from datetime import datetime, timedelta
from typing import Any

import pytest

from service.clock import utcnow
from service.store.validate import parse_instance
from tests.service.conftest import running_app
from tests.service.dicom_factory import chest

pytestmark = pytest.mark.anyio


def _count(obj: Any, name: str, calls: list[str]) -> None:
    real = getattr(obj, name)

    async def counted(*args: Any, **kwargs: Any) -> Any:
        calls.append(name)
        return await real(*args, **kwargs)

    setattr(obj, name, counted)


async def test_idle_workers_do_not_read_the_queue(make_settings) -> None:
    settings = make_settings(worker={"poll_seconds": 0.05, "concurrency": 4})
    async with running_app(settings) as (app, _client):
        jobs = app.state.triage.jobs
        calls: list[str] = []
        _count(jobs, "claim", calls)
        _count(jobs, "next_due", calls)
        await asyncio.sleep(0.3)  # the workers' first claims at start are done
        calls.clear()
        await asyncio.sleep(1.0)
        assert calls.count("claim") == 0, calls  # nothing woke them: they read nothing
        # the watcher, once per poll (20 in 1 s); four polling workers made 80 reads of each kind
        assert 5 <= calls.count("next_due") <= 30, calls.count("next_due")


async def test_a_job_is_claimed_when_its_gate_opens_without_any_wake(make_settings) -> None:
    """A study stored with a quiet timer and no wake (as DICOM instances that only push the timer): the
    watcher sees the gate open and wakes a worker, which analyses it."""
    settings = make_settings(worker={"poll_seconds": 0.05, "concurrency": 2})
    async with running_app(settings) as (app, client):
        triage = app.state.triage
        parsed = parse_instance(chest(), part="test", images_only=True)
        gate = utcnow() + timedelta(seconds=0.5)
        await triage.instances.ingest([parsed], not_before=gate)  # nobody sets the workers' event
        for _ in range(200):
            r = await client.get(f"/v1/studies/{parsed.study_uid}/result")
            if r.status_code == 200:
                break
            await asyncio.sleep(0.05)
        assert r.status_code == 200, r.text
        started = datetime.fromisoformat(r.json()["timestamps"]["inference_started"])
        assert started >= gate  # not before its gate


async def test_a_wake_that_comes_while_a_worker_claims_is_not_lost(make_settings) -> None:
    """A job made due while an idle worker's claim is under way (the claim found nothing; the commit that
    made the job due wakes the workers just after): the worker claims again at once. It used to clear
    the wake after its empty claim and sleep until the gate watcher's next look, up to ``poll_seconds``
    (0.5 s by default; 60 here, so a lost wake cannot pass)."""
    settings = make_settings(worker={"poll_seconds": 60, "concurrency": 1})
    async with running_app(settings) as (app, client):
        triage = app.state.triage
        parsed = parse_instance(chest(), part="test", images_only=True)
        real = triage.jobs.claim
        armed = [False]

        async def claim() -> Any:
            job = await real()
            if job is None and armed[0]:  # the claim read an empty queue; now the job becomes due ...
                armed[0] = False
                await triage.instances.ingest([parsed], not_before=utcnow())
                triage.notifier.work.set()  # ... and its wake arrives before the claim's answer is used
            return job

        triage.jobs.claim = claim
        await asyncio.sleep(0.2)  # the worker's first claim at start is done: it waits for a wake
        armed[0] = True
        triage.notifier.work.set()  # any wake: the worker claims (the spy above) and finds nothing
        for _ in range(100):
            r = await client.get(f"/v1/studies/{parsed.study_uid}/result")
            if r.status_code == 200:
                break
            await asyncio.sleep(0.05)
        assert not armed[0], "the spy's claim never ran"
        assert r.status_code == 200, "the job waited for the gate watcher: the wake was lost"
