"""The read deadlines of one DICOM connection, watched by one periodic timer (:func:`.pdu.read_pdu`).

A PDU has two clocks: the wait for its first byte (the idle timer, or ARTIM before association, PS3.8
9.1.5) and, from that byte, one deadline for the whole PDU. Each was an ``asyncio.timeout`` per read: a timer
armed and cancelled twice per PDU, ~12 µs of the event loop's time per PDU here, ~70 µs per 513 KiB CT
instance (six PDUs of DCMTK's 128 KiB), on the loop that also answers every association's C-STORE. Here a
read costs a float store: :meth:`ReadDeadlines.start` records when the read must end, and one timer per
connection, every :attr:`ReadDeadlines.period`, cancels the connection's task once that time has passed;
:meth:`ReadDeadlines.expired` then names what expired, as ``asyncio.timeout`` turns its cancellation into
TimeoutError (and a cancellation from elsewhere, the listener stopping, stays a cancellation). A deadline is
noticed at most one period late: a quarter of the shortest clock, at most a second.
"""

from __future__ import annotations

import asyncio
import math

from service.errors import IdleError, PduDeadlineError

__all__ = ["ReadDeadlines"]


class ReadDeadlines:
    """Created on the connection's task, :meth:`close`d when the connection ends."""

    def __init__(self, *clocks_s: float) -> None:
        self._loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        assert task is not None, "created on the connection's own task"
        self._task = task
        self.period = min(1.0, *(s / 4 for s in clocks_s))
        """Seconds between two looks at the clock."""
        self._due = math.inf
        self._seconds = 0.0
        self._whole_pdu = False
        self._fired = False
        self._handle = self._loop.call_later(self.period, self._look)

    def start(self, seconds: float, *, whole_pdu: bool) -> None:
        """From now, the current read must end within ``seconds``: the wait for a PDU's first byte, or
        (``whole_pdu``) the rest of the PDU from its first byte."""
        self._due = self._loop.time() + seconds
        self._seconds, self._whole_pdu = seconds, whole_pdu

    def stop(self) -> None:
        """No read under way (the connection is storing, answering, or done)."""
        self._due = math.inf

    def expired(self) -> TimeoutError | None:
        """After the connection's task was cancelled: the deadline that did it (the cancellation taken
        back), or None when the cancellation came from elsewhere and must go on."""
        if not self._fired:
            return None
        self._fired = False
        if self._task.uncancel() > 0:  # cancelled from elsewhere too: that one wins
            return None
        if self._whole_pdu:
            return PduDeadlineError(f"a PDU was not complete within {self._seconds:g} s of its first byte")
        return IdleError(f"no PDU within {self._seconds:g} s")

    def close(self) -> None:
        self._handle.cancel()

    def _look(self) -> None:
        if self._loop.time() >= self._due and not self._fired:
            self._fired = True
            self._due = math.inf
            self._task.cancel()
        self._handle = self._loop.call_later(self.period, self._look)
