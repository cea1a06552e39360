"""The data journal: records durable in order, concurrent appenders sharing one fdatasync, torn tails and
checksum mismatches discarded, segments reused once their records are done (service/store/journal.py)."""

from __future__ import annotations

import errno
import os
import shutil
import threading
import time
import zlib
from collections.abc import Callable
from pathlib import Path

import pytest

from service.store.journal import Entry, Journal
from service.store.journal_format import HEADER, body_crc, encode_meta, read_segment
from tests.service.store.kit import fill

SEGMENT = 1 << 20  # 1 MiB segments: a few records each
_RECORD = HEADER.size + len(encode_meta("1.2", "1.2.3", "1.2.3.0")) + 200_000


def _open(directory: Path, **kwargs: int) -> Journal:
    j = Journal(directory, segment_bytes=kwargs.pop("segment_bytes", SEGMENT), **kwargs)
    assert j.open() == ([], 0)
    j.reset()
    return j


def _data(i: int, size: int = 200_000) -> bytes:
    return bytes([i % 251]) * size


def _until(condition: Callable[[], bool]) -> None:
    deadline = time.monotonic() + 30
    while not condition():
        assert time.monotonic() < deadline
        time.sleep(0.01)


def _segments(directory: Path) -> list[Path]:
    return sorted(directory.glob("journal-*.seg"))


def test_appended_records_read_back_in_order(tmp_path: Path) -> None:
    j = _open(tmp_path)
    for i in range(3):
        j.append("1.2", "1.2.3", f"1.2.3.{i}", _data(i))
    j.close()
    again = Journal(tmp_path, segment_bytes=SEGMENT)
    records, torn = again.open()
    assert torn == 0
    assert [r.sop_instance_uid for r in records] == ["1.2.3.0", "1.2.3.1", "1.2.3.2"]
    assert [r.data for r in records] == [_data(i) for i in range(3)]
    assert str(records[0].relpath) == "1.2/1.2.3/1.2.3.0.dcm"
    again.close()


def test_segments_are_written_zeros_before_any_record(tmp_path: Path) -> None:
    """Blocks allocated and written, so an fdatasync after a record has no metadata to commit."""
    j = _open(tmp_path)
    (seg,) = _segments(tmp_path)
    assert seg.stat().st_size == SEGMENT
    assert seg.stat().st_blocks * 512 >= SEGMENT  # allocated, not sparse
    assert read_segment(seg, int(seg.stem.removeprefix("journal-"))) == ([], False)
    assert len(list(tmp_path.glob("spare-*.seg"))) == 1  # the next one is ready
    j.close()


