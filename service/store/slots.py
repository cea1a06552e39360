"""Received instances written once: each into a slot file made ahead, ``fdatasync``'d before the C-STORE
answer, renamed into its place after.

Why: a C-STORE sender waits for each answer (PS3.7 9.1.1, asynchronous operations window 1), and our rule
is that success (0x0000, PS3.4 B.2.3) comes only after the instance is durable. A new file costs its own
fsync and its directory's, two file-system journal commits; the segment journal this replaces made that
one ``fdatasync`` of an append, but wrote every instance twice (its record, then its file: 1,166 KiB
written per 513 KiB CT instance), and the second copy, written while the next instances were being
answered, cost the answer path ~20 % and bounded four associations by the disk's bandwidth. A slot keeps
the single sync and writes the data once: 1.06-1.12x the journal's rate on one association, 1.14-1.27x
on four, side by side (bench/RESULTS.md, session 20).

**A slot** is ``<directory>/slot-<n>.dcm``, created empty ahead of need (:meth:`SlotStore.start`'s thread
keeps :data:`READY` of them, one directory fsync per batch), so the answer path pays no directory fsync:
it writes the instance's Part 10 bytes and calls ``fdatasync``, which commits the data and the size and
block allocation needed to read them back (fdatasync(2)). The placer (:mod:`service.store.slot_place`)
then renames the slot onto ``<instances>/<study>/<series>/<sop>.dcm`` and fsyncs the directories once per
batch: no byte is written twice.

**The record** is kept in the file's 128-byte preamble, which PS3.10 7.1 leaves to "specific
implementations": a magic, the file's length and the CRC-32 of every byte after the preamble, with a
checksum of its own (:func:`record`). A start reads each slot (:meth:`SlotStore.open`): a complete one
holds an acknowledged instance (or one whose answer a crash cut off after its sync: stored anyway, at
least once, never lost); an empty one is kept as ready; anything else is a torn write, never
acknowledged, and removed. Placed files keep the record; every DICOM reader skips the preamble.

**The write** goes past the page cache (``O_DIRECT``, :mod:`service.store.direct_write`) where the file
system allows it: no page-cache copy on the answer path (1.57x one association's rate, 1.13x four's,
bench/RESULTS.md, session 21); through the page cache otherwise, or with ``dicom.direct_io`` off. The
record goes in the same write, in the preamble of the buffer the instance was assembled in. For a lone
association the listener writes it while a store thread checks and admits the instance, so the device's
time overlaps the Python's (:meth:`service.ingest.receive.ReceivePath._written_while_checked`); a slot
whose instance is refused after all is removed. The order in which the blocks reach the disk does not
matter: until ``fdatasync`` returned nothing was answered, and a slot a crash cut short fails its
record's length or CRC check and is removed at start.

One process per slot directory: :meth:`SlotStore.open` takes an exclusive ``flock`` on it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import struct
import threading
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from zlib_ng import zlib_ng

from service.store.direct_write import (
    O_DIRECT,
    DirectRefused,
    assembled,
    buffered,
    open_flags,
    write_aligned,
    write_all,
)
from service.store.files import fsync_dir

__all__ = [
    "FRONT_PREFIX",
    "PREAMBLE",
    "READY",
    "ReadySlot",
    "Found",
    "SlotStore",
    "SlotsBusyError",
    "body_crc",
    "joined_crc",
    "record",
    "verify",
]

logger = logging.getLogger(__name__)

PREAMBLE = 128
"""PS3.10 7.1: the File Preamble's length; "DICM" follows it."""
READY = 32
"""Empty slots kept ready; the maker adds :data:`_BATCH` once fewer than half are left."""
_BATCH = 16
_MAGIC = b"PACS-TRIAGE-SLT1"
_HEAD = struct.Struct("<16sQI")  # magic, file length, CRC-32 of bytes [128, length)
_NAME = "slot-{:012d}.dcm"
_PREFIX, _SUFFIX = "slot-", ".dcm"
FRONT_PREFIX = "front-"
"""Listener processes' slot directories: ``<directory>/front-<k>`` (:mod:`service.ingest.processes`)."""


