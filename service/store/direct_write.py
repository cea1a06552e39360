"""A received instance written past the page cache (``O_DIRECT``), from a page-aligned buffer its thread
keeps.

Why: the C-STORE answer waits for the slot's write and ``fdatasync`` (:mod:`service.store.slots`). A
buffered write first copies the 513 KiB of a CT instance into page-cache pages the kernel must allocate
for it; on a virtual machine that returns freed guest memory to its host (free page reporting, as the
machines here do), each new page is also a fault in the host, and that copy became the largest cost on the
answer path: ``perf`` put ~370 µs per instance in ``copy_folio_from_iter_atomic`` against ~70-130 µs in a
quiet disk test, and the listener's kernel time rose from 0.4 to 1.5 ms per instance as the machine's state
changed. Written with ``O_DIRECT`` from a buffer the thread reuses (its pages stay resident), the device
reads the data from that buffer and no page-cache page is allocated: alternated runs on such an hour,
1.57x the buffered rate with one association and 1.13x with four (bench/RESULTS.md, session 21).
The price: the placed file is not in the page cache, so its first read (the study's analysis) comes from
the device (~0.7 ms per CT slice here).

``O_DIRECT`` (open(2), NOTES) asks that the buffer's address, the file offset and the length be multiples
of the device's logical block size; :data:`ALIGN`, a page, is a multiple of every size in use (512 and
4096 bytes). So the file's whole blocks are written directly and its last partial block, if any, through
the page cache. The caller's ``fdatasync`` makes both durable: ``O_DIRECT`` alone neither flushes the
device's write cache nor writes the block allocation and size needed to read the data back. A crash
between the two writes leaves a slot shorter than its record says: torn, removed at the next start, never
answered.

A file system that refuses ``O_DIRECT`` (``EINVAL`` at open or at the write: tmpfs before Linux 6.6, some
FUSE and network file systems) is written through the page cache as before (:func:`open_flags`,
:class:`DirectRefused`).
"""

from __future__ import annotations

import errno
import fcntl
import mmap
import os
import threading
from collections.abc import Sequence

__all__ = [
    "ALIGN",
    "KEEP",
    "O_DIRECT",
    "DirectRefused",
    "assemble",
    "assembled",
    "buffered",
    "extend_assembled",
    "open_flags",
    "write_aligned",
    "write_all",
    "write_range",
]

O_DIRECT: int = getattr(os, "O_DIRECT", 0)
"""0 where the platform has none (macOS): every write is buffered there."""
ALIGN = 4096
"""Buffer address, file offset and length of a direct write: a page, a multiple of every logical block."""
KEEP = 8 * 1024 * 1024
"""Each thread keeps a buffer this large (its pages resident once touched); a larger instance gets a buffer
of its own, unmapped after its write."""

_local = threading.local()


class DirectRefused(OSError):
    """The file system refused a direct write (``EINVAL``): write this one, and later ones, buffered."""


def open_flags(direct: bool) -> int:
    """Flags for a slot file opened for writing, with ``O_DIRECT`` when wanted and available."""
    return os.O_WRONLY | (O_DIRECT if direct else 0)


def buffered(fd: int) -> None:
    """From now on ``fd`` writes through the page cache (``O_DIRECT`` cleared)."""
    fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~O_DIRECT)


def assemble(parts: Sequence[bytes | memoryview]) -> memoryview | None:
    """``parts`` one after the other at the start of this thread's buffer, as a view of it; None when they
    would not fit with a block to spare (the caller joins them instead).

    Why: a received instance is copied once, from its P-DATA fragments into the buffer it is written from
    (:meth:`service.store.slots.SlotStore.write` finds it there, :func:`assembled`), instead of joined
    into a new 513 KiB ``bytes`` (whose fresh pages fault in) and copied again into this buffer. The view
    is valid until this thread assembles the next instance: the caller's store must end first."""
    total = sum(len(part) for part in parts)
    if total + ALIGN > KEEP:
        return None
    buf = _buffer()
    pos = 0
    for part in parts:
        buf[pos : pos + len(part)] = part
        pos += len(part)
    view = _local.assembled = memoryview(buf)[:total]
    return view


