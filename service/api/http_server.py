"""How uvicorn serves the API: the connection-level timeouts an ASGI app cannot set itself.

uvicorn (0.3x-0.5x) arms a timer only *between* requests (``timeout_keep_alive``) and cancels it on the
first byte received, so a client that opens a connection and sends its request headers one byte every few
seconds (slowloris) holds the socket forever: found by the red-team run of issue 15. An ASGI app never sees
such a request (it is called once the headers are complete), so this cannot be middleware:
:class:`HeaderTimeoutProtocol` is uvicorn's own httptools protocol with one more timer, armed when a
connection opens and again after each response, and cancelled once the parser has a whole request head
(``on_headers_complete``). If it fires first the client gets ``408 Request Timeout`` (RFC 9110 15.5.9) and
the connection is closed. The body of a request has its own limits in :mod:`service.api.limits`.

Every close that may leave the client still sending (a 431 or 408 in the middle of a head, a 413 or 408
answered before the body ended) is a *lingering close*, as Apache and nginx do it: the answer is written, the
sending side shut (FIN), and what the client still sends is read and discarded until it closes its side,
is silent for :data:`LINGER_IDLE_SECONDS` or :data:`LINGER_TOTAL_SECONDS` have passed. A plain close with
unread bytes in the socket makes the kernel answer with a TCP reset, which can discard the answer before the
client has read it (RFC 9112 9.6: "the server ... SHOULD NOT fully close the connection ... until the client
has had a chance to read the response"); found as a test that failed one CI run: the 431 test got
``ECONNRESET`` instead of its 431.

httptools (llhttp, in C), not h11 (pure Python): on a POST of a 0.5 MB radiograph the h11 protocol's
parsing and framing were ~16 % of the event loop's time under 16 clients (py-spy, session 12), and the event
loop's thread is the one that every request, answer and job hand-off goes through (issue 13).

:func:`uvicorn_options` is what ``pacs-triage serve`` passes to ``uvicorn.run``; tests pass it to their
own ``uvicorn.Config``, so the real server and the tested one are configured the same way.
"""

from __future__ import annotations

import asyncio
import fcntl
import logging
import sys
import termios
from collections.abc import Callable, Iterable
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from service.config import ApiSettings

__all__ = ["HeaderTimeoutProtocol", "header_timeout_protocol", "uvicorn_options"]

logger = logging.getLogger(__name__)

LINGER_IDLE_SECONDS = 5.0
"""A lingering connection whose client sends nothing for this long is closed (nginx ``lingering_timeout``)."""
LINGER_TOTAL_SECONDS = 30.0
"""A lingering connection is closed after this long whatever the client does (nginx ``lingering_time``)."""

_TIMEOUT_RESPONSE = b"HTTP/1.1 408 Request Timeout\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
_TOO_LARGE_RESPONSE = (
    b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
)


class HeaderTimeoutProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, closing connections whose request head is not complete in time."""

    header_timeout: float = 10.0
    """Seconds from connection open (or the end of the previous response) to a complete request head."""

    max_head_bytes: int = 16 * 1024
    """Largest request head (request line and header fields): llhttp sets no limit of its own, and h11,
    which served before, refused heads over 16 KiB; beyond it the client gets ``431`` (RFC 6585 5) and the
    connection is closed, so headers cannot be used to fill the memory within the head's deadline."""

    _header_timer: asyncio.TimerHandle | None = None
    _in_head = False
    """Between the start of a request head (or of the wait for one) and its end: its bytes are counted."""
    _head_bytes = 0
    _begun = False
    """A request head has begun (its first byte parsed) and not ended."""
    _linger: _Linger | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        # Every close of this connection, uvicorn's included, goes through _close (a lingering close when the
        # client may still be sending); flow control keeps the real transport.
        self.transport = _ClosingTransport(transport, self._close)
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        if self._linger is not None:
            self._linger.cancel()
        super().connection_lost(exc)

    def shutdown(self) -> None:
        """The server is stopping: a lingering connection is closed now, not when the client is done."""
        if self._linger is not None:
            self._linger.cancel()
            self.transport.abort()
            return
        super().shutdown()

    def data_received(self, data: bytes) -> None:
        if self._linger is not None:
            self._linger.heard()  # the client is still sending what nobody will read: discard it
            return
        within = self._in_head
        super().data_received(data)
        if not (within and self._in_head):
            return  # the chunk ended a head or held a body; a head begun mid-chunk counts from the next
        self._head_bytes += len(data)
        if self._head_bytes > self.max_head_bytes and not self.transport.is_closing():
            self._disarm()
            logger.debug("closed %s: request head over %d bytes", self._peer(), self.max_head_bytes)
            self.transport.write(_TOO_LARGE_RESPONSE)
            self.transport.close()

    def on_message_begin(self) -> None:
        self._in_head, self._head_bytes, self._begun = True, 0, True
        if self._header_timer is None and not self._serving():
            self._arm()  # the first byte of a request on a kept-alive connection: its head's deadline
        super().on_message_begin()

    def on_headers_complete(self) -> None:
        self._in_head = self._begun = False
        self._disarm()  # a whole request head arrived: the body has its own deadline
        super().on_headers_complete()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self.transport.is_closing() or self._serving():
            return
        if self._begun:
            self._arm()  # a pipelined head has begun: its deadline counts from now
        else:  # idle: uvicorn's keep-alive timer closes it; the next head's deadline starts with its byte
            self._in_head, self._head_bytes = True, 0

    def timeout_keep_alive_handler(self) -> None:
        """uvicorn's keep-alive close, unless the client's next request has reached the socket already.

        asyncio runs a due timer and the read of newly arrived bytes in the order they became ready, so on
        a busy event loop the idle timer could close a connection whose next request was waiting to be
        read: the client got no answer (``ReadError``), a POST it cannot safely repeat. Found as
        tests/reliability/test_load.py failing with three CPU-bound processes beside it (2 runs of 2, with
        a 5 s keep-alive, httpx's own idle expiry); with this and a 75 s keep-alive, 3 of 3 passed."""
        if self.transport.is_closing():
            return
        if _unread_bytes(self.transport) > 0:
            return  # the read callback is on its way and cancels nothing now: the request is served
        super().timeout_keep_alive_handler()

    def _close(self, transport: asyncio.Transport) -> None:
        """Close ``transport`` now, or linger if the client may still be sending (see the module's doc)."""
        partial_head = self._in_head and self._head_bytes > 0
        partial_body = self.cycle is not None and self.cycle.more_body
        if transport.is_closing() or not (partial_head or partial_body) or not transport.can_write_eof():
            transport.close()  # TLS cannot half-close: a plain close there
            return
        self._disarm()
        self._linger = _Linger(transport, self.loop)

    def _serving(self) -> bool:
        """A request whose head is complete is being answered, or waits its turn (pipelining)."""
        return bool(self.pipeline) or (self.cycle is not None and not self.cycle.response_complete)

    def _peer(self) -> str:
        return self.client[0] if self.client else "?"

    def _arm(self) -> None:
        self._disarm()
        self._in_head, self._head_bytes = True, 0
        self._header_timer = self.loop.call_later(self.header_timeout, self._too_slow)

    def _disarm(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _too_slow(self) -> None:
        self._header_timer = None
        if self.transport.is_closing() or self._serving():
            return
        logger.debug("closed %s: no complete request head within %g s", self._peer(), self.header_timeout)
        self.transport.write(_TIMEOUT_RESPONSE)
        self.transport.close()


def _unread_bytes(transport: asyncio.BaseTransport) -> int:
    """Bytes received on the connection's socket and not read yet (``FIONREAD``, socket(7)); 0 if unknown."""
    sock = transport.get_extra_info("socket")
    if sock is None:
        return 0
    try:
        buf = fcntl.ioctl(sock.fileno(), termios.FIONREAD, b"\0\0\0\0")
    except (OSError, ValueError):
        return 0
    return int.from_bytes(buf, sys.byteorder, signed=True)


class _Linger:
    """One lingering close: the answer flushed, our side shut, the client's bytes read until it is done
    (its FIN ends it: the protocol's ``eof_received`` returns None, so asyncio closes the transport)."""

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        transport.write_eof()  # FIN once the answer is flushed
        if not transport.is_reading():
            transport.resume_reading()  # flow control may have paused it for a body nobody reads now
        self._total = loop.call_later(LINGER_TOTAL_SECONDS, transport.close)
        self._idle = loop.call_later(LINGER_IDLE_SECONDS, transport.close)

    def heard(self) -> None:
        self._idle.cancel()
        self._idle = self._loop.call_later(LINGER_IDLE_SECONDS, self._transport.close)

    def cancel(self) -> None:
        self._total.cancel()
        self._idle.cancel()


class _ClosingTransport(asyncio.Transport):
    """The connection's transport as uvicorn and the app see it: ``close`` asks the protocol how to close
    (it may linger), and a lingering connection counts as closing, so nothing more is written to it."""

    def __init__(self, inner: asyncio.Transport, close: Callable[[asyncio.Transport], None]) -> None:
        super().__init__()
        self._inner = inner
        self._close = close
        self._closing = False

    def close(self) -> None:
        if not self._closing:
            self._closing = True
            self._close(self._inner)

    def is_closing(self) -> bool:
        return self._closing or self._inner.is_closing()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self._inner.get_extra_info(name, default)

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self._inner.write(data)

    def writelines(self, list_of_data: Iterable[bytes | bytearray | memoryview]) -> None:
        self._inner.writelines(list_of_data)

    def write_eof(self) -> None:
        self._inner.write_eof()

    def can_write_eof(self) -> bool:
        return self._inner.can_write_eof()

    def abort(self) -> None:
        self._closing = True
        self._inner.abort()

    def is_reading(self) -> bool:
        return self._inner.is_reading()

    def pause_reading(self) -> None:
        self._inner.pause_reading()

    def resume_reading(self) -> None:
        self._inner.resume_reading()

    def get_write_buffer_size(self) -> int:
        return self._inner.get_write_buffer_size()

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return self._inner.get_write_buffer_limits()

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self._inner.set_write_buffer_limits(high, low)

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._inner.set_protocol(protocol)

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self._inner.get_protocol()


def header_timeout_protocol(seconds: float) -> type[HeaderTimeoutProtocol]:
    """A :class:`HeaderTimeoutProtocol` subclass with ``seconds`` as its deadline (uvicorn takes a class)."""
    return type("HeaderTimeoutProtocol", (HeaderTimeoutProtocol,), {"header_timeout": seconds})


def uvicorn_options(api: ApiSettings) -> dict[str, Any]:
    """Keyword arguments for ``uvicorn.run`` / ``uvicorn.Config`` from the ``api`` settings."""
    return {
        "http": header_timeout_protocol(api.header_timeout_seconds),
        "timeout_keep_alive": api.keepalive_seconds,
    }
