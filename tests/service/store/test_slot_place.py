"""The group commit with slots: success once the slot is fdatasync'd, the slot renamed into place in the
background before its row, association ends behind their instances; the start-up replay places and
indexes what a stop or crash left only in a slot, exactly once; an older version's segment journal is
read once (service/store/slot_place.py, service/store/journal_legacy.py)."""

from __future__ import annotations

import json
import logging
import struct
import threading
import time
import zlib
from collections.abc import Iterable, Iterator
from pathlib import Path

import pytest

from service.clock import utcnow
from service.config import AssemblySettings
from service.errors import SopInstanceConflictError, StorageFullError
from service.store import files, slot_place
from service.store.files import Staged, instance_relpath, place_all
from service.store.group_commit import GroupCommit
from service.store.reindex import reindex
from service.store.slot_place import Placer, replay_slots
from service.store.slots import PREAMBLE, SlotStore, verify
from service.store.validate import ParsedInstance, parse_instance
from tests.service.dicom_factory import chest
from tests.service.store.kit import (
    Kit,
    counted_series,
    instance_uids,
    job_rows,
    open_kit,
    replay_at_restart,
    slots_of,
)


def _slots(kit: Kit) -> SlotStore:
    s = slots_of(kit)
    replay_slots(s, kit.instances, quiet_seconds=60)
    return s


def _commits(kit: Kit, delay: float = 0.0) -> GroupCommit:
    placer = Placer(_slots(kit), kit.instances, delay_seconds=delay)
    return GroupCommit(kit.instances, quiet_seconds=60, assembly=AssemblySettings(), placer=placer)


def _placed(kit: Kit, p: ParsedInstance) -> bool:
    """The instance's file holds its bytes as received after a valid slot record."""
    blob = kit.instances.record(p).path.read_bytes()
    return blob[PREAMBLE:] == p.data[PREAMBLE:] and verify(blob)


def _slot_files(kit: Kit) -> list[Path]:
    return sorted((kit.instances.instances_dir.parent / "slots").glob("slot-*.dcm"))


@pytest.fixture
def commits(kit: Kit) -> Iterator[GroupCommit]:
    gc = _commits(kit)
    yield gc
    gc.stop(30)


def test_the_answer_comes_after_the_slot_then_the_file_then_the_row(kit: Kit) -> None:
    gc = _commits(kit, delay=600)  # placement held: the window between the answer and the file
    series = counted_series(3)
    for p in series:
        assert gc.store(p, held=True) is True
    gc.start()
    assert not any(kit.instances.record(p).path.exists() for p in series)
    assert instance_uids(kit) == set() and gc.holds_rows_of(series[0].study_uid)  # the API says 202, not 404
    assert sum(verify(f.read_bytes()) for f in _slot_files(kit)) == 3
    gc.stop(0.5)  # not placed: left to the replay

    s = slots_of(kit)
    done = replay_slots(s, kit.instances, quiet_seconds=60)
    assert (done.records, done.instances, done.torn, done.due) == (3, 3, 0, True)  # the series is full
    assert instance_uids(kit) == {p.sop_instance_uid for p in series}
    assert all(_placed(kit, p) for p in series)
    (job,) = job_rows(kit)
    assert job.not_before <= utcnow()
    s.close()
    again = replay_at_restart(kit)
    assert (again.records, again.instances) == (0, 0)  # the slots were renamed away
    assert len(job_rows(kit)) == 1


def test_placed_files_get_their_rows_and_no_slot_holds_data(kit: Kit, commits: GroupCommit) -> None:
    commits.start()
    series = counted_series(6)
    for p in series:
        assert commits.store(p, held=True)
    assert commits.flush(30)
    assert instance_uids(kit) == {p.sop_instance_uid for p in series}
    assert all(_placed(kit, p) for p in series)
    assert not list(kit.instances.instances_dir.rglob(".incoming-*"))
    assert all(f.stat().st_size == 0 for f in _slot_files(kit))  # the written ones were renamed away
    assert not commits.holds_rows_of(series[0].study_uid)


def test_a_slot_whose_instance_has_a_row_is_removed_not_indexed_again(kit: Kit) -> None:
    """A crash between a slot's rename into place and the removal of its name is impossible (a rename is
    one step), but a slot holding an instance that has its row (the sender sent it again through another
    path meanwhile) must not be indexed twice: the replay removes it."""
    gc = _commits(kit)
    series = counted_series(5)
    assert gc.placer is not None
    first = series[0]  # acknowledged, and the process dies before its placement
    gc.placer.slots.write(first.data)
    gc.start()
    for p in series:
        gc.store(p, held=True)
    assert gc.flush(30)
    gc.stop(30)
    done = replay_at_restart(kit)
    assert (done.records, done.instances) == (1, 0)
    assert instance_uids(kit) == {p.sop_instance_uid for p in series}
    assert not [f for f in _slot_files(kit) if f.stat().st_size]
    assert len(job_rows(kit)) == 1