def test_appenders_that_arrive_while_a_sync_runs_share_the_next(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first sync is held until five other appenders have written: one more sync covers all five."""
    j = _open(tmp_path)
    real = os.fdatasync
    calls: list[int] = []
    others_written = threading.Event()

    def fdatasync(fd: int) -> None:
        calls.append(fd)
        if len(calls) == 1:
            assert others_written.wait(30)
        real(fd)

    monkeypatch.setattr(os, "fdatasync", fdatasync)
    first = threading.Thread(target=j.append, args=("1.2", "1.2.3", "1.2.3.0", _data(0, 1000)))
    first.start()
    _until(lambda: bool(calls))
    others = [
        threading.Thread(target=j.append, args=("1.2", "1.2.3", f"1.2.3.{i}", _data(i, 1000)))
        for i in range(1, 6)
    ]
    for t in others:
        t.start()
    seg = j._current
    assert seg is not None
    _until(lambda: seg.tickets == 6)  # all five wrote while the first sync is held
    others_written.set()
    for t in [first, *others]:
        t.join(30)
    assert len(calls) == 2
    assert seg.synced == 6
    j.close()


def test_a_torn_tail_is_discarded_and_what_precedes_it_kept(tmp_path: Path) -> None:
    j = _open(tmp_path)
    for i in range(3):
        j.append("1.2", "1.2.3", f"1.2.3.{i}", _data(i))
    j.close()
    (seg,) = _segments(tmp_path)
    blob = seg.read_bytes()
    third = 2 * _RECORD
    assert blob[third : third + 4] == b"PTJ1"
    with seg.open("r+b") as fh:  # the third record cut short: the rest of it never reached the disk
        fh.seek(third + HEADER.size + 1000)
        fh.write(b"\0" * (200_000 - 1000))
    records, torn = read_segment(seg, int(seg.stem.removeprefix("journal-")))
    assert [r.sop_instance_uid for r in records] == ["1.2.3.0", "1.2.3.1"]
    assert torn


def test_a_checksum_mismatch_ends_the_segment(tmp_path: Path) -> None:
    j = _open(tmp_path)
    for i in range(3):
        j.append("1.2", "1.2.3", f"1.2.3.{i}", _data(i))
    j.close()
    (seg,) = _segments(tmp_path)
    second = _RECORD
    with seg.open("r+b") as fh:  # one bit of the second record's data flipped
        fh.seek(second + _RECORD - 777)
        byte = fh.read(1)
        fh.seek(-1, os.SEEK_CUR)
        fh.write(bytes([byte[0] ^ 1]))
    records, torn = read_segment(seg, int(seg.stem.removeprefix("journal-")))
    assert [r.sop_instance_uid for r in records] == ["1.2.3.0"]
    assert torn


def test_a_header_with_a_length_past_the_end_is_torn(tmp_path: Path) -> None:
    j = _open(tmp_path)
    j.append("1.2", "1.2.3", "1.2.3.0", _data(0))
    j.close()
    (seg,) = _segments(tmp_path)
    with seg.open("r+b") as fh:
        fh.seek(12)  # the metadata length
        fh.write((10**9).to_bytes(4, "little"))
    assert read_segment(seg, int(seg.stem.removeprefix("journal-"))) == ([], True)


def test_done_segments_are_reused_and_never_replayed(tmp_path: Path) -> None:
    """Records of 250 KB in 1 MiB segments: four per segment. Once every record of a full segment is
    done, the segment becomes a spare (renamed: a restart does not read it) and is used again."""
    j = _open(tmp_path, keep_segments=2)
    entries = [j.append("1.2", "1.2.3", f"1.2.3.{i}", _data(i, 250_000)) for i in range(10)]
    assert len(_segments(tmp_path)) == 3  # 4 + 4 + 2 records; no spare left
    assert j.pending_bytes == sum(e.size for e in entries)
    for e in entries[:8]:
        j.done(e)
    j.done(entries[0])  # twice is once
    assert len(_segments(tmp_path)) == 1  # the two full ones are spares now
    assert len(list(tmp_path.glob("spare-*.seg"))) == 1  # one kept (keep_segments - 1), one removed
    assert j.pending_bytes == entries[8].size + entries[9].size
    for i in range(10, 14):  # fills the current segment and rolls into the spare
        j.append("1.2", "1.2.3", f"1.2.3.{i}", _data(i, 250_000))
    j.close()
    again = Journal(tmp_path, segment_bytes=SEGMENT)
    records, torn = again.open()
    assert torn == 0
    assert [r.sop_instance_uid for r in records] == [f"1.2.3.{i}" for i in range(8, 14)]
    again.close()


def test_a_reused_segment_ends_where_its_new_records_end(tmp_path: Path) -> None:
    """A spare still holds whole records of its earlier life: they carry the earlier id, and end it."""
    j = _open(tmp_path, keep_segments=4)
    first = [j.append("1.2", "1.2.3", f"1.2.3.{i}", _data(i, 250_000)) for i in range(5)]  # rolls after 4
    for e in first[:4]:  # the first segment becomes a spare; record 4 waits, so its segment is kept
        j.done(e)
    for i in range(5, 8):  # the rest of the second segment, then one in the reused first
        j.append("1.2", "1.2.3", f"1.2.3.{i}", _data(i, 250_000))
    j.append("1.2", "1.2.3", "1.2.3.8", _data(8, 250_000))
    j.close()
    again = Journal(tmp_path, segment_bytes=SEGMENT)
    records, torn = again.open()
    assert (torn, [r.sop_instance_uid for r in records]) == (0, [f"1.2.3.{i}" for i in range(4, 9)])
    again.close()


def test_a_current_segment_whose_records_are_all_done_is_never_read_again(tmp_path: Path) -> None:
    """Placed and committed records must not wait in the current segment for a start to read them again
    (retention may have purged their study: issue 20). Once the last is done, the segment takes a new id;
    what is appended after that is read back, what came before is not."""
    j = _open(tmp_path)
    entries = [j.append("1.2", "1.2.3", f"1.2.3.{i}", _data(i)) for i in range(3)]
    (before,) = _segments(tmp_path)
    for e in entries[:2]:
        j.done(e)
    assert _segments(tmp_path) == [before]  # record 2 waits: the segment keeps all three
    j.done(entries[2])
    (after,) = _segments(tmp_path)
    assert after != before and after.stat().st_size == SEGMENT  # the same file under a new id
    assert read_segment(after, int(after.stem.removeprefix("journal-"))) == ([], False)
    e = j.append("1.2", "1.2.3", "1.2.3.3", _data(3, 1000))  # smaller than what it overwrites
    assert e.segment.path == after and j.pending_bytes == e.size
    j.close()
    again = Journal(tmp_path, segment_bytes=SEGMENT)
    records, torn = again.open()
    assert (torn, [r.sop_instance_uid for r in records]) == (0, ["1.2.3.3"])
    again.close()


def test_a_clear_whose_rename_is_not_durable_takes_no_record(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A directory fsync that fails after the rename: the new name may not survive a crash, and a record
    carrying the new id in a file under the old name would be lost. So the next record goes to a fresh
    segment, and the uncertain one is retired."""
    j = _open(tmp_path)
    e = j.append("1.2", "1.2.3", "1.2.3.0", _data(0))
    real = os.fsync

    def eio(fd: int) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "fsync", eio)
    j.done(e)  # logged, never raised to the group commit
    monkeypatch.setattr(os, "fsync", real)
    uncertain = j._current
    assert uncertain is not None and uncertain.failed
    nxt = j.append("1.2", "1.2.3", "1.2.3.1", _data(1))
    assert nxt.segment is not uncertain and _segments(tmp_path) == [nxt.segment.path]
    j.close()
    again = Journal(tmp_path, segment_bytes=SEGMENT)
    records, _ = again.open()
    assert [r.sop_instance_uid for r in records] == ["1.2.3.1"]
    again.close()


