"""A data journal for received instances: one ``fdatasync`` per C-STORE answer instead of two fsyncs.

Why: a C-STORE sender waits for each answer (PS3.7 9.1.1, asynchronous operations window 1), and our rule
is that success (0x0000, PS3.4 B.2.3) comes only after the instance is durable. Written as its own file,
an instance costs the file's fsync and its directory's fsync, each a filesystem journal commit on ext4;
that capped one association at ~0.6x of a ``storescp`` made durable (bench/RESULTS.md, 2026-12-03). An
append to a segment whose blocks are already allocated *and written* needs no metadata at all, so one
``fdatasync`` makes it durable: measured on our disk, 372-802 appends of 514 KiB per second, against
54-126/s into a ``posix_fallocate``'d segment (its extents are "unwritten": the first write into each is a
metadata change that ``fdatasync`` must commit) and 28-73/s for file + directory fsync. So a segment is
filled with zeros (and fsynced, with its directory) before it takes records, and a segment whose records
are all placed is renamed and reused rather than deleted.

Layout: ``<dir>/journal-<id>.seg``, ``id`` increasing; ``spare-<n>.seg`` are zero-filled segments waiting
to be used (never read at start). Records (:mod:`service.store.journal_format`) are written one after
another in offset order (one writer at a time: copying into the page cache is cheap), so a record is
acknowledged only when every record before it in its segment is durable too; a torn tail is discarded at
start (its sender got no success).

Concurrent appenders share ``fdatasync`` calls (group commit): an appender whose write ended before a
sync *started* is covered by it, so whoever arrives while a sync runs joins the next one.

One process per journal directory: :meth:`Journal.open` takes an exclusive ``flock`` on it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path

from service.errors import StorageFullError
from service.store.journal_format import HEADER, Record, body_crc, encode_header, encode_meta, read_segment

__all__ = ["Entry", "Journal", "JournalBusyError"]

logger = logging.getLogger(__name__)

_ZEROS = b"\0" * (1 << 20)
_END = b"\0" * HEADER.size
"""Written after each record (the next overwrites it): in a reused segment, the end of the new records
reads as zeros, not as the earlier life's bytes, so anything else there is a torn write."""
_FULL_WAIT_S = 30.0
"""How long an append waits for placement to make room before it is refused (0xA700)."""
_NAME = "journal-{:012d}.seg"
_SPARE = "spare-{:012d}.seg"


class JournalBusyError(RuntimeError):
    """Another process holds the journal directory (several listener processes on one data directory)."""


@dataclass(eq=False)
class _Segment:
    id: int
    path: Path
    fd: int
    size: int
    written: int = 0  # next free offset
    appended: int = 0  # records written
    done: int = 0  # records placed and committed (or not wanted)
    sealed: bool = False  # no more records go here
    tickets: int = 0  # writes finished, numbered
    synced: int = 0  # every write up to this ticket is covered by a finished fdatasync
    syncing: bool = False
    failed: int = 0  # tickets up to this one were covered by an fdatasync that failed


@dataclass(eq=False)
class Entry:
    """One appended record: durable once :meth:`Journal.append` returned it; :meth:`Journal.done` once
    its file is placed and its row committed, or once it turned out not to be wanted."""

    segment: _Segment
    size: int
    finished: bool = field(default=False)


