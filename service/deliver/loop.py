"""The outbox loop shared by DICOM rendering/sending and notifications: run a step until it finds nothing,
then sleep until woken, until the next retry is due, or ``poll`` seconds, whichever comes first."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from datetime import datetime

from service.clock import utcnow

__all__ = ["drain_loop"]

logger = logging.getLogger(__name__)


async def drain_loop(
    step: Callable[[], Awaitable[int]],
    wanted: asyncio.Event,
    *,
    poll: float,
    next_due: Callable[[], Awaitable[datetime | None]] | None = None,
    name: str,
) -> None:
    """``step()`` returns how much it did; an exception is logged and retried, never kills the loop."""
    while True:
        wanted.clear()
        try:
            busy = await step()
        except asyncio.CancelledError:
            raise
        except Exception:  # the store went away or a bug: log, wait, try again
            logger.exception("%s step failed; retrying", name)
            busy = 0
        if busy:
            continue
        timeout = poll
        if next_due is not None:
            due = await next_due()
            if due is not None:
                timeout = min(poll, max(0.01, (due - utcnow()).total_seconds()))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(wanted.wait(), timeout)
