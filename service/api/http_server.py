"""How uvicorn serves the API: the connection-level timeouts an ASGI app cannot set itself.

uvicorn (0.3x-0.5x) arms a timer only *between* requests (``timeout_keep_alive``) and cancels it on the
first byte received, so a client that opens a connection and sends its request headers one byte every few
seconds (slowloris) holds the socket forever: found by the red-team run of issue 15. An ASGI app never sees
such a request (it is called once the headers are complete), so this cannot be middleware:
:class:`HeaderTimeoutProtocol` is uvicorn's own httptools protocol with one more timer, armed when a
connection opens and again after each response, and cancelled once the parser has a whole request head
(``on_headers_complete``). If it fires first the client gets ``408 Request Timeout`` (RFC 9110 15.5.9) and
the connection is closed. The body of a request has its own limits in :mod:`service.api.limits`.

httptools (llhttp, in C), not h11 (pure Python): on a POST of a 0.5 MB radiograph the h11 protocol's
parsing and framing were ~16 % of the event loop's time under 16 clients (py-spy, session 12), and the event
loop's thread is the one that every request, answer and job hand-off goes through (issue 13).

:func:`uvicorn_options` is what ``pacs-triage serve`` passes to ``uvicorn.run``; tests pass it to their
own ``uvicorn.Config``, so the real server and the tested one are configured the same way.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from service.config import ApiSettings

__all__ = ["HeaderTimeoutProtocol", "header_timeout_protocol", "uvicorn_options"]

logger = logging.getLogger(__name__)

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

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
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
        self._in_head, self._head_bytes = True, 0
        super().on_message_begin()

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._disarm()  # a whole request head arrived: the body has its own deadline
        super().on_headers_complete()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing() and not self._serving():
            self._arm()  # the next request on this keep-alive connection gets the same deadline

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


def header_timeout_protocol(seconds: float) -> type[HeaderTimeoutProtocol]:
    """A :class:`HeaderTimeoutProtocol` subclass with ``seconds`` as its deadline (uvicorn takes a class)."""
    return type("HeaderTimeoutProtocol", (HeaderTimeoutProtocol,), {"header_timeout": seconds})


def uvicorn_options(api: ApiSettings) -> dict[str, Any]:
    """Keyword arguments for ``uvicorn.run`` / ``uvicorn.Config`` from the ``api`` settings."""
    return {
        "http": header_timeout_protocol(api.header_timeout_seconds),
        "timeout_keep_alive": api.keepalive_seconds,
    }
