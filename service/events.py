"""In-process wake-ups: a stored result wakes ``Prefer: wait`` requests and the delivery loops; new work
wakes idle workers. Nothing here is durable: every waiter also finds its answer in the store, the event
only saves it the wait (a result saved by another process is found by the store read that follows)."""

from __future__ import annotations

import asyncio
import contextlib
from collections import defaultdict
from collections.abc import Callable, Iterator

__all__ = ["ResultNotifier"]


class ResultNotifier:
    """Wakes ``Prefer: wait`` requests when a study's result is stored, and idle workers on new jobs."""

    def __init__(self) -> None:
        self._events: dict[str, list[asyncio.Event]] = defaultdict(list)
        self.work = asyncio.Event()
        self.on_result: list[Callable[[], None]] = []
        """Called on every stored result (the DICOM render loop and the notifications loop subscribe)."""

    def result_stored(self, study_uid: str) -> None:
        for ev in self._events.pop(study_uid, []):
            ev.set()
        for callback in self.on_result:
            callback()

    @contextlib.contextmanager
    def watch(self, study_uid: str) -> Iterator[asyncio.Event]:
        """An event set when the study's next result is stored; register before checking the store."""
        ev = asyncio.Event()
        self._events[study_uid].append(ev)
        try:
            yield ev
        finally:
            with contextlib.suppress(ValueError):
                self._events[study_uid].remove(ev)
            if not self._events.get(study_uid):
                self._events.pop(study_uid, None)
