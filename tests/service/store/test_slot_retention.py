"""Retention and slots: a study purged after its instances were placed and committed is never brought back
by the slots' replay at the next start (service/store/slots.py, issue 20).

Real files, real slots, the real group commit and placer, SQLite and PostgreSQL."""

from __future__ import annotations

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from service.clock import utcnow
from service.config import AssemblySettings
from service.store.db import JobRow, JobState, StudyRow
from service.store.group_commit import GroupCommit
from service.store.reindex import reindex
from service.store.slot_place import Placer, replay_slots
from tests.service.store.kit import Kit, counted_series, instance_uids, job_rows, slots_of

pytestmark = pytest.mark.anyio


def _start(kit: Kit) -> GroupCommit:
    """The listener's start: replay the slots, then the group commit with its placer."""
    slots = slots_of(kit)
    replay_slots(slots, kit.instances, quiet_seconds=60)
    gc = GroupCommit(
        kit.instances, quiet_seconds=60, assembly=AssemblySettings(), placer=Placer(slots, kit.instances)
    )
    gc.start()
    return gc


async def test_a_purged_study_is_not_replayed_at_the_next_start(kit: Kit) -> None:
    """Received through slots, placed, committed, analysed; purged by retention; a restart. (The segment
    journal's replay once placed and indexed the committed records of its current segment again: rows,
    files and a second job for a purged study, a second result, a second SR to the PACS.)"""
    gc = _start(kit)
    series = counted_series(3)
    for p in series:
        assert gc.store(p, held=False) is True  # 0x0000: the slot is fdatasync'd
    assert gc.flush(30)  # placed and committed
    study = series[0].study_uid
    await kit.analyse_and_purge(study)
    assert instance_uids(kit) == set()
    assert not any(kit.instances.record(p).path.exists() for p in series)
    gc.stop(30)

    slots = slots_of(kit)
    done = replay_slots(slots, kit.instances, quiet_seconds=0)  # quiet 0: anything indexed is due now
    slots.close()
    assert (done.records, done.instances, done.waiting) == (0, 0, [])
    assert reindex(kit.instances, quiet_seconds=0).instances == 0
    assert instance_uids(kit) == set()
    assert not any(kit.instances.record(p).path.exists() for p in series)
    assert [j.state for j in job_rows(kit)] == [JobState.DONE]  # the one analysis, no second job
    with Session(kit.db.engine) as s:
        row = s.get(StudyRow, study)
        assert row is not None and row.purged_at is not None and row.instance_count == 0


async def test_a_late_instance_after_the_purge_is_kept_across_a_restart(kit: Kit) -> None:
    """The other side of the same rule: an instance of the purged study acknowledged after the purge and
    killed before its file and row is still replayed, once (a late image re-opens the study)."""
    gc = _start(kit)
    first, late = counted_series(2)
    assert gc.store(first, held=False)
    assert gc.flush(30)
    gc.stop(30)
    # the study is complete only with both: analyse what arrived, as the quiet timer would have
    with Session(kit.db.engine) as s, s.begin():
        (job,) = s.scalars(select(JobRow))
        job.not_before = utcnow()
    await kit.analyse_and_purge(first.study_uid)

    gc = _start(kit)
    assert gc.placer is not None
    gc.placer.delay_seconds = 600  # the kill comes before the late instance is placed
    assert gc.store(late, held=False) is True
    gc.stop(0.5)

    slots = slots_of(kit)
    done = replay_slots(slots, kit.instances, quiet_seconds=0)
    slots.close()
    assert (done.records, done.instances) == (1, 1)
    assert instance_uids(kit) == {late.sop_instance_uid}
    assert kit.instances.record(late).path.read_bytes()[128:] == late.data[128:]
    assert not kit.instances.record(first).path.exists()
    assert sorted(j.state for j in job_rows(kit)) == [JobState.DONE, JobState.PENDING]  # the re-opened study
