"""A data journal for received instances: one ``fdatasync`` per C-STORE answer instead of two fsyncs.

Why: a C-STORE sender waits for each answer (PS3.7 9.1.1, asynchronous operations window 1), and our rule
is that success (0x0000, PS3.4 B.2.3) comes only after the instance is durable. Written as its own file,
an instance costs the file's fsync and its directory's fsync, each a filesystem journal commit on ext4;
that capped one association at ~0.6x of a ``storescp`` made durable (bench/RESULTS.md, 2026-12-03). An
append to a segment whose blocks are already allocated *and written* needs no metadata at all, so one
``fdatasync`` makes it durable: measured on our disk, 372-802 appends of 514 KiB per second, against
54-126/s into a ``posix_fallocate``'d segment and 28-73/s for file + directory fsync. So a segment is
filled with zeros before it takes records, and a segment whose records are all placed is renamed and
reused rather than deleted; so is the current one, under a new id (:meth:`Journal._clear`): a start never
reads a record whose row was committed (retention may have purged its study since). Allocation, and how
much of the disk segments may take (never the room the files and the database need), are
:mod:`service.store.journal_segments`'s.

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

import errno
import fcntl
import logging
import os
import threading
from collections.abc import Sequence
from pathlib import Path

from service.errors import StorageFullError
from service.store.journal_format import HEADER, Record, body_crc, encode_header, encode_meta, read_segment
from service.store.journal_segments import (
    END,
    NAME,
    NO_SPACE,
    SPARE,
    Entry,
    Segment,
    allocate,
    check_room,
    first_record_id,
    fsync_dir,
    held,
    may_preallocate,
    segment_files,
)

__all__ = ["Entry", "Journal", "JournalBusyError"]

logger = logging.getLogger(__name__)

_FULL_WAIT_S = 30.0
"""How long an append waits for placement to make room before it is refused (0xA700)."""


_RECORD_MARGIN = 4096
"""What a record adds to a dataset, at most: the Part 10 header (preamble, file meta with three UIDs and AE
titles) and the record's own header and UIDs (:mod:`service.store.journal_format`)."""


