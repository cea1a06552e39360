"""Start-up re-index: acknowledged files without a row become ordinary arrivals, exactly once; retention's
leftovers are removed, not resurrected; what cannot be read is left alone."""

from __future__ import annotations

import os
from datetime import UTC, timedelta

import pytest
from sqlalchemy.orm import Session

from service.clock import utcnow
from service.store.db import StudyRow
from service.store.reindex import reindex
from service.store.validate import parse_instance
from tests.service.dicom_factory import chest
from tests.service.store.kit import Kit, counted_series, instance_uids, job_rows

pytestmark = pytest.mark.anyio


def test_files_without_rows_become_arrivals_once(kit: Kit) -> None:
    """A crash after the answers and before the group commit: half the series has rows, half only files."""
    series = counted_series(6)
    for p in series:
        kit.instances.write(p)  # all six acknowledged ...
    now = utcnow()
    kit.db.run_blocking(
        kit.instances.commit_rows,
        series[:3],
        not_before=now + timedelta(hours=1),
        hold_until=None,
        complete_when_full=True,
    )
    # ... and the last three rows died with the process
    (job,) = job_rows(kit)
    assert job.not_before > utcnow()  # 3 of 6: waiting

    done = reindex(kit.instances, quiet_seconds=3600)
    assert (done.instances, done.studies, done.leftovers, done.unreadable) == (3, 1, 0, 0)
    assert done.due  # the re-indexed slices completed the series: due at once, as arrivals would make it
    assert instance_uids(kit) == {p.sop_instance_uid for p in series}
    (job,) = job_rows(kit)  # the study's one pending job, moved: not a second one
    assert job.not_before <= utcnow() and job.state == "pending"

    again = reindex(kit.instances, quiet_seconds=3600)
    assert (again.instances, again.leftovers, again.unreadable) == (0, 0, 0)
    assert len(job_rows(kit)) == 1


async def test_an_analysed_study_is_not_analysed_again(kit: Kit) -> None:
    series = counted_series(2)
    await kit.instances.ingest(series, not_before=utcnow())
    job = await kit.jobs.claim()
    assert job is not None
    await kit.finish(job)
    done = reindex(kit.instances, quiet_seconds=0)
    assert done.instances == 0 and len(job_rows(kit)) == 1


async def test_retention_leftovers_are_removed_not_resurrected(kit: Kit) -> None:
    """Retention deletes rows, then files; a crash in between leaves files of a purged study."""
    old = parse_instance(chest(), "old")
    await kit.instances.ingest([old], not_before=utcnow())
    await kit.analyse_and_purge(old.study_uid)
    with Session(kit.db.engine) as s:
        row = s.get(StudyRow, old.study_uid)
        assert row is not None and row.purged_at is not None
        purged = row.purged_at
    purged_at = (purged if purged.tzinfo else purged.replace(tzinfo=UTC)).timestamp()
    leftover = kit.instances.record(old).path
    kit.instances.write(old)  # the file the crash kept: last written before the purge
    os.utime(leftover, (purged_at - 60, purged_at - 60))
    late = parse_instance(chest(study_uid=old.study_uid), "late")  # acknowledged after the purge
    kit.instances.write(late)
    os.utime(kit.instances.record(late).path, (purged_at + 1, purged_at + 1))

    done = reindex(kit.instances, quiet_seconds=3600)
    assert (done.instances, done.leftovers) == (1, 1)
    assert not leftover.exists()
    assert instance_uids(kit) == {late.sop_instance_uid}
    with Session(kit.db.engine) as s:
        assert s.get(StudyRow, old.study_uid).instance_count == 1  # type: ignore[union-attr]


def test_unreadable_and_mismatched_files_are_left_alone(kit: Kit) -> None:
    p = parse_instance(chest(), "x")
    kit.instances.write(p)
    path = kit.instances.record(p).path
    path.write_bytes(b"not DICOM at all")
    other = parse_instance(chest(), "y")
    misplaced = path.parent / "1.2.3.999.dcm"
    misplaced.write_bytes(other.data)  # its content names another SOP Instance UID than its path
    done = reindex(kit.instances, quiet_seconds=60)
    assert (done.instances, done.unreadable) == (0, 2)
    assert path.exists() and misplaced.exists() and instance_uids(kit) == set()


def test_young_files_are_left_to_their_writer_in_a_shared_store(kit: Kit) -> None:
    p = parse_instance(chest(), "x")
    kit.instances.write(p)
    assert reindex(kit.instances, quiet_seconds=60, min_age_seconds=300).instances == 0
    old = (utcnow() - timedelta(minutes=10)).timestamp()
    os.utime(kit.instances.record(p).path, (old, old))
    assert reindex(kit.instances, quiet_seconds=60, min_age_seconds=300).instances == 1
