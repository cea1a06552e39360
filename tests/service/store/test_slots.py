"""Slots: an instance written once into a slot made ahead and fdatasync'd; its record in the preamble tells a
complete slot from a torn one at start; empty slots kept ready by a thread (service/store/slots.py)."""

from __future__ import annotations

import errno
import os
import time
import zlib
from collections.abc import Callable
from io import BytesIO
from pathlib import Path

import pytest
from pydicom import dcmread

from service.store.slots import (
    PREAMBLE,
    READY,
    SlotsBusyError,
    SlotStore,
    body_crc,
    joined_crc,
    record,
    verify,
)
from tests.service.dicom_factory import chest


def _until(condition: Callable[[], bool]) -> None:
    deadline = time.monotonic() + 30
    while not condition():
        assert time.monotonic() < deadline
        time.sleep(0.01)


def _files(directory: Path) -> list[Path]:
    return sorted(directory.glob("slot-*.dcm"))


def test_a_written_slot_is_the_part10_file_with_its_record_in_the_preamble(slots: SlotStore) -> None:
    data = chest()
    path = slots.write(data)
    blob = path.read_bytes()
    assert blob[PREAMBLE:] == data[PREAMBLE:]  # the bytes as received, after the preamble
    assert blob[:PREAMBLE] == record(data) and verify(blob)
    ds = dcmread(path)  # any DICOM reader skips the preamble
    assert ds.SOPInstanceUID == dcmread(BytesIO(data)).SOPInstanceUID


def test_a_restart_finds_complete_slots_and_keeps_empty_ones_ready(directory: Path) -> None:
    first = SlotStore(directory)
    first.open()
    first.start()
    _until(lambda: len(_files(directory)) >= READY)
    written = [first.write(chest()) for _ in range(3)]
    first.close()  # a stop (or a kill) before placement
    names = _files(directory)

    again = SlotStore(directory)
    found, torn = again.open()
    assert torn == 0 and [f.path for f in found] == sorted(written)
    assert all(f.data == f.path.read_bytes() for f in found)
    assert again.takes_at_once()  # the empty ones are ready without making new ones
    again.close()
    assert _files(directory) == names


@pytest.mark.parametrize(
    "tear",
    [
        lambda b: b[: len(b) // 2],  # the write cut short
        lambda b: bytes(PREAMBLE) + b[PREAMBLE:],  # the data written, the record not (zeros)
        lambda b: b[:-1] + bytes([b[-1] ^ 0xFF]),  # a byte the disk never wrote
        lambda b: b + b"\0" * 4096,  # longer than its record says
    ],
    ids=["cut", "no-record", "checksum", "length"],
)
def test_a_torn_slot_is_removed_at_start(directory: Path, tear: Callable[[bytes], bytes]) -> None:
    s = SlotStore(directory)
    s.open()
    good, bad = s.write(chest()), s.write(chest())
    s.close()
    bad.write_bytes(tear(bad.read_bytes()))
    again = SlotStore(directory)
    found, torn = again.open()
    again.close()
    assert [f.path for f in found] == [good] and torn == 1
    assert not bad.exists()


def test_one_process_per_slot_directory(slots: SlotStore, directory: Path) -> None:
    with pytest.raises(SlotsBusyError):
        SlotStore(directory).open()


def test_a_failed_sync_is_refused_and_leaves_no_slot(
    slots: SlotStore, directory: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def failing(fd: int) -> None:
        raise OSError(errno.EIO, "I/O error")

    monkeypatch.setattr(os, "fdatasync", failing)
    with pytest.raises(OSError):
        slots.write(chest())
    monkeypatch.undo()
    found, _ = _reopen(slots, directory)
    assert found == []


def _reopen(slots: SlotStore, directory: Path) -> tuple[list[object], int]:
    slots.close()
    again = SlotStore(directory)
    out = again.open()
    again.close()
    return list(out[0]), out[1]


def test_the_maker_keeps_slots_ready(slots: SlotStore, directory: Path) -> None:
    _until(lambda: len(_files(directory)) >= READY)
    for _ in range(READY):  # more than half taken: the maker is woken, no write waits for a directory fsync
        slots.write(chest())
    _until(lambda: len(slots._ready) > READY // 2)


def test_without_a_ready_slot_a_write_makes_its_own(directory: Path) -> None:
    s = SlotStore(directory)
    s.open()  # no maker started: nothing ready
    assert not s.takes_at_once()
    path = s.write(chest())
    s.close()
    again = SlotStore(directory)
    found, _ = again.open()
    again.close()
    assert [f.path for f in found] == [path]


def test_a_discarded_slot_is_not_found_again(slots: SlotStore, directory: Path) -> None:
    path = slots.write(chest())
    slots.discard(path)
    assert _reopen(slots, directory) == ([], 0)


def test_only_part10_files_are_taken(slots: SlotStore) -> None:
    with pytest.raises(ValueError, match="Part 10"):
        slots.write(b"\0" * 200)


def test_the_checksum_is_zlibs_crc32_of_what_follows_the_preamble() -> None:
    data = chest()
    assert body_crc(data) == zlib.crc32(data[PREAMBLE:])


def test_the_checksum_composed_from_the_datasets_running_one_is_the_same() -> None:
    """The listener's record for a lone association: the file meta information, the dataset's CRC-32 taken
    fragment by fragment as it arrived, and the padding, joined without reading the dataset again."""
    data = chest()
    head_length = 132 + 12 + int.from_bytes(data[140:144], "little")  # preamble, DICM, meta group
    head, dataset, tail = data[:head_length], data[head_length:], b"\xfc\xff\xfc\xff" + bytes(20)
    running = 0
    for start in range(0, len(dataset), 16_384):  # as P-DATA fragments
        running = zlib.crc32(dataset[start : start + 16_384], running)
    crc = joined_crc(head, running, len(dataset), tail)
    assert crc == body_crc(data + tail)
    assert record(data + tail, crc) == record(data + tail)
    assert joined_crc(head, 0, 0, b"") == body_crc(head)  # an empty dataset