class JournalBusyError(RuntimeError):
    """Another process holds the journal directory (several listener processes on one data directory)."""


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
        high_watermark: float = 1.0,
    ) -> None:
        self.directory = directory
        self.high_watermark = high_watermark
        """Preallocation never takes the disk above this fraction used (the ingest refuses above it)."""
        self.segment_bytes = segment_bytes
        self.keep_segments = keep_segments
        self.max_pending_bytes = max_pending_bytes or 4 * segment_bytes
        self._cond = threading.Condition()  # segment bookkeeping, pending bytes, sync tickets
        self._append = threading.Lock()  # one writer at a time: offset order is completion order
        self._next_id = 1
        self._current: Segment | None = None
        self._live: dict[int, Segment] = {}  # open segments: the current one and sealed ones not yet done
        self._spares: list[Path] = []
        self._next_spare = 1
        self._pending = 0
        self._pending_records = 0  # how many records _pending counts: each file takes whole blocks
        self._lock_fd: int | None = None

    # ---- start-up -----------------------------------------------------------------------------------

    def open(self) -> tuple[list[Record], int]:
        """Lock the directory and read every segment: (complete records in append order, torn tails).

        The caller replays the records (:mod:`service.store.journal_place`), then calls :meth:`reset`.
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
            self._next_id = max(self._next_id, first_record_id(path) + 1)  # never its old records' id
            if path.stat().st_size == self.segment_bytes and len(self._spares) < self.keep_segments - 1:
                self._spares.append(path)
            else:
                path.unlink()
        return records, torn

    def reset(self, *, keep: bool = True, hold: Sequence[Record] = ()) -> list[Entry]:
        """Every record read by :meth:`open` is placed and committed, but ``hold``: reuse or remove the old
        segments, and prepare the first one to write to; without ``keep`` (the journal is switched off),
        remove every segment and close.

        ``hold``: records the replay could not place (no room on the disk): their segments stay, sealed,
        and one :class:`Entry` per record (in ``hold``'s order) is returned for the placer, which places
        them once there is room; :meth:`done` then retires the segments as usual, and a crash meanwhile
        replays them again. Holding records keeps the journal in use."""
        held = {r.segment_id for r in hold}
        for sid, path in self._segments():
            if sid not in held:
                self._retire(path)
        entries = self._hold(hold)
        if not keep and not hold:
            with self._cond:
                spares, self._spares = self._spares, []
            for path in spares:
                path.unlink(missing_ok=True)
            self.close()
            return entries
        try:
            with self._append:
                self._current = self._take_segment(0)
            self.prepare()
        except OSError as exc:
            if exc.errno not in NO_SPACE:
                raise
            # A full disk must not stop the start: the first append takes a segment when there is room,
            # and until then each C-STORE is refused 0xA700 (out of resources), as without a journal.
            logger.warning(
                "data journal: no room for a segment at start (%s); taken at the first append", exc
            )
        return entries

    def _hold(self, records: Sequence[Record]) -> list[Entry]:
        """Sealed live segments for the records of ``records`` (see :meth:`reset`)."""
        segments, entries = held(self.directory, records)
        with self._cond:
            self._live.update(segments)
            self._pending += sum(e.size for e in entries)
            self._pending_records += len(entries)
        return entries

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
            if not self._cond.wait_for(lambda: self._has_room(size), _FULL_WAIT_S):
                raise StorageFullError("the data journal is full (placement is behind); try again later")
            self._pending += size
            self._pending_records += 1
        entry = None
        try:
            with self._append:
                seg = self._current
                if seg is None or seg.failed or seg.written + size > seg.size:
                    seg = self._roll(size)
                else:
                    with self._cond:  # the record's own space is allocated: its file's is not
                        self._check_room(0)
                header = encode_header(seg.id, meta, data, crc)
                end = [END] if seg.written + size + len(END) <= seg.size else []
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
                    self._pending_records -= 1
                    self._cond.notify_all()
            raise
        return entry

    def takes_at_once(self, size: int) -> bool:
        """Would an append of about ``size`` bytes of data wait for nothing but its own write and
        ``fdatasync``: room under ``max_pending_bytes``, and in the current segment or in a spare ready
        that holds it (no zero-filling, :meth:`_take_segment`). A hint, read without the append lock: the
        listener runs such an append on its event loop when nothing else needs the loop
        (:mod:`service.ingest.acceptor`)."""
        size += _RECORD_MARGIN
        with self._cond:
            seg = self._current
            fits = seg is not None and not seg.failed and seg.written + size + len(END) <= seg.size
            spare = bool(self._spares) and size <= self.segment_bytes  # a larger one is zero-filled
            return self._has_room(size) and (fits or spare)

    def _has_room(self, size: int) -> bool:
        """May a record of ``size`` bytes join those waiting for placement (under ``_cond``); a first may."""
        return self._pending == 0 or self._pending + size <= self.max_pending_bytes

    def _sync(self, seg: Segment, ticket: int) -> None:
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
        retire = drained = None
        with self._cond:
            if entry.finished:
                return
            entry.finished = True
            seg = entry.segment
            seg.done += 1
            self._pending -= entry.size
            self._pending_records -= 1
            self._cond.notify_all()
            if seg.done == seg.appended:
                if seg.sealed:
                    retire = self._live.pop(seg.id, None)
                elif seg is self._current:
                    drained = seg
        if retire is not None:
            os.close(retire.fd)
            self._retire(retire.path)
        elif drained is not None:
            self._clear(drained)

    def _clear(self, seg: Segment) -> None:
        """All records of the current segment are placed and committed: renamed under a new id (durable
        before a record goes in) and written again from offset 0, so a start reads them as an earlier
        life; replayed, they brought back studies retention had purged, analysed twice (issue 20).
        Renamed, not zeroed: old records keep their id, so no torn new write makes one read as current."""
        with self._append:
            with self._cond:
                if seg is not self._current or seg.done != seg.appended or seg.failed or seg.syncing:
                    return  # an append came first (its record is not done), or the next append rolls
                sid, self._next_id = self._next_id, self._next_id + 1
            fresh = Segment(sid, self.directory / NAME.format(sid), seg.fd, seg.size)
            try:
                os.replace(seg.path, fresh.path)
                with self._cond:
                    del self._live[seg.id]
                    self._live[sid] = self._current = fresh
                fsync_dir(self.directory)
            except OSError as exc:  # still the old name, or a new one not durable: the next append rolls
                seg.failed = fresh.failed = 1
                logger.warning("data journal: clearing a segment failed (%s)", type(exc).__name__)

    @property
    def pending_bytes(self) -> int:
        with self._cond:
            return self._pending

    def _roll(self, size: int) -> Segment:
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
            if self._spares or self._lock_fd is None or not self._may_preallocate(self.segment_bytes):
                return
            n = self._next_spare
            self._next_spare += 1
        path = self.directory / SPARE.format(n)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            allocate(fd, 0, self.segment_bytes)
        except OSError as exc:  # no room for a spare now: the next roll zero-fills its own segment
            path.unlink(missing_ok=True)
            if exc.errno not in NO_SPACE:
                raise
            return
        finally:
            os.close(fd)
        with self._cond:
            self._spares.append(path)

    def _segments(self, prefix: str = "journal-") -> list[tuple[int, Path]]:
        return segment_files(self.directory, prefix)

    def _take_segment(self, size: int) -> Segment:
        """A segment under a new id for a record of ``size`` bytes (0: the first one, at start), durable
        under that name before any record goes in (a record in a file whose rename a crash undid would
        carry an id its file name does not: lost). A spare when one waits; a fresh ``segment_bytes`` one
        when the disk has room for it (:meth:`_may_preallocate`); else one just big enough for the record,
        if the disk has room for that and the record's file; else ENOSPC."""
        with self._cond:
            if self._spares and size <= self.segment_bytes:
                self._check_room(0)
                spare: Path | None = self._spares.pop()
                want = self.segment_bytes
            else:
                spare, full = None, max(self.segment_bytes, size)
                want = full if self._may_preallocate(full) else size + len(END) if size else 0
                if not want:
                    raise OSError(errno.ENOSPC, "no room for a data-journal segment")
                if want < full:
                    self._check_room(want)
            sid = self._next_id
            self._next_id += 1
        path = self.directory / NAME.format(sid)
        if spare is not None:
            os.replace(spare, path)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            if (have := os.fstat(fd).st_size) < want:
                allocate(fd, have, want)
            fsync_dir(self.directory)
        except BaseException:
            os.close(fd)
            path.unlink(missing_ok=True)  # holds no record yet: a half-filled segment is not left behind
            raise
        seg = Segment(sid, path, fd, want)
        with self._cond:
            self._live[sid] = seg
        return seg

    def _may_preallocate(self, n: int) -> bool:
        return may_preallocate(
            self.directory, n, reserve=self.max_pending_bytes, high_watermark=self.high_watermark
        )

    def _check_room(self, n: int) -> None:
        check_room(self.directory, n, self._pending, self._pending_records)

    def _retire(self, path: Path) -> None:
        """A segment whose records are all placed and committed: renamed to a spare (never read again at
        start: its instances may since have been purged by retention), or removed (always when the disk is
        short of room: placement needs it more)."""
        with self._cond:
            keep = (
                len(self._spares) < self.keep_segments - 1
                and path.stat().st_size == self.segment_bytes
                and self._may_preallocate(0)
            )
            n = self._next_spare
            self._next_spare += keep
        if keep:
            spare = self.directory / SPARE.format(n)
            os.replace(path, spare)
            fsync_dir(self.directory)
            with self._cond:
                self._spares.append(spare)
        else:
            path.unlink(missing_ok=True)
            fsync_dir(self.directory)
