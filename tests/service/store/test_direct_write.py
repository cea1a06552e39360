"""Slots written past the page cache (O_DIRECT), and through it where the file system refuses that
(service/store/direct_write.py, service/store/slots.py)."""

from __future__ import annotations

import errno
import fcntl
import logging
import os
from collections.abc import Callable
from pathlib import Path

import pytest

from service.store.direct_write import ALIGN, KEEP, O_DIRECT, assemble, assembled, extend_assembled, write_all
from service.store.slots import PREAMBLE, SlotStore, body_crc, record, verify
from tests.service.dicom_factory import chest

pytestmark = pytest.mark.skipif(not O_DIRECT, reason="no O_DIRECT on this platform")


def _direct(fd: int) -> bool:
    return bool(fcntl.fcntl(fd, fcntl.F_GETFL) & O_DIRECT)


FailPwrite = Callable[[int, Callable[[int, int], bool]], None]
"""``fail_pwrite(err, when)``: see :func:`fail_pwrite`."""


@pytest.fixture
def fail_pwrite(monkeypatch: pytest.MonkeyPatch) -> FailPwrite:
    """Make ``os.pwrite`` fail with errno ``err`` (its usual message) wherever ``when(fd, offset)`` holds
    and write as usual elsewhere: a full disk from some offset on, or a file system that refuses direct
    writes. ``monkeypatch.undo()`` puts the real one back."""
    real = os.pwrite

    def install(err: int, when: Callable[[int, int], bool]) -> None:
        def pwrite(fd: int, data: object, offset: int) -> int:
            if when(fd, offset):
                raise OSError(err, os.strerror(err))
            return real(fd, data, offset)  # type: ignore[arg-type]

        monkeypatch.setattr(os, "pwrite", pwrite)

    return install


def _takes_o_direct(directory: Path) -> bool:
    """Does this file system take O_DIRECT writes (tmpfs before Linux 6.6 does not)?"""
    directory.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(directory / "probe", os.O_WRONLY | os.O_CREAT | O_DIRECT, 0o600)
    except OSError:
        return False
    os.close(fd)
    (directory / "probe").unlink()
    return True


@pytest.mark.parametrize(
    "size",
    [ALIGN - 1, 64 * ALIGN - 1, 64 * ALIGN, 64 * ALIGN + 1, KEEP + ALIGN + 3],
    ids=["under-a-block", "block-less-one", "blocks", "block-and-one", "beyond-the-kept-buffer"],
)
def test_a_direct_write_is_the_file_byte_for_byte(slots: SlotStore, directory: Path, size: int) -> None:
    """Whole blocks written directly, the last partial one through the page cache: the file is the instance
    exactly."""
    if not _takes_o_direct(directory):
        pytest.skip("the temporary directory's file system refuses O_DIRECT")
    slot = slots._take()
    assert _direct(slot.fd) and slot.direct  # made for direct writes
    slots._ready.append(slot)
    data = chest()
    data = data[: max(size, PREAMBLE + 4)] if size < len(data) else data
    body = data + b"\xab" * (size - len(data))  # the slot takes any Part 10 bytes; only the length matters
    path = slots.write(body)
    written = path.read_bytes()
    assert len(written) == size and written[PREAMBLE:] == body[PREAMBLE:]
    assert written[:PREAMBLE] == record(body) and verify(written)


def test_a_refused_direct_write_goes_through_the_page_cache(
    slots: SlotStore,
    directory: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    fail_pwrite: FailPwrite,
) -> None:
    """A file system that opens with O_DIRECT but refuses the write (EINVAL, as some FUSE ones do): the
    instance is written buffered, stored all the same, and so are the next ones."""
    fail_pwrite(errno.EINVAL, lambda fd, offset: _direct(fd))
    with caplog.at_level(logging.INFO, logger="service.store.slots"):
        first, second = slots.write(chest()), slots.write(chest())
    for path in (first, second):
        assert verify(path.read_bytes())
    assert [r.message for r in caplog.records if "O_DIRECT" in r.message] == [
        "slots: the file system refuses O_DIRECT writes; instances go through the page cache"
    ]
    monkeypatch.undo()
    assert not slots._direct
    [slot] = slots._make(1)  # slots made from now on are buffered ones
    assert not _direct(slot.fd) and not slot.direct
    slots._ready.append(slot)


