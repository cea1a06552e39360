"""In-process wake-ups: a stored result wakes ``Prefer: wait`` requests and the delivery loops; new work
wakes idle workers. Nothing here is durable: every waiter also finds its answer in the store, the event
only saves it the wait (a result saved by another process is found by the store read that follows)."""

from __future__ import annotations

import asyncio
import contextlib
from collections import defaultdict
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from service.results.schema import StudyResult

__all__ = ["ResultNotifier"]


class ResultNotifier:
    """Wakes ``Prefer: wait`` requests when a study's result is stored, and idle workers on new jobs."""

    def __init__(self) -> None:
        self._events: dict[str, list[asyncio.Event]] = defaultdict(list)
        self.work = asyncio.Event()
        self.on_result: list[Callable[[StudyResult], None]] = []
        """Called with every stored result: the DICOM render loop and the notifications loop subscribe,
        each waking only when the result gave it something to do."""

    def result_stored(self, result: StudyResult) -> None:
        for ev in self._events.pop(result.study_uid, []):
            ev.set()
        for callback in self.on_result:
            callback(result)

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