def extend_assembled(view: memoryview, tail: bytes) -> memoryview:
    """The instance :func:`assemble` returned, with ``tail`` after it (at most a block)."""
    if not assembled(view) or len(tail) > ALIGN:
        raise ValueError("not this thread's assembled instance, or a tail longer than a block")
    buf = _buffer()
    buf[len(view) : len(view) + len(tail)] = tail
    longer = _local.assembled = memoryview(buf)[: len(view) + len(tail)]
    return longer


def assembled(data: object) -> bool:
    """Is ``data`` the instance this thread last assembled in its buffer (:func:`assemble`)?"""
    return data is getattr(_local, "assembled", None)


def write_aligned(fd: int, head: bytes, body: memoryview, *, in_place: bool = False) -> None:
    """Write ``head`` then ``body`` at the start of ``fd``, opened with ``O_DIRECT``:
    its whole blocks directly, from this thread's buffer, the last partial block (if any) through the page
    cache (one page); durable only after the caller's ``fdatasync``. ``in_place``: the body is in this
    thread's buffer already, right after the head's place (:func:`assemble`): nothing is copied.

    Why not the last block padded and the file truncated back: truncating inside a block makes ext4 zero
    the rest of it (``ext4_block_truncate_page``), and with no page cached that is a read from the disk on
    the answer path (7 % of the listener's time in a py-spy profile). The listener pads the instance itself
    where it can (a Data Set Trailing Padding element, :func:`service.ingest.dimse.trailing_padding`),
    so that no partial block is left.

    Raises :class:`DirectRefused` when the file system refuses the direct write, before any byte of it is
    known to be written (the caller writes buffered instead), and OSError otherwise (ENOSPC, EIO). Leaves
    ``fd`` without ``O_DIRECT`` when it wrote a partial block (the caller closes it)."""
    total = len(head) + len(body)
    whole = total // ALIGN * ALIGN
    if whole:
        own = whole > KEEP
        buf = mmap.mmap(-1, whole) if own else _buffer()
        in_place = in_place and not own
        try:
            buf[: len(head)] = head
            if not in_place:
                buf[len(head) : whole] = body[: whole - len(head)]
            with memoryview(buf) as view:
                write_range(fd, view, 0, whole)
        finally:
            if own:
                buf.close()
    if whole < total:
        buffered(fd)
        write_all(fd, [head, body] if whole == 0 else [body[whole - len(head) :]], whole)


def write_range(fd: int, view: memoryview, start: int, end: int) -> None:
    """``view[start:end]`` at offset ``start`` of ``fd`` (opened with ``O_DIRECT``; ``view`` a view of a
    page-aligned buffer from its start, ``start`` a multiple of :data:`ALIGN`): the whole blocks directly,
    the partial last one through the page cache (``fd`` then keeps no ``O_DIRECT``). Raises
    :class:`DirectRefused` when the file system refuses the first direct write."""
    whole = start + (end - start) // ALIGN * ALIGN
    done = start
    while done < whole:  # a short direct write ends on a block boundary (a signal, ENOSPC next)
        try:
            done += os.pwrite(fd, view[done:whole], done)
        except OSError as exc:
            if exc.errno == errno.EINVAL and done == start:
                raise DirectRefused(exc.errno, "the file system refuses O_DIRECT writes") from exc
            raise
    if whole < end:
        buffered(fd)
        write_all(fd, [view[whole:end]], whole)


def write_all(fd: int, parts: list[bytes | memoryview], offset: int) -> None:
    """``parts`` one after the other from ``offset``, through the page cache; a short write (a signal, the
    disk filling) goes on with the rest, or raises its error."""
    done = os.pwritev(fd, parts, offset)
    for part in parts:
        if done >= len(part):
            done -= len(part)
            offset += len(part)
            continue
        view = memoryview(part)[done:]
        offset += done
        done = 0
        while view:
            n = os.pwrite(fd, view, offset)
            view, offset = view[n:], offset + n


def _buffer() -> mmap.mmap:
    """This thread's page-aligned buffer of :data:`KEEP` bytes (anonymous memory: only touched pages use
    RAM)."""
    buf: mmap.mmap | None = getattr(_local, "buf", None)
    if buf is None:
        buf = _local.buf = mmap.mmap(-1, KEEP)
    return buf
