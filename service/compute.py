"""The hot path's CPU-bound steps on a thread pool of their own, one thread per core.

Why not ``asyncio.to_thread``: its default executor has ``min(32, cores + 4)`` threads (six on a 2-core
machine) and serves every blocking call the service makes, network and disk included (webhooks, C-MOVE
retrievals, OIDC key fetches, fsyncs). Decoding, preprocessing and the input-domain gate are CPU-bound and
hold the GIL between numpy calls; with six threads of them on two cores, under 16 concurrent clients, they
mostly took the GIL from each other and from the store's writer thread. The same work on one thread per core
did 13-18 % more studies a second at 4 ms less CPU per study (bench/RESULTS.md, session 12). Shrinking the
default executor instead would let two slow network calls stall every analysis, so blocking I/O stays
there and only the compute moves here.

:func:`run_compute` is ``asyncio.to_thread`` on this pool: the caller's context variables (the job id in
log lines) go with the call.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import ParamSpec, TypeVar

__all__ = ["compute_threads", "run_compute"]

P = ParamSpec("P")
T = TypeVar("T")

_pool: ThreadPoolExecutor | None = None
_lock = threading.Lock()


def compute_threads() -> int:
    """The cores this process may run on (its CPU affinity, where the platform tells it)."""
    affinity = getattr(os, "sched_getaffinity", None)
    return max(1, len(affinity(0)) if affinity is not None else (os.cpu_count() or 1))


def _executor() -> ThreadPoolExecutor:
    global _pool
    if _pool is None:
        with _lock:
            if _pool is None:
                _pool = ThreadPoolExecutor(max_workers=compute_threads(), thread_name_prefix="compute")
    return _pool


async def run_compute(fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> T:
    """``fn(*args, **kwargs)`` on the compute pool, awaited; for CPU-bound work only, never for a call that
    waits on the network or on another task of this pool."""
    call = functools.partial(contextvars.copy_context().run, fn, *args, **kwargs)
    return await asyncio.get_running_loop().run_in_executor(_executor(), call)
