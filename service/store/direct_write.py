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
4096 bytes). The file is written rounded up to it, zeros after its end, then truncated to its length. The
caller's ``fdatasync`` makes both durable: ``O_DIRECT`` alone neither flushes the device's write cache nor
writes the block allocation and size needed to read the data back. A crash between the write and the
truncation leaves a slot whose record names another length: torn, removed at the next start, never
answered.

A file system that refuses ``O_DIRECT`` (``EINVAL`` at open or at the write: tmpfs before Linux 6.6, some
FUSE and network file systems) is written through the page cache as before (:func:`open_flags`,
:class:`DirectRefused`).
"""

from __future__ import annotations

import errno
import mmap
import os
import threading

__all__ = ["ALIGN", "KEEP", "O_DIRECT", "DirectRefused", "open_flags", "write_aligned"]

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


def write_aligned(fd: int, head: bytes, body: memoryview, total: int) -> None:
    """Write ``head`` then ``body`` (``total`` bytes in all) at the start of ``fd``, opened with ``O_DIRECT``,
    and truncate the file to ``total``; durable only after the caller's ``fdatasync``.

    Raises :class:`DirectRefused` when the file system refuses the direct write, before any byte of it is
    known to be written (the caller writes buffered instead), and OSError otherwise (ENOSPC, EIO)."""
    padded = -(-total // ALIGN) * ALIGN
    own = padded > KEEP
    buf = mmap.mmap(-1, padded) if own else _buffer()
    try:
        buf[: len(head)] = head
        buf[len(head) : total] = body
        buf[total:padded] = bytes(padded - total)
        with memoryview(buf) as whole:
            done = 0
            while done < padded:  # a short direct write ends on a block boundary (a signal, ENOSPC next)
                try:
                    done += os.pwrite(fd, whole[done:padded], done)
                except OSError as exc:
                    if exc.errno == errno.EINVAL and done == 0:
                        raise DirectRefused(exc.errno, "the file system refuses O_DIRECT writes") from exc
                    raise
    finally:
        if own:
            buf.close()
    os.ftruncate(fd, total)


def _buffer() -> mmap.mmap:
    """This thread's page-aligned buffer of :data:`KEEP` bytes (anonymous memory: only touched pages use
    RAM)."""
    buf: mmap.mmap | None = getattr(_local, "buf", None)
    if buf is None:
        buf = _local.buf = mmap.mmap(-1, KEEP)
    return buf