class SlotsBusyError(RuntimeError):
    """Another process holds the slot directory (several listener processes on one data directory)."""


class ReadySlot(NamedTuple):
    """An empty slot kept ready: its number, its descriptor, and whether it was opened with ``O_DIRECT``
    (known here, so the answer path asks no ``fcntl``, which would let go of the GIL before the write)."""

    number: int
    fd: int
    direct: bool


@dataclass(frozen=True)
class Found:
    """A complete slot read back at start: an instance to place and index."""

    path: Path
    data: bytes


def body_crc(data: bytes | memoryview) -> int:
    """CRC-32 of a Part 10 file's bytes after its preamble, zlib's CRC (ISO 3309) by zlib-ng's SIMD code:
    it is on every C-STORE answer's path (zlib's took ~122 µs per 513 KiB CT instance, zlib-ng's ~9 µs,
    bench/RESULTS.md, session 19)."""
    return zlib_ng.crc32(memoryview(data)[PREAMBLE:])


def record(data: bytes | memoryview, crc: int | None = None) -> bytes:
    """The 128-byte preamble that makes ``data`` (a Part 10 file) recognisable as complete at start;
    ``crc``: its :func:`body_crc` where the caller has it already (:func:`joined_crc`)."""
    head = _HEAD.pack(_MAGIC, len(data), body_crc(data) if crc is None else crc)
    return (head + struct.pack("<I", zlib.crc32(head))).ljust(PREAMBLE, b"\0")


def joined_crc(head: bytes | memoryview, dataset_crc: int, dataset_length: int, tail: bytes) -> int:
    """:func:`body_crc` of ``head + dataset + tail`` from the dataset's CRC-32, taken as it arrived (the
    listener's running CRC, :mod:`service.ingest.acceptor`): after its last byte only the few hundred
    bytes of the file meta information and the padding are left to checksum."""
    crc = zlib_ng.crc32_combine(zlib_ng.crc32(memoryview(head)[PREAMBLE:]), dataset_crc, dataset_length)
    return zlib_ng.crc32(tail, crc)


def verify(blob: bytes) -> bool:
    """Is ``blob`` a whole slot: a valid record whose length and checksum match what follows it?"""
    if len(blob) < PREAMBLE + 4 or blob[PREAMBLE : PREAMBLE + 4] != b"DICM":
        return False
    magic, length, crc = _HEAD.unpack_from(blob)
    (head_crc,) = struct.unpack_from("<I", blob, _HEAD.size)
    return bool(
        magic == _MAGIC
        and head_crc == zlib.crc32(blob[: _HEAD.size])
        and length == len(blob)
        and crc == body_crc(blob)
    )


