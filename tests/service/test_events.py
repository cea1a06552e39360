"""events.ResultNotifier: a stored result wakes exactly the waiters of its study and the subscribers."""

from __future__ import annotations

import pytest

from service.events import ResultNotifier

pytestmark = pytest.mark.anyio


async def test_a_result_wakes_its_study_watchers_and_every_subscriber() -> None:
    notifier = ResultNotifier()
    calls: list[str] = []
    notifier.on_result.append(lambda: calls.append("render"))
    with notifier.watch("1.1") as mine, notifier.watch("2.2") as other:
        notifier.result_stored("1.1")
        assert mine.is_set() and not other.is_set()
    assert calls == ["render"]
    with notifier.watch("1.1") as again:  # a watch is for the next result only
        assert not again.is_set()
    notifier.result_stored("1.1")  # no watcher left: only the subscribers hear it
    assert not again.is_set() and calls == ["render", "render"]