def test_a_record_larger_than_a_segment_gets_its_own(tmp_path: Path) -> None:
    j = _open(tmp_path)
    e = j.append("1.2", "1.2.3", "1.2.3.0", _data(0, 3 * SEGMENT))
    j.append("1.2", "1.2.3", "1.2.3.1", _data(1))
    assert e.segment.size >= 3 * SEGMENT
    j.done(e)
    j.close()
    again = Journal(tmp_path, segment_bytes=SEGMENT)
    records, _ = again.open()
    assert [r.sop_instance_uid for r in records] == ["1.2.3.1"]  # the big one's segment was removed
    again.close()


def test_one_process_per_journal_directory(tmp_path: Path) -> None:
    j = _open(tmp_path)
    with pytest.raises(RuntimeError, match="another process"):
        Journal(tmp_path).open()
    j.close()


def test_a_failed_sync_is_never_acknowledged_and_its_segment_takes_no_more(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Linux reports a failed writeback to one fdatasync only: a later one on the same file may say 0 for
    pages that were lost, so records after a failure go to a fresh segment."""
    j = _open(tmp_path)
    real = os.fdatasync

    def eio(fd: int) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "fdatasync", eio)
    with pytest.raises(OSError):
        j.append("1.2", "1.2.3", "1.2.3.0", _data(0))
    monkeypatch.setattr(os, "fdatasync", real)
    assert j.pending_bytes == 0  # nothing waits for its placement
    first = j._current
    e = j.append("1.2", "1.2.3", "1.2.3.1", _data(1))
    assert e.segment is not first  # the failed one, all "done", was retired when the next began
    assert _segments(tmp_path) == [e.segment.path]
    j.close()


# ---- disk space (a full disk must not lose the room that files and the database need) ----------------------


def test_without_room_under_the_watermark_no_segment_is_preallocated(tmp_path: Path) -> None:
    """A disk above the watermark (any disk is more than 0.01 % used): no segment at start, then one just
    the size of each record, removed once the record is done; nothing kept as a spare."""
    j = Journal(tmp_path, segment_bytes=SEGMENT, high_watermark=0.0001)
    assert j.open() == ([], 0)
    j.reset()
    assert _segments(tmp_path) == [] and not list(tmp_path.glob("spare-*.seg"))
    e = j.append("1.2", "1.2.3", "1.2.3.0", _data(0, 1000))
    (seg,) = _segments(tmp_path)
    assert seg.stat().st_size == e.size + HEADER.size  # the record and the zeros that end it
    j.done(e)
    j.append("1.2", "1.2.3", "1.2.3.1", _data(1, 1000))
    assert _segments(tmp_path) != [seg] and not seg.exists()  # done: removed, not a spare
    j.prepare()
    assert not list(tmp_path.glob("spare-*.seg"))
    j.close()


def test_segments_are_preallocated_whenever_instances_are_admitted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A volume with most of its free blocks reserved for root (33 % used for df, 1 % of its total):
    below a 95 % watermark instances are admitted, so segments are preallocated; measured against total
    (as it was) the journal found no room for one and gave every record a segment of its own, zero-filled
    and fsynced, for as long as the disk stayed there (this project's bench machine, session 18)."""

    class Volume:
        f_frsize = f_bsize = 4096
        f_blocks, f_bfree, f_bavail = 10_000_000, 9_900_000, 200_000  # 38 GiB, 0.76 GiB available

    real = os.statvfs
    monkeypatch.setattr(
        "service.store.files.os.statvfs", lambda p: Volume() if str(p) == str(tmp_path) else real(p)
    )
    j = Journal(tmp_path, segment_bytes=SEGMENT, high_watermark=0.95)
    j.open()
    j.reset()
    (seg,) = _segments(tmp_path)
    assert seg.stat().st_size == SEGMENT  # a whole segment, not one per record
    j.close()


def test_a_small_disk_is_not_taken_by_segments(small_disk: Path) -> None:
    """3 MiB segments on an 8 MiB disk: a segment and a spare would fit, and leave 2 MiB for files and the
    database; none is preallocated (room for the files of the records that may wait, ``max_pending_bytes``,
    comes first), records get segments of their own size. (A 64 MiB zero-fill run until ENOSPC here took
    the last free byte from every other writer of the moment.)"""
    j = Journal(small_disk / "j", segment_bytes=3 << 20)
    assert j.open() == ([], 0)
    free = shutil.disk_usage(small_disk).free
    j.reset()
    j.prepare()
    assert shutil.disk_usage(small_disk).free == free  # nothing taken
    e = j.append("1.2", "1.2.3", "1.2.3.0", _data(0))
    assert e.segment.size == e.size + HEADER.size
    j.done(e)
    j.close()


def test_a_record_whose_file_would_not_fit_is_refused_and_leaves_nothing(small_disk: Path) -> None:
    """Room for the record but not also for its file: ENOSPC (0xA700, "try again later"), not an answer
    for an instance that could not be placed."""
    j = Journal(small_disk / "j", segment_bytes=64 << 20)
    assert j.open() == ([], 0)
    j.reset()
    fill(small_disk, leave=300_000)  # one 200 KB record fits, its file beside it does not
    with pytest.raises(OSError) as err:
        j.append("1.2", "1.2.3", "1.2.3.0", _data(0))
    assert err.value.errno == errno.ENOSPC
    assert _segments(small_disk / "j") == [] and j.pending_bytes == 0
    (small_disk / "filler.bin").unlink()
    j.done(j.append("1.2", "1.2.3", "1.2.3.0", _data(0)))  # room again: taken
    j.close()


def test_every_record_taken_on_a_nearly_full_disk_can_be_placed(small_disk: Path) -> None:
    """Records are taken until the disk says no; then each one's file must still fit, as the placer will
    write it. Counted by their bytes alone, files of 33 KB (whole 4 KiB pages on this tmpfs, 36 KiB each)
    did not: the last acknowledged instances waited in the journal until the operator made room."""
    j = Journal(small_disk / "j", segment_bytes=64 << 20)
    assert j.open() == ([], 0)
    j.reset()
    fill(small_disk, leave=800_000)
    taken = []
    for i in range(100):
        try:
            taken.append(j.append("1.2", "1.2.3", f"1.2.3.{i}", _data(i, 33_000)))
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
            break
    assert 5 < len(taken) < 100
    for i, _ in enumerate(taken):  # every file placed beside the journal: none runs out of room
        (small_disk / f"{i}.dcm").write_bytes(_data(i, 33_000))
    for e in taken:
        j.done(e)
    j.close()


def test_a_spare_holding_an_earlier_lifes_records_never_lends_their_id(tmp_path: Path) -> None:
    """Only spares left (a start on a full disk took no segment; nothing received since): the next start
    must not number a new segment with the id the spare's old records carry, or a restart before the first
    append reads them as current and replays them."""
    from service.store.journal_format import body_crc, encode_header
    from service.store.journal_segments import SPARE

    meta, data = encode_meta("1.2", "1.2.3", "1.2.3.9"), _data(9)
    old = encode_header(1, meta, data, body_crc(meta, data)) + meta + data
    (tmp_path / SPARE.format(1)).write_bytes(old + b"\0" * (SEGMENT - len(old)))
    j = Journal(tmp_path, segment_bytes=SEGMENT)
    assert j.open() == ([], 0)
    j.reset()  # takes the spare as the first segment; then the process dies before any append
    j.close()
    again = Journal(tmp_path, segment_bytes=SEGMENT)
    assert again.open() == ([], 0)
    again.close()


def test_takes_at_once_only_when_an_append_would_not_wait(tmp_path: Path) -> None:
    """The hint the listener uses to run a store on its event loop: never true when an append would wait
    for room (pending bytes at their cap) or zero-fill a segment (the current one full, no spare)."""
    j = _open(tmp_path, max_pending_bytes=3 * _RECORD)
    assert j.takes_at_once(200_000)
    entries = [j.append("1.2", "1.2.3", f"1.2.3.{i}", _data(i)) for i in range(3)]
    assert not j.takes_at_once(200_000)  # a fourth would wait for placement to make room
    for entry in entries:
        j.done(entry)
    assert j.takes_at_once(200_000)
    assert not j.takes_at_once(SEGMENT)  # a record larger than a segment gets a segment of its own
    j.close()


def test_a_full_segment_without_a_spare_does_not_take_at_once(tmp_path: Path) -> None:
    """The spare made at start takes the first roll; the next one would zero-fill (the placer makes the
    next spare between its batches, :meth:`Journal.prepare`)."""
    j = _open(tmp_path)
    entries: list[Entry] = []
    while j.takes_at_once(200_000):
        entries.append(j.append("1.2", "1.2.3", f"1.2.3.{len(entries)}", _data(len(entries))))
        assert len(entries) < 100
    assert len(_segments(tmp_path)) == 2 and not list(tmp_path.glob("spare-*.seg"))
    j.prepare()
    assert j.takes_at_once(200_000)
    for entry in entries:
        j.done(entry)
    j.close()


def test_record_checksum_is_zlib_crc32() -> None:
    """zlib-ng computes the checksum zlib did: journals written before the switch still replay."""
    meta, data = encode_meta("1.2", "1.2.3", "1.2.3.4"), os.urandom(513 * 1024 + 7)
    assert body_crc(meta, data) == zlib.crc32(data, zlib.crc32(meta)) == zlib.crc32(meta + data)
