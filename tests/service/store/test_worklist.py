"""The worklist query: sorted, filtered and paged by the database, as the priority policy says."""

from __future__ import annotations

from datetime import timedelta

import pytest
from pydicom.uid import generate_uid
from sqlalchemy import update

from service.clock import utcnow
from service.store.db import StudyRow
from service.store.validate import parse_instance
from service.store.worklist import WorklistStore
from tests.service.dicom_factory import chest
from tests.service.store.kit import Kit

pytestmark = pytest.mark.anyio


async def _study(kit: Kit, urgency: str | None) -> str:
    """A study with one result: a positive finding of ``urgency``, or nothing found (None)."""
    inst = parse_instance(chest(study_uid=generate_uid()), "part 1")
    await kit.instances.ingest([inst], not_before=utcnow())
    job = await kit.jobs.claim()
    assert job is not None
    await kit.finish(job, priority=urgency or "routine", findings=urgency is not None)
    return inst.study_uid


async def test_priority_then_longest_waiting_in_pages(kit: Kit) -> None:
    routine_old, stat, urgent, routine_new, starved = [
        await _study(kit, u) for u in (None, "stat", "urgent", None, None)
    ]
    now = utcnow()
    ages = {routine_old: 50, stat: 10, urgent: 20, routine_new: 5, starved: 120}  # minutes waiting
    with kit.db.engine.begin() as c:
        for uid, minutes in ages.items():
            c.execute(
                update(StudyRow)
                .where(StudyRow.study_uid == uid)
                .values(first_received=now - timedelta(minutes=minutes))
            )
    worklist = WorklistStore(kit.db, max_wait_minutes=60)
    entries = await worklist.entries()
    # stat; then urgent: the starved routine study (promoted, waiting longest) and the urgent one; routine
    assert [e.study_uid for e in entries] == [stat, starved, urgent, routine_old, routine_new]
    assert [e.priority for e in entries] == ["stat", "urgent", "urgent", "routine", "routine"]
    assert [e.promoted for e in entries] == [False, True, False, False, False]
    page = await worklist.entries(limit=2, offset=2)
    assert [e.study_uid for e in page] == [urgent, routine_old]
    assert [e.study_uid for e in await worklist.entries(priority="urgent")] == [starved, urgent]
    assert all(e.result is not None for e in entries)
    await worklist.acknowledge(stat, "dr", None)
    assert [e.study_uid for e in await worklist.entries(state="acknowledged")] == [stat]
    assert stat not in [e.study_uid for e in await worklist.entries()]