def test_a_file_system_that_refuses_o_direct_at_open_gets_buffered_slots(
    directory: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = os.open

    def refusing(path: object, flags: int, mode: int = 0o777) -> int:
        if flags & O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real(path, flags, mode)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "open", refusing)
    s = SlotStore(directory)
    s.open()
    path = s.write(chest())
    s.close()
    assert verify(path.read_bytes())


def test_direct_io_off_writes_through_the_page_cache(directory: Path) -> None:
    s = SlotStore(directory, direct=False)
    s.open()
    slot = s._take()
    assert not _direct(slot.fd) and not slot.direct
    s._ready.append(slot)
    path = s.write(chest())
    s.close()
    assert verify(path.read_bytes())


def test_a_failed_tail_write_leaves_no_slot(
    slots: SlotStore, directory: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The whole blocks written directly, the last partial block's write failed: refused, and nothing a
    restart would take."""

    def failing(fd: int, parts: list[bytes], offset: int) -> int:
        raise OSError(errno.EIO, "I/O error")

    monkeypatch.setattr(os, "pwritev", failing)
    with pytest.raises(OSError):
        slots.write(chest())
    monkeypatch.undo()
    slots.close()
    again = SlotStore(directory)
    found, torn = again.open()
    again.close()
    assert found == [] and torn == 0


def test_a_short_buffered_write_goes_on_with_the_rest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``pwritev`` may write less than asked (a signal, the disk filling): the rest follows, in order."""
    real = os.pwritev

    def short(fd: int, parts: list[bytes], offset: int) -> int:
        return real(fd, [b"".join(bytes(p) for p in parts)[:150]], offset)

    monkeypatch.setattr(os, "pwritev", short)
    path = tmp_path / "file"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    parts: list[bytes | memoryview] = [b"h" * 128, memoryview(b"0123456789" * 30)]
    write_all(fd, parts, 0)
    os.close(fd)
    assert path.read_bytes() == b"h" * 128 + b"0123456789" * 30


@pytest.mark.parametrize("size", [64 * ALIGN, 64 * ALIGN + 1000], ids=["blocks", "partial-block"])
def test_an_assembled_instance_is_written_from_where_it_was_assembled(
    slots: SlotStore, directory: Path, size: int
) -> None:
    """The listener's path: the fragments copied once into the thread's buffer, written from there."""
    if not _takes_o_direct(directory):
        pytest.skip("the temporary directory's file system refuses O_DIRECT")
    data = chest()
    blob = data + b"\xab" * (size - len(data))
    view = assemble([blob[:1000], memoryview(blob)[1000:]])
    assert view is not None and assembled(view) and bytes(view) == blob
    path = slots.write(view)
    written = path.read_bytes()
    assert written[PREAMBLE:] == blob[PREAMBLE:] and verify(written)


def test_assembly_is_refused_beyond_the_kept_buffer_and_extends_only_its_own() -> None:
    assert assemble([bytes(KEEP)]) is None  # the caller joins such an instance itself
    view = assemble([b"a" * 10])
    assert view is not None
    longer = extend_assembled(view, b"bc")
    assert bytes(longer) == b"a" * 10 + b"bc" and assembled(longer) and not assembled(view)
    with pytest.raises(ValueError):
        extend_assembled(memoryview(b"a" * 10), b"bc")  # not this thread's buffer
    with pytest.raises(ValueError):
        extend_assembled(longer, bytes(ALIGN + 1))  # more than a block of padding


def _assembled_instance(size: int) -> memoryview:
    data = chest()
    view = assemble([data, b"\xab" * (size - len(data))])
    assert view is not None
    return view


def _files(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.stat().st_size)


def test_an_assembled_instance_with_its_checksum_given_is_written_with_that_record(
    slots: SlotStore, directory: Path
) -> None:
    """The lone association's path: the record's CRC-32 composed from the one the acceptor took as the
    dataset arrived (``crc``), put in the preamble in the thread's buffer, and the whole written at once."""
    if not _takes_o_direct(directory):
        pytest.skip("the temporary directory's file system refuses O_DIRECT")
    view = _assembled_instance(64 * ALIGN)
    expected = bytes(view)
    written = slots.write(view, body_crc(view)).read_bytes()
    assert written[PREAMBLE:] == expected[PREAMBLE:] and verify(written)
    assert not verify(slots.write(_assembled_instance(64 * ALIGN), 12345).read_bytes())  # it is used as given
