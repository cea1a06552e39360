"""The listener's stream reader: received bytes kept as the chunks the socket gave, PDU bodies handed out
as views of them.

Why not :class:`asyncio.StreamReader` as it is: it copies every byte twice after the kernel's copy (the
chunk into its ``bytearray`` in ``feed_data``, then out of it as new ``bytes`` in ``readexactly``, which
also moves what follows to the front), and wakes the reading task for every chunk, enough or not. For a
513 KiB CT instance that is a megabyte of copies before the store copies it once more into the buffer it
is written from (:mod:`service.store.direct_write`); with four associations those two copies were a third
of the listener loop's time (py-spy, bench/RESULTS.md, session 25). Here a chunk is kept as it came, a PDU
body inside one chunk is a view of it (no copy), one that spans chunks is joined once, and the task
waiting for ``n`` bytes is woken once they are there.

It is a :class:`asyncio.StreamReader` (``StreamWriter`` insists) whose every method is its own, on its
own state: what :class:`asyncio.StreamReaderProtocol` and :class:`asyncio.StreamWriter` call
(``set_transport``, ``feed_data``, ``feed_eof``, ``set_exception``, ``exception``; TLS's ``start_tls``
keeps it), and ``read``, ``readexactly``, ``readuntil``, ``readline`` and ``at_eof`` as the base class
documents them, with the same flow control (reading paused above twice ``limit`` bytes held, resumed
once a read brings it back to ``limit``). It also remembers whether the peer ever sent a byte: the door's
test of silence (:mod:`.door`).
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Iterable
from typing import SupportsIndex

__all__ = ["PduReader"]


class PduReader(asyncio.StreamReader):
    """See the module docstring; :meth:`read_view` is what it adds to a stream reader's reads. None of the
    base class's state is used (its attributes are its own business)."""

    heard = False
    """Has the peer ever sent a byte (:func:`service.ingest.door.spoke_check`)."""

    def __init__(self, limit: int, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(limit, loop)
        self._cap = limit
        self._event_loop = loop
        self._chunks: deque[memoryview] = deque()
        self._size = 0
        self._want = 1  # bytes the waiting read needs before it is worth waking
        self._ended = False
        self._failure: Exception | None = None
        self._reading: asyncio.Future[None] | None = None
        self._source: asyncio.ReadTransport | None = None
        self._stopped = False  # reading paused (flow control)

    # ---- what the protocol and the writer call ----------------------------------------------------------

    def set_transport(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.ReadTransport)
        self._source = transport

    def feed_data(self, data: Iterable[SupportsIndex]) -> None:  # bytes in practice
        chunk = data if isinstance(data, bytes) else bytes(data)  # kept as it is: it must never change
        if not chunk or self._ended:
            return
        self.heard = True
        self._chunks.append(memoryview(chunk))
        self._size += len(chunk)
        if self._size >= self._want:
            self._wake()
        if self._source is not None and not self._stopped and self._size > 2 * self._cap:
            self._source.pause_reading()
            self._stopped = True

    def feed_eof(self) -> None:
        self._ended = True
        self._wake()

    def set_exception(self, exc: Exception) -> None:
        self._failure = exc
        waiter, self._reading = self._reading, None
        if waiter is not None and not waiter.done():
            waiter.set_exception(exc)

    def exception(self) -> Exception | None:
        return self._failure

    # ---- reads ------------------------------------------------------------------------------------------

    def at_eof(self) -> bool:
        """The peer closed its side and everything it sent was read."""
        return self._ended and not self._size

    async def read(self, n: int = -1) -> bytes:
        """Up to ``n`` bytes (all of them to the end of the stream for ``n < 0``), waiting only while none
        is there; ``b""`` at the end of the stream."""
        if self._failure is not None:
            raise self._failure
        if n == 0:
            return b""
        if n < 0:
            while not self._ended:
                await self._wait(self._size + 1)
            return bytes(self._take(self._size))
        if not self._size and not self._ended:
            await self._wait(1)
        return bytes(self._take(min(n, self._size)))

    async def readexactly(self, n: int) -> bytes:
        """Exactly ``n`` bytes; :class:`asyncio.IncompleteReadError` if the stream ends first."""
        return bytes(await self.read_view(n))

    async def read_view(self, n: int) -> memoryview | bytes:
        """Exactly ``n`` bytes as :meth:`readexactly` reads them, but as a view of the chunk that holds them
        where one does (no copy; the view keeps that chunk alive), else joined once."""
        if self._failure is not None:
            raise self._failure
        if n < 0:
            raise ValueError("a read of a negative number of bytes")
        while self._size < n:
            if self._ended:
                raise asyncio.IncompleteReadError(bytes(self._take(self._size)), n)
            await self._wait(n)
        return self._take(n)

    async def _wait(self, n: int) -> None:
        """Until ``n`` bytes are held, the stream ended or failed (flow control resumed first: a read that
        needs more than is held must not wait on a paused transport)."""
        if self._reading is not None:
            raise RuntimeError("two reads of one connection at once")
        if self._stopped and self._source is not None:
            self._stopped = False
            self._source.resume_reading()
        self._want = n
        self._reading = self._event_loop.create_future()
        try:
            await self._reading
        finally:
            self._reading = None
            self._want = 1

    async def readuntil(self, separator: object = b"\n") -> bytes:
        """Up to and including ``separator``, as :meth:`asyncio.StreamReader.readuntil` reads it:
        :class:`asyncio.IncompleteReadError` at the end of the stream first (what was held stays held),
        :class:`asyncio.LimitOverrunError` when ``limit`` bytes hold no separator. Nothing of ours reads
        lines (the listener reads PDUs); this keeps the base class's promise on our chunks."""
        if not isinstance(separator, bytes | bytearray | memoryview):
            raise TypeError("a separator is bytes (one of several is not offered here)")
        sep = bytes(separator)
        if not sep:
            raise ValueError("Separator should be at least one-byte string")
        while True:
            if self._failure is not None:
                raise self._failure
            held = b"".join(self._chunks)
            found = held.find(sep)
            if found >= 0:
                if found + len(sep) > self._cap:
                    raise asyncio.LimitOverrunError(
                        "Separator is found, but chunk is longer than limit", found
                    )
                return bytes(self._take(found + len(sep)))
            if len(held) > self._cap:
                raise asyncio.LimitOverrunError(
                    "Separator is not found, and chunk exceed the limit", len(held)
                )
            if self._ended:
                raise asyncio.IncompleteReadError(held, None)
            await self._wait(self._size + 1)

    async def readline(self) -> bytes:
        """A line, ``\\n`` included; what is left at the end of the stream (as the base class reads it)."""
        try:
            return await self.readuntil(b"\n")
        except asyncio.IncompleteReadError as cut:
            self._take(self._size)
            return cut.partial

    def _wake(self) -> None:
        waiter, self._reading = self._reading, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _take(self, n: int) -> memoryview | bytes:
        """The next ``n`` bytes (``n`` at most what is held) out of the chunks."""
        if n == 0:
            return b""
        first = self._chunks[0]
        taken: memoryview | bytes
        if len(first) >= n:
            taken = first[:n]
            if len(first) == n:
                self._chunks.popleft()
            else:
                self._chunks[0] = first[n:]
        else:
            parts, left = [], n
            while left:
                chunk = self._chunks[0]
                if len(chunk) <= left:
                    parts.append(self._chunks.popleft())
                    left -= len(chunk)
                else:
                    parts.append(chunk[:left])
                    self._chunks[0] = chunk[left:]
                    left = 0
            taken = b"".join(parts)
        self._size -= n
        if self._stopped and self._size <= self._cap and self._source is not None:
            self._stopped = False
            self._source.resume_reading()
        return taken
