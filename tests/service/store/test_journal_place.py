"""The group commit with the data journal: success once the record is fdatasync'd, the file placed in the
background before its row, association ends behind their instances; the start-up replay places and
indexes what a stop or crash left only in the journal, exactly once (service/store/journal_place.py)."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from service.clock import utcnow
from service.config import AssemblySettings
from service.errors import SopInstanceConflictError, StorageFullError
from service.store.files import instance_relpath, write_durably
from service.store.group_commit import GroupCommit
from service.store.journal import Journal
from service.store.journal_format import HEADER, encode_meta
from service.store.journal_place import Placer, replay_journal
from service.store.reindex import reindex
from service.store.validate import parse_instance
from tests.service.dicom_factory import chest
from tests.service.store.kit import (
    Kit,
    counted_series,
    fill,
    instance_uids,
    job_rows,
    open_kit,
    replay_at_restart,
)

SEGMENT = 4 << 20


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
    assert instance_uids(kit) == set() and gc.holds_rows_of(series[0].study_uid)  # the API says 202, not 404
    assert gc.placer is not None and gc.placer.journal.pending_bytes > 0
    gc.stop(0.5)  # not placed: left to the replay

    j = Journal(kit.instances.instances_dir.parent / "journal", segment_bytes=SEGMENT)
    done = replay_journal(j, kit.instances, quiet_seconds=60)
    assert (done.records, done.instances, done.torn, done.due) == (3, 3, 0, True)  # the series is full
    assert instance_uids(kit) == {p.sop_instance_uid for p in series}
    assert all(kit.instances.record(p).path.read_bytes() == p.data for p in series)
    (job,) = job_rows(kit)
    assert job.not_before <= utcnow()
    j.close()
    again = replay_journal(
        Journal(kit.instances.instances_dir.parent / "journal"), kit.instances, quiet_seconds=60, keep=False
    )
    assert (again.records, again.instances) == (0, 0)  # the replayed segments were retired
    assert len(job_rows(kit)) == 1


def test_placed_files_get_their_rows_and_the_journal_empties(kit: Kit, commits: GroupCommit) -> None:
    commits.start()
    series = counted_series(6)
    for p in series:
        assert commits.store(p, held=True)
    assert commits.flush(30)
    assert instance_uids(kit) == {p.sop_instance_uid for p in series}
    assert all(kit.instances.record(p).path.read_bytes() == p.data for p in series)
    assert not list(kit.instances.instances_dir.rglob(".incoming-*"))
    assert commits.placer is not None and commits.placer.journal.pending_bytes == 0
    assert not commits.holds_rows_of(series[0].study_uid)


def test_records_placed_and_committed_are_not_replayed_twice(kit: Kit) -> None:
    """A crash while the current segment holds committed records beside one still waiting (so it was not
    cleared): all are read; the committed ones are skipped, the waiting one placed."""
    gc = _commits(kit)
    series = counted_series(5)
    assert gc.placer is not None
    first = series[0]  # acknowledged, and the process dies before its placement
    gc.placer.journal.append(first.study_uid, first.series_uid, first.sop_instance_uid, first.data)
    gc.start()
    for p in series[1:]:
        gc.store(p, held=True)
    assert gc.flush(30)
    gc.stop(30)
    done = replay_at_restart(kit, SEGMENT)
    assert (done.records, done.instances) == (5, 1)
    assert instance_uids(kit) == {p.sop_instance_uid for p in series}
    assert len(job_rows(kit)) == 1


def test_once_every_record_is_committed_the_replay_reads_none(kit: Kit) -> None:
    """The current segment is cleared by the commit of its last row (before ``flush`` returns): a start
    after that has nothing to read (retention may have purged those studies since: issue 20)."""
    gc = _commits(kit)
    gc.start()
    series = counted_series(4)
    for p in series:
        gc.store(p, held=True)
    assert gc.flush(30)
    gc.stop(30)
    done = replay_at_restart(kit, SEGMENT)
    assert (done.records, done.instances) == (0, 0)
    assert len(job_rows(kit)) == 1


def test_a_duplicate_waiting_for_its_file_is_a_success_stored_once(kit: Kit) -> None:
    gc = _commits(kit, delay=0.2)
    (p,) = counted_series(1)
    assert gc.store(p, held=True) is True
    assert gc.store(p, held=True) is False
    gc.start()
    assert gc.flush(30)
    assert gc.store(p, held=True) is False  # once committed: the record written meanwhile is discarded
    assert gc.placer is not None and gc.placer.journal.pending_bytes == 0
    assert instance_uids(kit) == {p.sop_instance_uid} and len(job_rows(kit)) == 1
    gc.stop(30)


def test_a_uid_of_another_study_is_refused_while_the_first_waits(kit: Kit, commits: GroupCommit) -> None:
    first = parse_instance(chest(sop_uid="1.2.3.4.5"), "a")
    other = parse_instance(chest(sop_uid="1.2.3.4.5", pixels=None, value=10.0), "b")
    assert commits.store(first, held=True)
    with pytest.raises(SopInstanceConflictError):
        commits.store(other, held=True)
    commits.start()
    assert commits.flush(30)
    assert instance_uids(kit) == {first.sop_instance_uid}
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
    (job,) = job_rows(kit)
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
    assert instance_uids(kit) == {p.sop_instance_uid for p in series}
    (job,) = job_rows(kit)
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
    done = replay_at_restart(kit, SEGMENT)
    assert (done.records, done.instances, done.torn) == (1, 1, 1)
    assert instance_uids(kit) == {a.sop_instance_uid}
    assert not kit.instances.record(b).path.exists()


def test_a_replay_without_room_keeps_the_records_and_places_them_once_there_is_room(
    db_url: str, small_disk: Path
) -> None:
    """Acknowledged instances only in the journal, and a restart on a full disk: the replay cannot write
    their files. They stay in the journal (a crash meanwhile replays them again), and once there is room
    the placer writes them and they get their rows, once. (The replay used to count them "cannot be
    placed", skip them and reuse their segment: acknowledged instances lost.)"""
    kit = open_kit(db_url, small_disk)
    directory = small_disk / "journal"
    try:
        gc = _commits(kit, delay=600)  # placement held: the answers came, the files did not
        series = counted_series(3)
        for p in series:
            assert gc.store(p, held=True)
        gc.start()
        gc.stop(0.5)
        filler = fill(small_disk)

        for _ in range(2):  # the second start: as after a crash before there was room
            j = Journal(directory, segment_bytes=SEGMENT)
            done = replay_journal(j, kit.instances, quiet_seconds=60)
            assert (done.records, done.instances, done.unreadable) == (3, 0, 0)
            assert [p.sop_instance_uid for p, _ in done.waiting] == [p.sop_instance_uid for p in series]
            assert instance_uids(kit) == set()
            j.close()

        j = Journal(directory, segment_bytes=SEGMENT)
        done = replay_journal(j, kit.instances, quiet_seconds=60)
        gc = GroupCommit(
            kit.instances, quiet_seconds=60, assembly=AssemblySettings(), placer=Placer(j, kit.instances)
        )
        gc.resume(done.waiting)
        gc.start()
        assert gc.store(series[0], held=False) is False  # sent again meanwhile: a duplicate, a success
        assert gc.holds_rows_of(series[0].study_uid)  # the API says 202, not 404
        filler.unlink()  # the operator makes room
        assert gc.flush(60)
        assert instance_uids(kit) == {p.sop_instance_uid for p in series}
        assert all(kit.instances.record(p).path.read_bytes() == p.data for p in series)
        (job,) = job_rows(kit)
        assert job.not_before <= utcnow()  # the series is full
        assert j.pending_bytes == 0
        gc.stop(30)
        again = replay_journal(
            Journal(directory, segment_bytes=SEGMENT), kit.instances, quiet_seconds=60, keep=False
        )
        assert (again.records, again.waiting) == (0, [])  # the held segment was retired once done
    finally:
        kit.close()


def test_once_there_is_room_again_the_next_instance_is_taken_while_the_placer_backs_off(
    db_url: str, small_disk: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Placements fail (disk full) and the placer backs off, 5 s after its fourth failure. Meanwhile a new
    instance is refused (0xA700) only after a fresh attempt it asked for failed too; once the operator has
    made room, the next instance asks for one, the backlog is placed, and it is taken at once. (It used to be
    refused for the rest of the 5 s, on the last attempt's verdict: a study re-sent right after space
    returned never completed, a CI run of tests/reliability/test_faults.py.)"""
    kit = open_kit(db_url, small_disk)
    caplog.set_level(logging.DEBUG, logger="service.store.journal_place")
    gc = _commits(kit)
    try:
        first, refused, sent_again = counted_series(3)
        assert gc.store(first, held=True)  # acknowledged: in the journal, its file not placed yet
        filler = fill(small_disk)
        gc.start()
        deadline = time.monotonic() + 30
        while "into their files still failing (4 times)" not in caplog.text:
            assert time.monotonic() < deadline, "the placement was not retried"
            time.sleep(0.01)
        with pytest.raises(StorageFullError):  # still full: the fresh attempt fails too
            gc.store(refused, held=True)
        filler.unlink()  # the operator makes room, mid-backoff
        started = time.monotonic()
        assert gc.store(sent_again, held=True)
        assert time.monotonic() - started < 2.0  # woke the placer rather than waiting out its 5 s
        assert gc.flush(30)
        assert instance_uids(kit) == {first.sop_instance_uid, sent_again.sop_instance_uid}
        # Logged once when the placements started failing and once when they recovered, not per retry.
        assert caplog.text.count("placing journalled instances into their files failing") == 1
        assert "placing journalled instances into their files recovered after" in caplog.text
    finally:
        gc.stop(30)
        kit.close()


def test_a_kill_after_the_files_and_before_the_rows_indexes_each_once(kit: Kit) -> None:
    """The placed-to-row window, as SIGKILL leaves it: each acknowledged instance is both a journal record
    and a file, and has no row. The replay (first) and the re-index (after it) both see it; it gets one row,
    its study one job, due at once (the series is full), and nothing is indexed twice."""
    series = counted_series(4)
    directory = kit.instances.instances_dir.parent / "journal"
    j = Journal(directory, segment_bytes=SEGMENT)
    replay_journal(j, kit.instances, quiet_seconds=60)
    for p in series:
        j.append(p.study_uid, p.series_uid, p.sop_instance_uid, p.data)
        rel = instance_relpath(p.study_uid, p.series_uid, p.sop_instance_uid)
        write_durably(kit.instances.instances_dir, rel, p.data)
    j.close()  # the process is gone: no row was committed

    again = Journal(directory, segment_bytes=SEGMENT)
    done = replay_journal(again, kit.instances, quiet_seconds=60, keep=False)
    assert (done.records, done.instances, done.due) == (4, 4, True)
    assert reindex(kit.instances, quiet_seconds=60).instances == 0  # the files have their rows now
    assert instance_uids(kit) == {p.sop_instance_uid for p in series}
    (job,) = job_rows(kit)
    assert job.not_before <= utcnow()


def test_placements_linger_for_more_and_an_association_end_or_a_flush_does_not_wait(kit: Kit) -> None:
    """With the journal the placer batches (one directory fsync and one row commit per batch): its linger
    (here 60 s) holds a lone instance back, and an association end or a flush does not wait for it."""
    placer = Placer(_journal(kit), kit.instances, linger_seconds=60)
    gc = GroupCommit(kit.instances, quiet_seconds=60, assembly=AssemblySettings(), placer=placer)
    gc.start()
    try:
        a, b = counted_series(2)
        assert gc.store(a, held=True)
        time.sleep(0.3)
        assert instance_uids(kit) == set() and not kit.instances.record(a).path.exists()  # lingering
        gc.ended((a.study_uid,), released=True)
        deadline = time.monotonic() + 10
        while instance_uids(kit) != {a.sop_instance_uid}:
            assert time.monotonic() < deadline, "the association's end waited out the linger"
            time.sleep(0.01)
        assert gc.store(b, held=True)
        assert gc.flush(10), "a flush waited out the linger"
        assert instance_uids(kit) == {a.sop_instance_uid, b.sop_instance_uid}
    finally:
        gc.stop(30)
