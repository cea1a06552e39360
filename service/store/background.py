"""What the listener's two background writers share: batches that linger, and retries that callers can
hurry.

The group commit (rows, :mod:`service.store.group_commit`) and the placer (received instances from their
slots into their files, :mod:`service.store.slot_place`) each run one thread that takes what the receive
path queued, after the sender was answered.

**Batches that linger** (:data:`LINGER_S`, the placer's own
:data:`service.store.slot_place.PLACE_LINGER_S`, :func:`batch_ready`): each batch costs fixed fsyncs, so a
batch waits a little for company unless something says it should not.

**Retry on demand** (:class:`RetryOnDemand`): a failed batch is retried with a growing backoff (up to 5 s).
While a writer fails, a new instance is refused (0xA700, "try again later"): what cannot be written is not
taken in. But the cause may have gone (the operator made room) while the writer sleeps out its backoff, and
an instance refused then is a study that never completes: a sender (``storescu``) does not resend. So an
arriving instance does not refuse on the last attempt's verdict: it asks for a fresh attempt at once and
waits for it (at most :data:`PROBE_S`), and is refused only if that attempt fails too. A CI run caught the
placer without this (the group commit had it): space returned, the series was sent again at once, and its
instances were refused for the rest of the placer's 5 s sleep.

Since an attempt may now follow every arriving instance, failures are logged by state change
(:class:`service.backoff.FailureLog`: one WARNING when the writer starts failing, DEBUG for the retries,
one INFO when it recovers), not one ERROR per attempt; and only error classes, never a failed statement's
text (it would carry UIDs).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from typing import TypeVar

from service.backoff import FailureLog

__all__ = ["BACKOFF_S", "BATCH", "LINGER_S", "PROBE_S", "RetryOnDemand", "batch_ready"]

T = TypeVar("T")

BATCH = 64
"""Items beyond which a batch starts without lingering, and the most the placer takes at once."""

LINGER_S = 0.02
"""How long a batch waits for more instances once its first one is queued (unless it fills, an association
ends or the process stops). Each batch costs one fsync per directory it touches and one row transaction
(a WAL fsync) whatever its size, and nobody waits for it: the sender was answered at its slot's
``fdatasync``. Without the wait, one association at ~200 instances/s made batches of one or two, and that
fixed cost per batch, on the same two cores as the receive path, held it back: one association, 1,000 CT
instances, three runs each, 20 ms against none: 217-225 against 153-171 instances/s, CPU per instance
4.8-5.2 against 6.6-7.2 ms (bench/RESULTS.md, 2026-12-04). :func:`batch_ready` says what cuts the wait
short: an association's end (its sender has nothing more to batch, and a study may be judged complete at
once), a flush waiting for the rows, a stop, a full batch. The group commit's, with slots off, and the
placer's (:data:`service.store.slot_place.PLACE_LINGER_S`), which also starts when a series fills."""


def batch_ready(queue: Sequence[T], is_end: Callable[[T], bool], *, stopping: bool, hurried: bool) -> bool:
    """Start a batch now rather than linger for more (under the caller's lock): a stop, someone waiting for
    the rows (a flush), a full batch, an association end queued (its study may be complete now). Used by
    the placer and, with slots off, by the group commit."""
    return stopping or hurried or len(queue) >= BATCH or any(is_end(i) for i in queue)


BACKOFF_S = (0.05, 0.2, 1.0, 5.0)
"""Waits after the 1st, 2nd, 3rd and every later consecutive failure."""
PROBE_S = 2.0
"""How long an instance arriving while the writer fails waits for a fresh attempt before it is refused."""


class RetryOnDemand:
    """A writer's failing state and backoff, under the writer's own condition ``cond``: the writer calls
    :meth:`attempted` after each attempt and :meth:`backoff` after a failed one; a producer calls
    :meth:`still_failing` before it takes work in. Every method is called with ``cond`` held."""

    def __init__(
        self, cond: threading.Condition, stopping: Callable[[], bool], logger: logging.Logger, what: str
    ) -> None:
        self._cond = cond
        self._stopping = stopping
        self.log = FailureLog(logger, what)
        """The writer reports each failure here (:meth:`FailureLog.failed`, on its own thread)."""
        self.failing = False
        """The last attempt failed."""
        self._failures = 0  # consecutive
        self._begun = 0  # attempts started
        self._judged = 0  # the number (in ``_begun``) of the last attempt that ended
        self._retry_now = False

    def begin(self) -> None:
        """The writer starts an attempt (it took its batch): a verdict producers asked for before now may
        come from this one."""
        self._begun += 1

    def attempted(self, ok: bool) -> None:
        """The writer's attempt ended (``ok``: it succeeded); wakes producers waiting for a fresh attempt."""
        self._judged = self._begun
        if ok:
            self.log.succeeded()
        self.failing = not ok
        self._failures = 0 if ok else self._failures + 1
        self._cond.notify_all()

    def backoff(self) -> None:
        """The writer waits before its next attempt: the backoff, a stop, or a producer asking for one now."""
        delay = BACKOFF_S[min(self._failures, len(BACKOFF_S)) - 1]
        self._cond.wait_for(lambda: self._stopping() or self._retry_now, delay)
        self._retry_now = False

    def still_failing(self) -> bool:
        """For a producer: if the writer is failing, ask it for a fresh attempt now and wait for its verdict
        (at most :data:`PROBE_S`); True if the writer still fails (refuse the work).

        Fresh means begun after the question: an attempt already under way when the operator made room
        may fail for want of it, and a sender refused on that verdict does not come back
        (tests/reliability/test_faults.py, 6 of 8 runs in session 23: a second series refused one instance
        0.08 s before the rows recovered, and its study never completed)."""
        if self.failing:
            fresh, self._retry_now = self._begun + 1, True
            self._cond.notify_all()
            self._cond.wait_for(lambda: self._judged >= fresh or self._stopping(), PROBE_S)
        return self.failing
