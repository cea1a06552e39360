"""The retry-on-demand state the group commit and the placer share (service/store/background.py)."""

from __future__ import annotations

import logging
import threading

from service.store.background import RetryOnDemand


class _Writer:
    """A writer thread whose attempts the test lets end one at a time, each with the verdict it is given."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.retry = RetryOnDemand(self.cond, lambda: self.stopping, logging.getLogger("test"), "test writes")
        self.stopping = False
        self.verdicts: list[bool] = []  # the next attempts' outcomes, in order
        self.started = threading.Semaphore(0)  # released as each attempt begins
        self.proceed = threading.Semaphore(0)  # the test lets the attempt under way end
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while True:
            with self.cond:
                if self.stopping or not self.verdicts:
                    return
                ok = self.verdicts.pop(0)
                self.retry.begin()
            self.started.release()
            self.proceed.acquire()
            with self.cond:
                self.retry.attempted(ok)
                if not ok:
                    self.retry.backoff()


def test_a_producer_waits_for_an_attempt_begun_after_it_asked() -> None:
    """An attempt already under way when the producer asks (begun before the operator made room) fails:
    its verdict is not the producer's; the next attempt, which succeeds, is. Before, the producer took the
    first verdict that came and refused an instance that could have been stored."""
    w = _Writer()
    w.verdicts = [False, False, True]
    w.thread.start()
    assert w.started.acquire(timeout=10)
    w.proceed.release()  # the first attempt fails: the writer is failing (its backoff is 0.05 s)
    assert w.started.acquire(timeout=10)  # the second is under way (room is made now, too late for it)
    with w.cond:
        assert w.retry.failing
    answer: list[bool] = []
    producer = threading.Thread(target=lambda: answer.append(_ask(w)), daemon=True)
    producer.start()
    with w.cond:  # the producer asked (it waits on the condition, so the lock is free) ...
        assert w.cond.wait_for(lambda: w.retry._retry_now, 10)
    w.proceed.release()  # ... and the attempt begun before its question fails
    assert w.started.acquire(timeout=10)  # a fresh one, at once (no backoff: it was asked for)
    assert not answer, "the producer took the verdict of an attempt begun before it asked"
    w.proceed.release()  # the fresh attempt succeeds
    producer.join(10)
    w.thread.join(10)
    assert answer == [False]  # not failing: the instance is taken


def _ask(w: _Writer) -> bool:
    with w.cond:
        return w.retry.still_failing()
