"""How uvicorn serves the API: the connection-level timeouts an ASGI app cannot set itself.

uvicorn (0.3x-0.5x, h11) arms a timer only *between* requests (``timeout_keep_alive``) and cancels it on
the first byte received, so a client that opens a connection and sends its request headers one byte every
few seconds (slowloris) holds the socket forever: found by the red-team run of issue 15. An ASGI app never
sees such a request (it is called once the headers are complete), so this cannot be middleware:
:class:`HeaderTimeoutProtocol` is uvicorn's own h11 protocol with one more timer, armed when a connection
opens and again after each response, and cancelled once h11 has parsed a whole request head. If it fires
first the client gets ``408 Request Timeout`` (RFC 9110 15.5.9) and the connection is closed. The body
of a request has its own limits in :mod:`service.api.limits`.

:func:`uvicorn_options` is what ``pacs-triage serve`` passes to ``uvicorn.run``; tests pass it to their
own ``uvicorn.Config``, so the real server and the tested one are configured the same way.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from service.config import ApiSettings

__all__ = ["HeaderTimeoutProtocol", "header_timeout_protocol", "uvicorn_options"]

logger = logging.getLogger(__name__)

_TIMEOUT_RESPONSE = b"HTTP/1.1 408 Request Timeout\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"


class HeaderTimeoutProtocol(H11Protocol):
    """uvicorn's h11 protocol, closing connections whose request head is not complete in time."""

    header_timeout: float = 10.0
    """Seconds from connection open (or the end of the previous response) to a complete request head."""

    _header_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self._header_timer is not None and self.conn.their_state is not h11.IDLE:
            self._disarm()  # a whole request head arrived: the body has its own deadline

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing() and self.conn.their_state is h11.IDLE:
            self._arm()  # the next request on this keep-alive connection gets the same deadline

    def _arm(self) -> None:
        self._disarm()
        self._header_timer = self.loop.call_later(self.header_timeout, self._too_slow)

    def _disarm(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _too_slow(self) -> None:
        self._header_timer = None
        if self.transport.is_closing() or self.conn.their_state is not h11.IDLE:
            return
        client = self.client[0] if self.client else "?"
        logger.debug("closed %s: no complete request head within %g s", client, self.header_timeout)
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
