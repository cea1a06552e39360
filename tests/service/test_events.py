"""events.ResultNotifier: a stored result wakes exactly the waiters of its study and the subscribers."""

from __future__ import annotations

import pytest

from service.events import ResultNotifier
from service.results.schema import StudyResult

pytestmark = pytest.mark.anyio


async def test_a_result_wakes_its_study_watchers_and_every_subscriber() -> None:
    notifier = ResultNotifier()
    calls: list[str] = []
    notifier.on_result.append(lambda r: calls.append(r.result_id))
    result = StudyResult(result_id="r1", study_uid="1.1", status="not_analysed", priority="routine")
    with notifier.watch("1.1") as mine, notifier.watch("2.2") as other:
        notifier.result_stored(result)
        assert mine.is_set() and not other.is_set()
    assert calls == ["r1"]
    with notifier.watch("1.1") as again:  # a watch is for the next result only
        assert not again.is_set()
    notifier.result_stored(result)  # no watcher left: only the subscribers hear it
    assert not again.is_set() and calls == ["r1", "r1"]
