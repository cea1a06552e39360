"""The outbox loop shared by DICOM rendering/sending and notifications: run a step until it finds nothing,
then sleep until woken, until the next retry is due, or ``poll`` seconds, whichever comes first.

A step that raises (the store's disk is full, the database is gone, a bug) is retried after a
:class:`service.backoff.Backoff` delay that grows to a ceiling, and the loop is *not* woken early by new
work meanwhile: a failing store is not hammered (issue 15: 5 ms retries at 93 % CPU on a full disk). The
log has one line when the loop starts failing (with the traceback) and one when it recovers
(:class:`service.backoff.FailureLog`), not one per retry.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from datetime import datetime

from service.backoff import Backoff, FailureLog
from service.store.db import utcnow

__all__ = ["drain_loop"]

logger = logging.getLogger(__name__)


async def drain_loop(
    step: Callable[[], Awaitable[int]],
    wanted: asyncio.Event,
    *,
    poll: float,
    next_due: Callable[[], Awaitable[datetime | None]] | None = None,
    name: str,
    backoff: Backoff | None = None,
) -> None:
    """``step()`` returns how much it did; an exception is logged once and retried with back-off, never
    kills the loop. ``backoff`` defaults to 0.5 s doubling up to 60 s."""
    backoff = backoff or Backoff(initial=0.5, ceiling=60.0)
    state = FailureLog(logger, f"{name} loop")
    while True:
        wanted.clear()
        try:
            busy = await step()
            due = await next_due() if next_due is not None and not busy else None
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the store went away or a bug: say so once, wait longer each time
            delay = backoff.failure()
            state.failed(exc, retry_in=delay)
            await asyncio.sleep(delay)
            continue
        if backoff.success():
            state.succeeded()
        if busy:
            continue
        timeout = poll
        if due is not None:
            timeout = min(poll, max(0.01, (due - utcnow()).total_seconds()))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(wanted.wait(), timeout)
