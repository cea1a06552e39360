"""The compute pool: the hot path's CPU-bound steps on one thread per core, apart from blocking I/O."""

from __future__ import annotations

import asyncio
import contextvars
import threading

import pytest

from service.compute import compute_threads, run_compute

pytestmark = pytest.mark.anyio

request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")


async def test_runs_on_its_own_threads_with_the_callers_context() -> None:
    """Like ``asyncio.to_thread``: the caller's context variables (the job id in log lines) go along; but
    on the compute threads, not on the default executor's."""
    request_id.set("job-7")

    def where(x: int, *, y: int) -> tuple[str, str, int]:
        return threading.current_thread().name, request_id.get(), x + y

    name, seen, total = await run_compute(where, 2, y=3)
    assert name.startswith("compute") and seen == "job-7" and total == 5


async def test_one_thread_per_core_at_most() -> None:
    """As many at once as the process has cores, never more: more threads of GIL-holding numpy work only
    take the GIL from each other (bench/RESULTS.md, session 12)."""
    n = compute_threads()
    assert n >= 1
    barrier = threading.Barrier(n, timeout=10)
    running: set[str] = set()

    def hold() -> None:
        running.add(threading.current_thread().name)
        barrier.wait()  # all n run at once, or this times out

    await asyncio.gather(*(run_compute(hold) for _ in range(3 * n)))
    assert len(running) == n


async def test_errors_reach_the_caller() -> None:
    def boom() -> None:
        raise ValueError("bad slice")

    with pytest.raises(ValueError, match="bad slice"):
        await run_compute(boom)
