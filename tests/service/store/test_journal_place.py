"""The group commit with the data journal: success once the record is fdatasync'd, the file placed in the
background before its row, association ends behind their instances; the start-up replay places and
indexes what a stop or crash left only in the journal, exactly once (service/store/journal_place.py)."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from service.clock import utcnow
from service.config import AssemblySettings
from service.errors import SopInstanceConflictError
from service.store.db import InstanceRow, JobRow
from service.store.group_commit import GroupCommit
from service.store.journal import Journal
from service.store.journal_format import HEADER, encode_meta
from service.store.journal_place import Placer, replay_journal
from service.store.validate import parse_instance
from tests.service.dicom_factory import chest
from tests.service.store.kit import Kit, counted_series

SEGMENT = 4 << 20


def _rows(kit: Kit) -> set[str]:
    with Session(kit.db.engine) as s:
        return set(s.scalars(select(InstanceRow.sop_instance_uid)))


def _jobs(kit: Kit) -> list[JobRow]:
    with Session(kit.db.engine) as s:
        return list(s.scalars(select(JobRow)))


def _journal(kit: Kit) -> Journal:
    j = Journal(kit.instances.instances_dir.parent / "journal", segment_bytes=SEGMENT)
    replay_journal(j, kit.instances, quiet_seconds=60)
    return j


def _commits(kit: Kit, delay: float = 0.0) -> GroupCommit:
    placer = Placer(_journal(kit), kit.instances, delay_seconds=delay)
    return GroupCommit(kit.instances, quiet_seconds=60, assembly=AssemblySettings(), placer=placer)


@pytest.fixture
def commits(kit: Kit) -> Iterator[GroupCommit]:
    gc = _commits(kit)
    yield gc
    gc.stop(30)


def test_the_answer_comes_after_the_journal_then_the_file_then_the_row(kit: Kit) -> None:
    gc = _commits(kit, delay=600)  # placement held: the window between the answer and the file
    series = counted_series(3)
    for p in series:
        assert gc.store(p, held=True) is True
    gc.start()
    assert not any(kit.instances.record(p).path.exists() for p in series)
    assert _rows(kit) == set() and gc.holds_rows_of(series[0].study_uid)  # the API says 202, not 404
    assert gc.placer is not None and gc.placer.journal.pending_bytes > 0
    gc.stop(0.5)  # not placed: left to the replay

    j = Journal(kit.instances.instances_dir.parent / "journal", segment_bytes=SEGMENT)
    done = replay_journal(j, kit.instances, quiet_seconds=60)
    assert (done.records, done.instances, done.torn, done.due) == (3, 3, 0, True)  # the series is full
    assert _rows(kit) == {p.sop_instance_uid for p in series}
    assert all(kit.instances.record(p).path.read_bytes() == p.data for p in series)
    (job,) = _jobs(kit)
    assert job.not_before <= utcnow()
    j.close()
    again = replay_journal(
        Journal(kit.instances.instances_dir.parent / "journal"), kit.instances, quiet_seconds=60, keep=False
    )
    assert (again.records, again.instances) == (0, 0)  # the replayed segments were retired
    assert len(_jobs(kit)) == 1


def test_placed_files_get_their_rows_and_the_journal_empties(kit: Kit, commits: GroupCommit) -> None:
    commits.start()
    series = counted_series(6)
    for p in series:
        assert commits.store(p, held=True)
    assert commits.flush(30)
    assert _rows(kit) == {p.sop_instance_uid for p in series}
    assert all(kit.instances.record(p).path.read_bytes() == p.data for p in series)
    assert not list(kit.instances.instances_dir.rglob(".incoming-*"))
    assert commits.placer is not None and commits.placer.journal.pending_bytes == 0
    assert not commits.holds_rows_of(series[0].study_uid)


def test_records_placed_and_committed_are_not_replayed_twice(kit: Kit) -> None:
    """A crash after the rows but before the segment was reused: the records are read, and skipped."""
    gc = _commits(kit)
    gc.start()
    series = counted_series(4)
    for p in series:
        gc.store(p, held=True)
    assert gc.flush(30)
    gc.stop(30)
    done = replay_journal(
        Journal(kit.instances.instances_dir.parent / "journal", segment_bytes=SEGMENT),
        kit.instances,
        quiet_seconds=60,
        keep=False,
    )
    assert (done.records, done.instances) == (4, 0)
    assert len(_jobs(kit)) == 1


def test_a_duplicate_waiting_for_its_file_is_a_success_stored_once(kit: Kit) -> None:
    gc = _commits(kit, delay=0.2)
    (p,) = counted_series(1)
    assert gc.store(p, held=True) is True
    assert gc.store(p, held=True) is False
    gc.start()
    assert gc.flush(30)
    assert gc.store(p, held=True) is False  # once committed: the record written meanwhile is discarded
    assert gc.placer is not None and gc.placer.journal.pending_bytes == 0
    assert _rows(kit) == {p.sop_instance_uid} and len(_jobs(kit)) == 1
    gc.stop(30)


def test_a_uid_of_another_study_is_refused_while_the_first_waits(kit: Kit, commits: GroupCommit) -> None:
    first = parse_instance(chest(sop_uid="1.2.3.4.5"), "a")
    other = parse_instance(chest(sop_uid="1.2.3.4.5", pixels=None, value=10.0), "b")
    assert commits.store(first, held=True)
    with pytest.raises(SopInstanceConflictError):
        commits.store(other, held=True)
    commits.start()
    assert commits.flush(30)
    assert _rows(kit) == {first.sop_instance_uid}
    assert not kit.instances.record(other).path.exists()


def test_an_association_end_waits_for_the_files_of_its_instances(kit: Kit) -> None:
    """A radiograph held while its association is open, released at once: its end travels behind its
    file, so the gate finds the row and makes the study due now."""
    gc = _commits(kit, delay=0.2)
    p = parse_instance(chest(), "cr")
    assert gc.store(p, held=True)
    gc.ended((p.study_uid,), released=True)
    gc.start()
    assert gc.flush(30)
    (job,) = _jobs(kit)
    assert job.not_before <= utcnow()
    gc.stop(30)


def test_concurrent_associations_all_land_once(kit: Kit, commits: GroupCommit) -> None:
    commits.start()
    series = counted_series(12)
    answers: list[bool] = []
    threads = [
        threading.Thread(
            target=lambda part=series[i::4]: answers.extend(commits.store(p, held=False) for p in part)
        )
        for i in range(4)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert answers == [True] * 12
    assert commits.flush(30)
    assert _rows(kit) == {p.sop_instance_uid for p in series}
    (job,) = _jobs(kit)
    assert job.not_before <= utcnow()


def test_a_torn_tail_is_discarded_at_replay(kit: Kit) -> None:
    gc = _commits(kit, delay=600)
    a, b = counted_series(2)
    assert gc.store(a, held=True)
    gc.start()
    gc.stop(0.5)
    directory = kit.instances.instances_dir.parent / "journal"
    (seg,) = directory.glob("journal-*.seg")
    with seg.open("r+b") as fh:  # b's record begun and cut short by the crash: never acknowledged
        fh.seek(HEADER.size + len(encode_meta(a.study_uid, a.series_uid, a.sop_instance_uid)) + len(a.data))
        fh.write(b"PTJ1" + b"\x07" * 1000)
    done = replay_journal(
        Journal(directory, segment_bytes=SEGMENT), kit.instances, quiet_seconds=60, keep=False
    )
    assert (done.records, done.instances, done.torn) == (1, 1, 1)
    assert _rows(kit) == {a.sop_instance_uid}
    assert not kit.instances.record(b).path.exists()