class Journal:
    """Segments of ``segment_bytes`` under ``directory``; at most ``keep_segments`` files kept for reuse.

    ``max_pending_bytes``: appends wait while this much journalled data waits for placement (the placer
    holds those bytes in memory), so a disk slower to place than to journal slows senders, never memory.
    """

    def __init__(
        self,
        directory: Path,
        *,
        segment_bytes: int = 64 << 20,
        keep_segments: int = 4,
        max_pending_bytes: int | None = None,
    ) -> None:
        self.directory = directory
        self.segment_bytes = segment_bytes
        self.keep_segments = keep_segments
        self.max_pending_bytes = max_pending_bytes or 4 * segment_bytes
        self._cond = threading.Condition()  # segment bookkeeping, pending bytes, sync tickets
        self._append = threading.Lock()  # one writer at a time: offset order is completion order
        self._next_id = 1
        self._current: _Segment | None = None
        self._live: dict[int, _Segment] = {}  # open segments: the current one and sealed ones not yet done
        self._spares: list[Path] = []
        self._next_spare = 1
        self._pending = 0
        self._lock_fd: int | None = None

    # ---- start-up -----------------------------------------------------------------------------------

    def open(self) -> tuple[list[Record], int]:
        """Lock the directory and read every segment: (complete records in append order, torn tails).

        The caller replays the records (:mod:`service.store.journal_replay`), then calls :meth:`reset`.
        """
        self.directory.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.directory, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise JournalBusyError(f"another process uses the journal directory {self.directory}") from None
        self._lock_fd = fd
        records: list[Record] = []
        torn = 0
        for sid, path in self._segments():
            found, tore = read_segment(path, sid)
            records += found
            torn += tore
            self._next_id = max(self._next_id, sid + 1)
        for n, path in self._segments("spare-"):
            self._next_spare = max(self._next_spare, n + 1)
            if path.stat().st_size == self.segment_bytes and len(self._spares) < self.keep_segments - 1:
                self._spares.append(path)
            else:
                path.unlink()
        return records, torn

    def reset(self, *, keep: bool = True) -> None:
        """Every record read by :meth:`open` is placed and committed: reuse or remove the old segments,
        and prepare the first one to write to; without ``keep`` (the journal is switched off), remove
        every segment and close."""
        for _, path in self._segments():
            self._retire(path)
        if not keep:
            with self._cond:
                spares, self._spares = self._spares, []
            for path in spares:
                path.unlink(missing_ok=True)
            self.close()
            return
        try:
            with self._append:
                self._current = self._take_segment()
            self.prepare()
        except OSError as exc:
            if exc.errno not in _NO_SPACE:
                raise
            # A full disk must not stop the start: the first append takes a segment when there is room,
            # and until then each C-STORE is refused 0xA700 (out of resources), as without a journal.
            logger.warning(
                "data journal: no room for a segment at start (%s); taken at the first append", exc
            )

    def close(self) -> None:
        with self._cond:
            segments, self._live, self._current = list(self._live.values()), {}, None
        for seg in segments:
            os.close(seg.fd)
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    # ---- appending ----------------------------------------------------------------------------------

    def append(self, study: str, series: str, sop: str, data: bytes) -> Entry:
        """Write one record and return once an ``fdatasync`` covers it (and every record before it)."""
        meta = encode_meta(study, series, sop)
        crc = body_crc(meta, data)
        size = HEADER.size + len(meta) + len(data)
        with self._cond:
            room = lambda: self._pending == 0 or self._pending + size <= self.max_pending_bytes  # noqa: E731
            if not self._cond.wait_for(room, _FULL_WAIT_S):
                raise StorageFullError("the data journal is full (placement is behind); try again later")
            self._pending += size
        entry = None
        try:
            with self._append:
                seg = self._current
                if seg is None or seg.failed or seg.written + size > seg.size:
                    seg = self._roll(size)
                header = encode_header(seg.id, meta, data, crc)
                end = [_END] if seg.written + size + len(_END) <= seg.size else []
                os.pwritev(seg.fd, [header, meta, data, *end], seg.written)
                with self._cond:
                    seg.written += size
                    seg.appended += 1
                    seg.tickets += 1
                    ticket = seg.tickets
                    entry = Entry(seg, size)
            self._sync(seg, ticket)
        except BaseException:
            if entry is not None:  # written, not synced: never acknowledged, nothing waits for it
                self.done(entry)
            else:
                with self._cond:
                    self._pending -= size
                    self._cond.notify_all()
            raise
        return entry

    def _sync(self, seg: _Segment, ticket: int) -> None:
        with self._cond:
            while seg.synced < ticket:
                if ticket <= seg.failed:  # a later fdatasync would not report the lost pages again
                    raise OSError(errno.EIO, "an fdatasync of the data journal failed")
                if seg.syncing:
                    self._cond.wait()
                    continue
                seg.syncing, covers = True, seg.tickets
                self._cond.release()
                try:
                    os.fdatasync(seg.fd)
                except BaseException:
                    self._cond.acquire()
                    seg.syncing, seg.failed = False, covers  # no more records go to this segment
                    self._cond.notify_all()
                    raise
                self._cond.acquire()
                seg.syncing = False
                self._cond.notify_all()
                seg.synced = max(seg.synced, covers)

    def done(self, entry: Entry) -> None:
        """The record is placed and its row committed (or it was not wanted): its space may be reused."""
        retire = None
        with self._cond:
            if entry.finished:
                return
            entry.finished = True
            seg = entry.segment
            seg.done += 1
            self._pending -= entry.size
            self._cond.notify_all()
            if seg.sealed and seg.done == seg.appended:
                retire = self._live.pop(seg.id, None)
        if retire is not None:
            os.close(retire.fd)
            self._retire(retire.path)

    @property
    def pending_bytes(self) -> int:
        with self._cond:
            return self._pending

    def _roll(self, size: int) -> _Segment:
        """Seal the current segment and start the next (under the append lock)."""
        old = self._current
        seg = self._take_segment(size)
        retire = None
        with self._cond:
            self._current = seg
            if old is not None:
                old.sealed = True
                if old.done == old.appended and not old.syncing:
                    retire = self._live.pop(old.id, None)
        if retire is not None:
            os.close(retire.fd)
            self._retire(retire.path)
        return seg

    # ---- segment files ------------------------------------------------------------------------------

    def prepare(self) -> None:
        """Zero-fill a spare segment if none waits, so that a full segment is replaced without a stall
        (the placer calls this between batches)."""
        with self._cond:
            if self._spares or self._lock_fd is None:
                return
            n = self._next_spare
            self._next_spare += 1
        path = self.directory / _SPARE.format(n)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            _zero_fill(fd, 0, self.segment_bytes)
        except OSError as exc:  # no room for a spare now: the next roll zero-fills its own segment
            path.unlink(missing_ok=True)
            if exc.errno not in _NO_SPACE:
                raise
            return
        finally:
            os.close(fd)
        with self._cond:
            self._spares.append(path)

    def _segments(self, prefix: str = "journal-") -> list[tuple[int, Path]]:
        out = []
        for path in self.directory.glob(f"{prefix}*.seg"):
            with contextlib.suppress(ValueError):
                out.append((int(path.stem.removeprefix(prefix)), path))
        return sorted(out)

    def _take_segment(self, size: int = 0) -> _Segment:
        """A segment under a new id, durable under that name before any record goes in (a record in a
        file whose rename a crash undid would carry an id its file name does not: lost)."""
        with self._cond:
            sid = self._next_id
            self._next_id += 1
            spare = self._spares.pop() if self._spares and size <= self.segment_bytes else None
        path = self.directory / _NAME.format(sid)
        if spare is not None:
            os.replace(spare, path)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            want = max(self.segment_bytes, size)
            if (have := os.fstat(fd).st_size) < want:
                try:
                    _zero_fill(fd, have, want)
                except OSError as exc:
                    # A nearly full (or small) disk: a segment just big enough for this record, so the
                    # instance is still taken while there is room for it at all.
                    if exc.errno not in _NO_SPACE or not 0 < size + len(_END) < want:
                        raise
                    os.ftruncate(fd, 0)
                    want = size + len(_END)
                    _zero_fill(fd, 0, want)
            _fsync_dir(self.directory)
        except BaseException:
            os.close(fd)
            path.unlink(missing_ok=True)  # holds no record yet: a half-filled segment is not left behind
            raise
        seg = _Segment(sid, path, fd, want)
        with self._cond:
            self._live[sid] = seg
        return seg

    def _retire(self, path: Path) -> None:
        """A segment whose records are all placed and committed: renamed to a spare (never read again at
        start: its instances may since have been purged by retention), or removed."""
        with self._cond:
            keep = len(self._spares) < self.keep_segments - 1 and path.stat().st_size == self.segment_bytes
            n = self._next_spare
            self._next_spare += keep
        if keep:
            spare = self.directory / _SPARE.format(n)
            os.replace(path, spare)
            _fsync_dir(self.directory)
            with self._cond:
                self._spares.append(spare)
        else:
            path.unlink(missing_ok=True)
            _fsync_dir(self.directory)


_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


def _zero_fill(fd: int, start: int, end: int) -> None:
    """Write zeros over ``[start, end)`` and fsync: blocks allocated and written, so an ``fdatasync``
    after a record overwrites them has no metadata to commit (see the module docstring)."""
    for off in range(start, end, len(_ZEROS)):
        os.pwrite(fd, _ZEROS[: min(len(_ZEROS), end - off)], off)
    os.fsync(fd)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
