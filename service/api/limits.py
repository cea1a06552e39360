"""ASGI middleware for request bodies: a deadline to receive them and a cap on how many at once.

- **Body timeout.** A request body must be complete ``api.body_timeout_seconds`` after its head, and no
  gap between its chunks may exceed ``api.body_idle_seconds``. Otherwise the client gets ``408 Request
  Timeout`` (RFC 9110 15.5.9) as problem+json with ``Connection: close``, so uvicorn closes the socket and
  what was buffered is freed. The red-team run of issue 15 held a ``Content-Length: 500000000`` body sent
  at 1 KiB/s for over a minute with nothing to stop it.
- **Answered early, closed.** A response that starts before the body has fully arrived (413 for a declared
  length over the limit, 401, 422) carries ``Connection: close``: otherwise uvicorn keeps the connection
  and reads the rest of the body to discard it, for as long as the client cares to send it.
- **Concurrent uploads.** At most ``api.max_concurrent_uploads`` request bodies that are large (declared
  over :data:`UPLOAD_BYTES`) or of unknown length (chunked) are received at once; one more is answered at
  once, before its body is read, with ``503`` and ``Retry-After`` (RFC 9110 15.6.4), so a burst of uploads
  cannot hold every body in memory together. Small bodies (an acknowledgement) are never held back.

Connection-level limits that an ASGI app cannot see (slow request heads) are in
:mod:`service.api.http_server`.
"""

from __future__ import annotations

import asyncio
import json
import logging

from starlette.applications import Starlette
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.api.problems import PROBLEM_JSON
from service.config import ApiSettings
from service.errors import PacsTriageError, RequestTimeoutError, UploadsBusyError

__all__ = ["UPLOAD_BYTES", "BodyLimitsMiddleware", "install_body_limits"]

logger = logging.getLogger(__name__)

UPLOAD_BYTES = 64 * 1024
"""A body declared larger than this (or chunked) counts against ``api.max_concurrent_uploads``."""


class _BodyTooSlow(Exception):
    """Raised from ``receive`` inside the app; caught by :class:`BodyLimitsMiddleware` (not a PacsTriageError,
    so the app's own handlers let it through to the middleware that can close the connection)."""

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


def _declared(scope: Scope) -> tuple[int | None, bool]:
    """(Content-Length or None, chunked) from the request head."""
    length: int | None = None
    chunked = False
    for name, value in scope.get("headers", ()):
        if name == b"content-length" and value.isdigit():
            length = int(value)
        elif name == b"transfer-encoding" and b"chunked" in value.lower():
            chunked = True
    return length, chunked


async def _problem(send: Send, exc: PacsTriageError) -> None:
    headers = [(b"content-type", PROBLEM_JSON.encode()), (b"connection", b"close")]
    retry_after = getattr(exc, "retry_after", None)
    if retry_after is not None:
        headers.append((b"retry-after", str(retry_after).encode()))
    body = json.dumps(exc.problem()).encode()
    headers.append((b"content-length", str(len(body)).encode()))
    await send({"type": "http.response.start", "status": exc.http_status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class BodyLimitsMiddleware:
    """See the module docstring. One instance per app: it holds the count of uploads in flight."""

    def __init__(self, app: ASGIApp, api: ApiSettings) -> None:
        self.app = app
        self.total = api.body_timeout_seconds
        self.idle = api.body_idle_seconds
        self.max_uploads = api.max_concurrent_uploads
        self.uploads = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length, chunked = _declared(scope)
        if not chunked and not length:
            await self.app(scope, receive, send)
            return
        upload = chunked or (length or 0) > UPLOAD_BYTES
        if upload and self.uploads >= self.max_uploads:
            logger.debug("upload refused: %d already being received", self.uploads)
            await _problem(
                send,
                UploadsBusyError(
                    f"{self.uploads} uploads are being received (api.max_concurrent_uploads); retry shortly",
                    part="body",
                    retry_after=1,
                ),
            )
            return
        if upload:
            self.uploads += 1
        try:
            await self._timed(scope, receive, send)
        finally:
            if upload:
                self.uploads -= 1

    async def _timed(self, scope: Scope, receive: Receive, send: Send) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.total
        state = {"done": False, "started": False}

        async def timed_receive() -> Message:
            if state["done"]:
                return await receive()  # after the body: only http.disconnect is left to wait for
            now = loop.time()
            wait = min(deadline - now, self.idle)
            try:
                message = await asyncio.wait_for(receive(), max(wait, 0.0))
            except TimeoutError:
                why = (
                    f"the request body was not complete within {self.total:g} s"
                    if deadline - now <= self.idle
                    else f"no part of the request body arrived for {self.idle:g} s"
                )
                raise _BodyTooSlow(why) from None
            if message["type"] != "http.request" or not message.get("more_body", False):
                state["done"] = True
            return message

        async def tracking_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                state["started"] = True
                if not state["done"]:  # answered before the body ended (413, 401, ...): close after it,
                    # or uvicorn would go on reading and discarding a body the client may send for hours
                    headers = [h for h in message.get("headers", []) if h[0].lower() != b"connection"]
                    message = {**message, "headers": [*headers, (b"connection", b"close")]}
            await send(message)

        try:
            await self.app(scope, timed_receive, tracking_send)
        except _BodyTooSlow as exc:
            client = scope.get("client") or ("?", 0)
            logger.info("request body from %s too slow: %s; answered 408, connection closed", client[0], exc)
            if state["started"]:
                raise  # too late for an answer: uvicorn drops the connection
            await _problem(send, RequestTimeoutError(exc.detail, part="body"))


def install_body_limits(app: Starlette, api: ApiSettings) -> None:
    """Add :class:`BodyLimitsMiddleware` to ``app`` (called once by the app factory)."""
    app.add_middleware(BodyLimitsMiddleware, api=api)
