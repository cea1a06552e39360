"""The data journal's segment files: names, bookkeeping, allocation, and how much of the disk they may take.

Why a module of its own: :mod:`service.store.journal` is about records (append order, shared
``fdatasync``, when a record is done); this is about the files that hold them and the disk under them.

**Allocation.** A segment is filled with zeros and fsynced before it takes records: an append into blocks
already allocated *and written* needs no metadata, so one ``fdatasync`` makes it durable (a
``posix_fallocate``'d extent is "unwritten", and the first write into it is a metadata change). The
zeros are written after ``posix_fallocate`` has reserved the blocks, so a disk that cannot hold the
segment says so at once instead of after the zeros took its last free byte.

**Disk space.** An instance takes its size twice (its record, then its file) until its segment is retired,
and a preallocated segment takes ``segment_bytes`` at once. :func:`may_preallocate`: a segment or a spare
is zero-filled only when the disk keeps, after it, room for the file of every record that may wait for
placement (``max_pending_bytes``) and stays under the high watermark (``retention.disk_high_watermark``,
above which ingest refuses anyway); otherwise a record gets a segment just its own size.
:func:`check_room`: a record is taken only while the disk has room for its file too, beside every record
not yet done, so what cannot be placed is refused (0xA700, "try again later"), never acknowledged to wait
for its file. (A 64 MiB zero-fill that simply ran until ENOSPC on a nearly full disk took the last free
byte from the files, the journal's own appends and the database's commits of that moment: in the
disk-full fault test, instances were refused after the space had come back.)
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from service.store.files import disk_space, fsync_dir
from service.store.journal_format import HEADER, Record, first_record_id

__all__ = [
    "END",
    "NAME",
    "NO_SPACE",
    "SPARE",
    "Entry",
    "Segment",
    "allocate",
    "check_room",
    "first_record_id",
    "fsync_dir",
    "held",
    "may_preallocate",
    "segment_files",
]

NAME = "journal-{:012d}.seg"
SPARE = "spare-{:012d}.seg"
END = b"\0" * HEADER.size
"""Written after each record (the next overwrites it): in a reused segment, the end of the new records
reads as zeros, not as the earlier life's bytes, so anything else there is a torn write."""
NO_SPACE = (errno.ENOSPC, errno.EDQUOT)
_ZEROS = b"\0" * (1 << 20)


@dataclass(eq=False)
class Segment:
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

    segment: Segment
    size: int
    finished: bool = field(default=False)


def held(directory: Path, records: Sequence[Record]) -> tuple[dict[int, Segment], list[Entry]]:
    """Sealed segments (by id) holding ``records``, and one :class:`Entry` per record, in order: records
    the start-up replay could not place stay in their segments until placed."""
    segments: dict[int, Segment] = {}
    entries = []
    for r in records:
        seg = segments.get(r.segment_id)
        if seg is None:
            path = directory / NAME.format(r.segment_id)
            fd = os.open(path, os.O_RDWR)
            size = os.fstat(fd).st_size
            seg = segments[r.segment_id] = Segment(r.segment_id, path, fd, size, written=size, sealed=True)
        seg.appended += 1
        entries.append(Entry(seg, r.size))
    return segments, entries


def segment_files(directory: Path, prefix: str = "journal-") -> list[tuple[int, Path]]:
    """``(number, path)`` of the segment (or spare) files under ``directory``, in number order."""
    out = []
    for path in directory.glob(f"{prefix}*.seg"):
        with contextlib.suppress(ValueError):
            out.append((int(path.stem.removeprefix(prefix)), path))
    return sorted(out)


def _free_and_block(directory: Path) -> tuple[int, int]:
    """(bytes free to us, the file system's block size) under ``directory``."""
    st = os.statvfs(directory)
    return st.f_bavail * st.f_frsize, st.f_bsize


def may_preallocate(directory: Path, n: int, *, reserve: int, high_watermark: float) -> bool:
    """Room for ``n`` more bytes of segment and ``reserve`` (the files of the records that may wait) below
    the watermark, measured as the admission check measures it (:class:`service.store.files.DiskSpace`):
    while the listener takes instances, it preallocates."""
    return disk_space(directory).room_below(high_watermark) >= n + reserve


def check_room(directory: Path, n: int, pending: int, files: int = 0) -> None:
    """ENOSPC unless the disk has ``n`` bytes for the journal and room for ``pending`` more bytes in
    ``files`` files (those of the records not done yet, the one being taken included): what cannot be
    placed is refused. Each file is counted whole blocks and one more for its metadata: a 33 KiB CT
    slice takes 36 KiB of a tmpfs, and twelve of them counted by their bytes alone left the last no room
    (a CI run: acknowledged instances that could not be placed until the operator freed space)."""
    free, block = _free_and_block(directory)
    if free - n < pending + files * 2 * block:
        raise OSError(errno.ENOSPC, "no room for the instance's file beside its journal record")


def allocate(fd: int, start: int, end: int) -> None:
    """Reserve ``[start, end)``, write zeros over it and fsync (see the module docstring)."""
    try:
        os.posix_fallocate(fd, start, end - start)
    except OSError as exc:
        if exc.errno in NO_SPACE:
            os.ftruncate(fd, start)  # a failed reservation may leave blocks behind (ext4)
            raise
        # EOPNOTSUPP / EINVAL: a file system without fallocate; the zeros below allocate
    for off in range(start, end, len(_ZEROS)):
        os.pwrite(fd, _ZEROS[: min(len(_ZEROS), end - off)], off)
    os.fsync(fd)
