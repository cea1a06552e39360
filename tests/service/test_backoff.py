"""service.backoff and the outbox loop's use of it: delays grow to a ceiling, and a failing loop logs
one line when it starts failing and one when it recovers, not one per retry (issue 15)."""

from __future__ import annotations

import asyncio
import logging

import pytest

from service.backoff import Backoff, FailureLog
from service.deliver.loop import drain_loop


def test_delays_double_up_to_the_ceiling_and_reset() -> None:
    backoff = Backoff(initial=0.5, ceiling=4.0)
    assert backoff.delay == 0.0
    assert [backoff.failure() for _ in range(6)] == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]
    assert backoff.success() == 6 and backoff.delay == 0.0
    assert backoff.failure() == 0.5
    for _ in range(10_000):  # a very long outage stays at the ceiling, no overflow
        backoff.failure()
    assert backoff.delay == 4.0
    with pytest.raises(ValueError):
        Backoff(initial=5.0, ceiling=1.0)


def test_failure_log_logs_state_changes_only(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="test.backoff")
    now = [100.0]
    log = FailureLog(logging.getLogger("test.backoff"), "hl7 to ris:2575", clock=lambda: now[0])
    assert log.succeeded() is False  # healthy stays quiet
    assert log.failed(ConnectionRefusedError(111, "refused"), retry_in=2.0) is True
    assert [log.failed(ConnectionRefusedError(111, "refused")) for _ in range(50)] == [False] * 50
    assert log.failed("timed out") is True  # a different error is news
    now[0] += 42.0
    assert log.succeeded() is True
    shown = [(r.levelname, r.getMessage()) for r in caplog.records if r.levelno >= logging.INFO]
    assert [level for level, _ in shown] == ["WARNING", "WARNING", "INFO"]
    assert "hl7 to ris:2575 failing: ConnectionRefusedError" in shown[0][1]
    assert "next in 2 s" in shown[0][1]
    assert caplog.records[0].exc_info is not None  # the first failure carries its traceback
    assert "now failing differently: timed out" in shown[1][1]
    assert shown[2][1] == "hl7 to ris:2575 recovered after 52 failure(s) over 42.0 s"


def test_failure_log_kind_keeps_one_outage_one_line(caplog: pytest.LogCaptureFixture) -> None:
    """A PACS coming back: its connect fails "refused", then the diagnostic reconnect finds the port open;
    the words change, the kind ("unreachable") does not: one WARNING, not two (a CI run logged two)."""
    caplog.set_level(logging.INFO, logger="test.backoff")
    log = FailureLog(logging.getLogger("test.backoff"), "delivery to PACS@pacs:104")
    assert log.failed("cannot connect to PACS@pacs:104: connection refused", kind="unreachable") is True
    assert log.failed("cannot connect to PACS@pacs:104: connection failed (the port answers now: try again)",
                      kind="unreachable") is False  # fmt: skip
    assert log.failed("no answer to the association request within 30 s", kind="timeout") is True
    assert log.succeeded() is True
    assert [r.levelname for r in caplog.records] == ["WARNING", "WARNING", "INFO"]


@pytest.mark.anyio
async def test_drain_loop_backs_off_and_logs_once(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="service.deliver.loop")
    calls: list[str] = []
    recovered = asyncio.Event()

    async def step() -> int:
        calls.append("step")
        if len(calls) <= 20:
            raise OSError(28, "No space left on device")
        recovered.set()
        return 0

    wanted = asyncio.Event()
    task = asyncio.create_task(
        drain_loop(step, wanted, poll=60.0, name="render", backoff=Backoff(initial=0.001, ceiling=0.004))
    )
    await asyncio.wait_for(recovered.wait(), 30)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert len(calls) == 21
    lines = [(r.levelname, r.getMessage()) for r in caplog.records if r.levelno >= logging.INFO]
    assert len(lines) == 2, lines
    assert lines[0][0] == "WARNING" and "render loop failing: OSError" in lines[0][1]
    assert lines[1][0] == "INFO" and "render loop recovered after 20 failure(s)" in lines[1][1]
