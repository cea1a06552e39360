"""Back-off with a ceiling and state-change logging for loops that retry: shared by every background loop.

The red-team run of issue 15 filled the disk: workers that could not claim a job retried every 5 ms at
93 % CPU and wrote 24.8 MB of tracebacks in a minute. A loop that fails must (1) wait longer after each
failure, up to a ceiling, so a broken store is not hammered and recovery is still noticed within the
ceiling, and (2) say so once when it starts failing and once when it recovers, not once per retry.

- :class:`Backoff`: the delay after ``n`` consecutive failures, ``initial * factor ** (n - 1)`` capped at
  ``ceiling`` (exponential back-off as RFC 9110 10.2.3 ``Retry-After`` leaves to clients, without jitter:
  one process, one loop, nothing to de-synchronise, and tests stay deterministic).
- :class:`FailureLog`: one WARNING (with the traceback of the first failure) on the change from healthy
  to failing, DEBUG for repeats, one INFO with the count and duration on the change back; a *different*
  error while failing is a new state and logged once too.

Used by :func:`service.deliver.loop.drain_loop` (render/send and notification loops) and per target by
:mod:`service.deliver.notify`; the worker loop can adopt the same pair (``failure()`` → sleep the delay,
``success()`` → reset) when it is rewritten.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

__all__ = ["Backoff", "FailureLog"]


@dataclass
class Backoff:
    """Delays after consecutive failures: ``initial``, ``initial * factor``, ... never above ``ceiling``."""

    initial: float = 0.5
    ceiling: float = 60.0
    factor: float = 2.0
    failures: int = 0

    def __post_init__(self) -> None:
        if not 0 < self.initial <= self.ceiling or self.factor < 1:
            raise ValueError("Backoff needs 0 < initial <= ceiling and factor >= 1")

    def failure(self) -> float:
        """Count one more failure; returns the seconds to wait before the next attempt."""
        self.failures += 1
        return self.delay

    @property
    def delay(self) -> float:
        """The wait after the failures so far (0 when there were none)."""
        if not self.failures:
            return 0.0
        # exponent capped so a long outage cannot overflow the float
        return min(self.ceiling, self.initial * self.factor ** min(self.failures - 1, 64))

    def success(self) -> int:
        """Reset after a success; returns how many failures preceded it."""
        failures, self.failures = self.failures, 0
        return failures


@dataclass
class FailureLog:
    """Logs transitions between healthy and failing for one named activity, not every retry.

    Parameters
    ----------
    logger
        Where the lines go (the caller's module logger).
    what
        What is failing, as the log should name it (``"notify loop"``, ``"hl7 to ris.local:2575"``).
    clock
        Monotonic seconds, for the outage duration in the recovery line.
    """

    logger: logging.Logger
    what: str
    clock: Callable[[], float] = time.monotonic
    failing: bool = False
    count: int = 0
    _since: float = 0.0
    _last: str = field(default="", repr=False)

    def failed(
        self, error: BaseException | str, *, retry_in: float | None = None, kind: str | None = None
    ) -> bool:
        """Record a failure; logs only when the state changes (or the kind of failure changes). Returns
        whether it logged, so callers can skip their own per-retry line.

        ``kind`` names the failure when its text varies within one kind (a DICOM peer's ``reason``: the
        words for "unreachable" change when the port starts answering between our two connects);
        without it the error's first line is the kind."""
        text = error if isinstance(error, str) else f"{type(error).__name__}: {error}"
        # The first line says what failed; later lines (SQLAlchemy's statement with its bound timestamps)
        # differ on every retry and would make each one look like a new kind of failure.
        key = kind if kind is not None else text.split("\n", 1)[0]
        self.count += 1
        if self.failing and key == self._last:
            self.logger.debug("%s still failing (%d times): %s", self.what, self.count, text)
            return False
        first = not self.failing
        if first:
            self.failing, self._since = True, self.clock()
        self._last = key
        wait = "; will retry" + (f" with back-off, next in {retry_in:g} s" if retry_in is not None else "")
        self.logger.warning(
            "%s %s: %s%s",
            self.what,
            "failing" if first else "now failing differently",
            text,
            wait,
            exc_info=error if first and isinstance(error, BaseException) else None,
        )
        return True

    def succeeded(self) -> bool:
        """Record a success; logs once if it ends a failing spell. Returns whether it logged."""
        if not self.failing:
            return False
        self.logger.info(
            "%s recovered after %d failure(s) over %.1f s", self.what, self.count, self.clock() - self._since
        )
        self.failing, self.count, self._last = False, 0, ""
        return True