class SlotStore:
    """Slot files under ``directory``: :meth:`open` (start: lock, read back), :meth:`start` (the maker
    thread), :meth:`write` (the answer path), :meth:`discard`, :meth:`close`."""

    def __init__(self, directory: Path, *, ready: int = READY, direct: bool = True) -> None:
        self.directory = directory
        self.ready_target = ready
        self._direct = direct and bool(O_DIRECT)  # False once the file system refused a direct write
        self._cond = threading.Condition()
        self._ready: list[ReadySlot] = []  # empty slots, durable in the directory
        self._next = 1
        self._lock_fd: int | None = None
        self._stopping = False
        self._thread: threading.Thread | None = None

    # ---- start-up -----------------------------------------------------------------------------------

    def open(self) -> tuple[list[Found], int]:
        """Lock the directory and read every slot: (complete ones, in number order; torn ones removed).

        Empty slots become ready ones; the caller places what was found (:mod:`service.store.slot_place`).
        """
        self.directory.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.directory, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise SlotsBusyError(f"another process uses the slot directory {self.directory}") from None
        self._lock_fd = fd
        self._gather()
        found: list[Found] = []
        torn = 0
        for n, path in self._slot_files():
            self._next = max(self._next, n + 1)
            blob = path.read_bytes()
            if not blob:
                self._ready.append(self._open_slot(n, path, create=False))
            elif verify(blob):
                found.append(Found(path, blob))
            else:
                path.unlink()  # a write a crash cut short: its sender got no success
                torn += 1
        if torn:
            fsync_dir(self.directory)
        return found, torn

    def _gather(self) -> None:
        """Slots of listener processes (``front-<k>`` below this directory, :mod:`service.ingest.processes`)
        moved in here under fresh numbers, so the replay places them like this process's own: written ones
        an earlier run acknowledged, or torn ones it never did. Empty ones are removed (a process makes its
        own). Each directory's lock is taken first: a process that outlived its service is waited for."""
        moved = False
        taken = [n for n, _ in self._slot_files()]
        number = max(taken, default=0) + 1
        for sub in sorted(self.directory.glob(f"{FRONT_PREFIX}*")):
            if not sub.is_dir():
                continue
            fd = os.open(sub, os.O_RDONLY)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)  # released by a process's exit
                for _, path in SlotStore(sub)._slot_files():
                    if path.stat().st_size == 0:
                        path.unlink()
                        continue
                    os.rename(path, self.directory / _NAME.format(number))
                    number, moved = number + 1, True
                os.fsync(fd)
            finally:
                os.close(fd)
        if moved:
            fsync_dir(self.directory)

    def beside(self, path: Path) -> bool:
        """Is ``path`` on the slots' file system (a slot is placed by a rename, which cannot cross one)?"""
        return os.stat(self.directory).st_dev == os.stat(path).st_dev

    def _slot_files(self) -> list[tuple[int, Path]]:
        out = []
        for path in self.directory.glob(f"{_PREFIX}*{_SUFFIX}"):
            with contextlib.suppress(ValueError):
                out.append((int(path.name[len(_PREFIX) : -len(_SUFFIX)]), path))
        return sorted(out)

    def start(self) -> None:
        """Run the maker thread, which keeps :attr:`ready_target` empty slots ready."""
        with self._cond:
            self._stopping = False
        self._thread = threading.Thread(target=self._make_forever, name="dicom-slots", daemon=True)
        self._thread.start()

    def close(self, *, remove_ready: bool = False) -> None:
        """Stop the maker, close the ready slots (kept for the next start, or removed) and unlock."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(30)
            self._thread = None
        with self._cond:
            ready, self._ready = self._ready, []
        for slot in ready:
            os.close(slot.fd)
            if remove_ready:
                (self.directory / _NAME.format(slot.number)).unlink(missing_ok=True)
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    # ---- the answer path ----------------------------------------------------------------------------

    @property
    def direct(self) -> bool:
        """Are slots written past the page cache (a whole number of blocks then writes as one)?"""
        return self._direct

    def write(self, data: bytes | memoryview, crc: int | None = None) -> Path:
        """Write the Part 10 file ``data`` (its preamble replaced by the record) into a slot and return its
        path once ``fdatasync`` returned: durable. OSError (ENOSPC, EIO) leaves no slot behind. ``crc``:
        its :func:`body_crc` where the caller has it already (:func:`joined_crc`). An instance assembled in
        this thread's buffer (:func:`service.store.direct_write.assemble`) is written from there, its
        record put in its preamble: nothing is copied."""
        if len(data) < PREAMBLE + 4 or data[PREAMBLE : PREAMBLE + 4] != b"DICM":
            raise ValueError("not a Part 10 file")
        n, fd, direct = self._take()

        def fill() -> None:
            view, head = memoryview(data), record(data, crc)
            if direct:
                try:
                    write_aligned(fd, head, view[PREAMBLE:], in_place=assembled(data))
                except DirectRefused:  # nothing written: this one and the next ones through the page cache
                    self._refuse_direct()
                    buffered(fd)
                    write_all(fd, [head, view[PREAMBLE:]], 0)
            else:
                write_all(fd, [head, view[PREAMBLE:]], 0)

        return self._synced(fd, self.directory / _NAME.format(n), fill)

    def _synced(self, fd: int, path: Path, fill: Callable[[], None]) -> Path:
        """The end of both writes (:meth:`write`, :meth:`_finish`): ``fill`` writes the slot ``fd`` (at
        ``path``), ``fdatasync`` makes it durable, and only then is its path returned. Anything raised on
        the way (OSError: ENOSPC, EIO; an interrupt) closes the slot and removes it, since the instance is
        refused and a slot left behind could read back whole at the next start and be stored all the same;
        then it is raised again as it came: the placer (:meth:`service.store.slot_place.Placer.write`)
        turns ENOSPC and EDQUOT into :class:`~service.errors.StorageFullError` by the OSError's errno."""
        try:
            fill()
            os.fdatasync(fd)
        except BaseException:
            os.close(fd)
            self._remove(path)
            raise
        os.close(fd)
        return path

    def takes_at_once(self) -> bool:
        """Would a write wait for nothing but its own ``fdatasync``: a slot is ready (no directory fsync)."""
        return bool(self._ready)

    def discard(self, path: Path) -> None:
        """A slot whose instance is not wanted after all (a duplicate found at start): removed durably, so a
        later start does not bring it back."""
        self._remove(path)

    def _remove(self, path: Path) -> None:
        with contextlib.suppress(OSError):  # a removal that fails leaves a slot the next start places once
            path.unlink(missing_ok=True)
            fsync_dir(path.parent)  # (a listener process's slot, removed by the service: its directory)

    def _take(self) -> ReadySlot:
        with self._cond:
            taken = self._ready.pop() if self._ready else None
            if len(self._ready) <= self.ready_target // 2:
                self._cond.notify_all()  # the maker: half or fewer left
            if taken is not None:
                return taken
        made = self._make(1)  # none ready (a burst outran the maker): this write pays the directory fsync
        return made[0]

    def _open_slot(self, number: int, path: Path, *, create: bool) -> ReadySlot:
        """A slot opened for writing: with ``O_DIRECT`` unless the file system refuses it."""
        extra = os.O_CREAT | os.O_EXCL if create else 0
        if self._direct:
            try:
                return ReadySlot(number, os.open(path, open_flags(True) | extra, 0o600), True)
            except OSError as exc:
                if exc.errno != errno.EINVAL:
                    raise
                self._refuse_direct()
        return ReadySlot(number, os.open(path, open_flags(False) | extra, 0o600), False)

    def _refuse_direct(self) -> None:
        with self._cond:
            refused, self._direct = self._direct, False
        if refused:
            logger.info("slots: the file system refuses O_DIRECT writes; instances go through the page cache")

    # ---- the maker ----------------------------------------------------------------------------------

    def _make_forever(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._stopping or len(self._ready) <= self.ready_target // 2)
                if self._stopping:
                    return
            try:
                made = self._make(_BATCH)
            except OSError as exc:  # a full directory or disk: writes make their own slots meanwhile
                logger.warning("making empty slots failed (%s)", type(exc).__name__)
                with self._cond:
                    self._cond.wait(1.0)
                continue
            with self._cond:
                self._ready.extend(made)

    def _make(self, count: int) -> list[ReadySlot]:
        """``count`` new empty slots, durable in the directory (one fsync for all)."""
        made: list[ReadySlot] = []
        try:
            for _ in range(count):
                with self._cond:
                    n, self._next = self._next, self._next + 1
                made.append(self._open_slot(n, self.directory / _NAME.format(n), create=True))
            fsync_dir(self.directory)
        except BaseException:
            for slot in made:
                os.close(slot.fd)
                (self.directory / _NAME.format(slot.number)).unlink(missing_ok=True)
            raise
        return made