def test_once_every_instance_is_placed_the_replay_reads_none(kit: Kit) -> None:
    """A placed slot is renamed away: a start after that has nothing to read (retention may have purged
    those studies since: issue 20)."""
    gc = _commits(kit)
    gc.start()
    series = counted_series(4)
    for p in series:
        gc.store(p, held=True)
    assert gc.flush(30)
    gc.stop(30)
    done = replay_at_restart(kit)
    assert (done.records, done.instances) == (0, 0)
    assert len(job_rows(kit)) == 1


def test_a_duplicate_waiting_for_its_file_is_a_success_stored_once(kit: Kit) -> None:
    gc = _commits(kit, delay=0.2)
    (p,) = counted_series(1)
    assert gc.store(p, held=True) is True
    assert gc.store(p, held=True) is False
    gc.start()
    assert gc.flush(30)
    assert gc.store(p, held=True) is False  # once committed: known before anything is written
    assert not [f for f in _slot_files(kit) if f.stat().st_size]
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


def test_a_torn_slot_is_discarded_at_replay(kit: Kit) -> None:
    gc = _commits(kit, delay=600)
    a, b = counted_series(2)
    assert gc.store(a, held=True)
    gc.start()
    gc.stop(0.5)
    assert gc.placer is not None
    torn = gc.placer.slots.write(b.data)  # b's write cut short by the crash: never acknowledged
    torn.write_bytes(torn.read_bytes()[: len(b.data) // 2])
    done = replay_at_restart(kit)
    assert (done.records, done.instances, done.torn) == (1, 1, 1)
    assert instance_uids(kit) == {a.sop_instance_uid}
    assert not kit.instances.record(b).path.exists() and not torn.exists()


def test_a_replay_that_cannot_place_keeps_the_slots_and_the_placer_places_them_later(
    kit: Kit, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Acknowledged instances only in their slots, and a restart where their directories cannot be made
    (a full inode table, an I/O error): they stay in their slots (a crash meanwhile replays them again),
    and once the cause is gone the placer places them and they get their rows, once."""
    gc = _commits(kit, delay=600)  # placement held: the answers came, the files did not
    series = counted_series(3)
    for p in series:
        assert gc.store(p, held=True)
    gc.start()
    gc.stop(0.5)
    broken = {"on": True}

    def make_parents(root: Path, target: Path) -> list[Path]:
        if broken["on"]:
            raise OSError(28, "No space left on device")
        return files.make_parents(root, target)

    monkeypatch.setattr(slot_place, "make_parents", make_parents)
    for _ in range(2):  # the second start: as after a crash before the cause was gone
        s = slots_of(kit)
        done = replay_slots(s, kit.instances, quiet_seconds=60)
        assert (done.records, done.instances, done.unreadable) == (3, 0, 0)
        assert [p.sop_instance_uid for p, _ in done.waiting] == [p.sop_instance_uid for p in series]
        assert instance_uids(kit) == set()
        s.close()

    s = slots_of(kit)
    done = replay_slots(s, kit.instances, quiet_seconds=60)
    gc = GroupCommit(
        kit.instances, quiet_seconds=60, assembly=AssemblySettings(), placer=Placer(s, kit.instances)
    )
    gc.resume(done.waiting)
    gc.start()
    try:
        assert gc.store(series[0], held=False) is False  # sent again meanwhile: a duplicate, a success
        assert gc.holds_rows_of(series[0].study_uid)  # the API says 202, not 404
        broken["on"] = False  # the operator mends it
        assert gc.flush(60)
        assert instance_uids(kit) == {p.sop_instance_uid for p in series}
        assert all(_placed(kit, p) for p in series)
        (job,) = job_rows(kit)
        assert job.not_before <= utcnow()  # the series is full
    finally:
        gc.stop(30)
    again = replay_at_restart(kit)
    assert (again.records, again.waiting) == (0, [])


def test_once_it_works_again_the_next_instance_is_taken_while_the_placer_backs_off(
    kit: Kit, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Placements fail (an I/O error) and the placer backs off, 5 s after its fourth failure. Meanwhile a
    new instance is refused (0xA700) only after a fresh attempt it asked for failed too; once the cause is
    gone, the next instance asks for one, the backlog is placed, and it is taken at once. (It used to be
    refused for the rest of the 5 s, on the last attempt's verdict: a study re-sent right after space
    returned never completed, a CI run of tests/reliability/test_faults.py.)"""
    caplog.set_level(logging.DEBUG, logger="service.store.slot_place")
    broken = {"on": False}

    def failing(staged: list[Staged], also: Iterable[Path] = ()) -> None:
        if broken["on"]:
            raise OSError(5, "Input/output error")
        place_all(staged, also)

    monkeypatch.setattr(slot_place, "place_all", failing)
    gc = _commits(kit)
    try:
        first, refused, sent_again = counted_series(3)
        assert gc.store(first, held=True)  # acknowledged: in its slot, not placed yet
        broken["on"] = True
        gc.start()
        deadline = time.monotonic() + 30
        while "from their slots still failing (4 times)" not in caplog.text:
            assert time.monotonic() < deadline, "the placement was not retried"
            time.sleep(0.01)
        with pytest.raises(StorageFullError):  # still failing: the fresh attempt fails too
            gc.store(refused, held=True)
        broken["on"] = False  # mended, mid-backoff
        started = time.monotonic()
        assert gc.store(sent_again, held=True)
        assert time.monotonic() - started < 2.0  # woke the placer rather than waiting out its 5 s
        assert gc.flush(30)
        assert instance_uids(kit) == {first.sop_instance_uid, sent_again.sop_instance_uid}
        # Logged once when the placements started failing and once when they recovered, not per retry.
        assert caplog.text.count("placing received instances from their slots failing") == 1
        assert "placing received instances from their slots recovered after" in caplog.text
    finally:
        gc.stop(30)


def test_a_kill_after_the_files_and_before_the_rows_indexes_each_once(kit: Kit) -> None:
    """The placed-to-row window, as SIGKILL leaves it: each acknowledged instance is a file without a row
    (its slot renamed away). The re-index (after the replay) gives each its row, its study one job, due at
    once (the series is full), and nothing is indexed twice."""
    series = counted_series(4)
    s = _slots(kit)
    root = kit.instances.instances_dir
    for p in series:
        path = s.write(p.data)
        target = root / instance_relpath(p.study_uid, p.series_uid, p.sop_instance_uid)
        target.parent.mkdir(parents=True, exist_ok=True)
        path.rename(target)
    s.close()  # the process is gone: no row was committed

    done = replay_at_restart(kit)
    assert (done.records, done.instances) == (0, 0)  # nothing left in a slot
    assert reindex(kit.instances, quiet_seconds=60).instances == 4
    assert reindex(kit.instances, quiet_seconds=60).instances == 0  # the files have their rows now
    assert instance_uids(kit) == {p.sop_instance_uid for p in series}
    (job,) = job_rows(kit)
    assert job.not_before <= utcnow()


def _legacy_record(segment_id: int, p: ParsedInstance) -> bytes:
    """A record as the segment journal before session 20 wrote it (service/store/journal_legacy.py)."""
    meta = json.dumps({"study": p.study_uid, "series": p.series_uid, "sop": p.sop_instance_uid}).encode()
    crc = zlib.crc32(p.data, zlib.crc32(meta))
    checked = struct.pack("<4sQIII", b"PTJ1", segment_id, len(meta), len(p.data), crc)
    return checked + struct.pack("<I", zlib.crc32(checked)) + meta + p.data


def test_an_older_versions_journal_is_placed_once_and_removed(kit: Kit) -> None:
    """Upgraded with acknowledged instances still only in the old segment journal: the first start places
    and indexes them (a torn tail dropped, a record with a row skipped) and removes the journal."""
    series = counted_series(3)
    old = kit.instances.instances_dir.parent / "journal"
    old.mkdir()
    kit.instances.ingest_blocking(series[0], not_before=utcnow())  # placed and committed before the stop
    blob = b"".join(_legacy_record(7, p) for p in series) + b"PTJ1" + b"\x07" * 100  # a torn tail
    (old / "journal-000000000007.seg").write_bytes(blob + bytes(4096))
    (old / "spare-000000000001.seg").write_bytes(_legacy_record(3, series[1]))  # never read
    done = replay_slots(slots_of(kit), kit.instances, quiet_seconds=60, keep=False, legacy=old)
    assert (done.records, done.instances, done.torn) == (3, 2, 1)
    assert instance_uids(kit) == {p.sop_instance_uid for p in series}
    assert all(kit.instances.record(p).path.read_bytes() == p.data for p in series[1:])
    assert not old.exists()


def test_placements_linger_for_more_and_an_association_end_or_a_flush_does_not_wait(kit: Kit) -> None:
    """With slots the placer batches (one directory fsync and one row commit per batch): its linger (here
    60 s) holds a lone instance back, and an association end or a flush does not wait for it."""
    placer = Placer(_slots(kit), kit.instances, linger_seconds=60)
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


def test_an_instance_that_fills_its_series_does_not_wait_out_the_linger(kit: Kit) -> None:
    """A series that declares its count (ImagesInAcquisition) may make its study complete once its last
    instance has a row: that instance's batch starts at once, the ones before it linger."""
    placer = Placer(_slots(kit), kit.instances, linger_seconds=60)
    gc = GroupCommit(kit.instances, quiet_seconds=60, assembly=AssemblySettings(), placer=placer)
    gc.start()
    try:
        a, b, c = counted_series(3)
        assert gc.store(a, held=True) and gc.store(b, held=True)
        time.sleep(0.3)
        assert instance_uids(kit) == set()  # two of three: lingering
        assert gc.store(c, held=True)
        deadline = time.monotonic() + 10
        while instance_uids(kit) != {a.sop_instance_uid, b.sop_instance_uid, c.sop_instance_uid}:
            assert time.monotonic() < deadline, "the series' last instance waited out the linger"
            time.sleep(0.01)
    finally:
        gc.stop(30)


def test_a_lingering_placer_is_not_woken_by_every_instance(kit: Kit, monkeypatch: pytest.MonkeyPatch) -> None:
    """While the placer lingers for more, an instance that cannot end the wait does not wake it: each wake
    took the GIL, on the listener's answer path, to find the batch still not ready. The first instance
    does (the placer waits for one), and so does the one that fills its series (the batch starts)."""
    placer = Placer(_slots(kit), kit.instances, linger_seconds=60)
    checks: list[bool] = []
    real = placer._batch_ready

    def counted() -> bool:
        checks.append(ready := real())
        return ready

    monkeypatch.setattr(placer, "_batch_ready", counted)
    gc = GroupCommit(kit.instances, quiet_seconds=60, assembly=AssemblySettings(), placer=placer)
    gc.start()
    try:
        series = counted_series(12)
        for p in series[:11]:
            assert gc.store(p, held=True)
        time.sleep(0.3)
        assert instance_uids(kit) == set()  # eleven of twelve: lingering
        assert len(checks) <= 3, f"the placer was woken {len(checks)} times for 11 instances"
        assert gc.store(series[11], held=True)
        deadline = time.monotonic() + 10
        while len(instance_uids(kit)) < 12:
            assert time.monotonic() < deadline, "the series' last instance waited out the linger"
            time.sleep(0.01)
    finally:
        gc.stop(30)


def test_a_retry_after_a_failed_directory_fsync_syncs_what_the_first_attempt_moved(
    kit: Kit, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The renames of a batch succeed and a directory fsync fails: the retry finds the slots already moved
    and must still fsync their directories (and those made for them) before their rows are committed, or a
    crash after the commit could leave a row whose file's name was never durable."""
    synced: list[Path] = []
    failed = {"once": False}
    real = files.fsync_dir

    def fsync_dir(path: Path) -> None:
        if not failed["once"]:
            failed["once"] = True
            raise OSError(5, "Input/output error")
        synced.append(path)
        real(path)

    monkeypatch.setattr(files, "fsync_dir", fsync_dir)
    gc = _commits(kit)
    try:
        (p,) = counted_series(1)
        assert gc.store(p, held=True)
        gc.start()
        assert gc.flush(30)
    finally:
        gc.stop(30)
    target = kit.instances.record(p).path
    assert failed["once"] and _placed(kit, p)
    assert {target.parent, target.parent.parent, kit.instances.instances_dir} <= set(synced)
    assert instance_uids(kit) == {p.sop_instance_uid}


def test_slots_on_another_file_system_than_the_instances_are_written_out_and_not_used(
    db_url: str, small_disk: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """An instances directory mounted from another volume: a slot cannot be renamed into it (EXDEV). The
    replay writes what the slots hold into their files instead, says so, and the slots are not used (the
    listener then fsyncs each file before its answer)."""
    kit = open_kit(db_url, small_disk)
    try:
        (p,) = counted_series(1)
        first = SlotStore(tmp_path / "slots")
        first.open()
        first.write(p.data)  # acknowledged, then the process stopped
        first.close()
        slots = SlotStore(tmp_path / "slots")
        with caplog.at_level(logging.WARNING, logger="service.store.slot_place"):
            done = replay_slots(slots, kit.instances, quiet_seconds=60)
        assert (done.records, done.instances, done.in_use, done.waiting) == (1, 1, False, [])
        assert "not on the instances' file system" in caplog.text
        assert _placed(kit, p) and instance_uids(kit) == {p.sop_instance_uid}
        assert not list((tmp_path / "slots").glob("slot-*"))
    finally:
        kit.close()
