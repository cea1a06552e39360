"""A PDU's read deadlines (:mod:`service.ingest.deadlines`): what expired becomes its error, a cancellation
from elsewhere (the listener stopping) stays a cancellation, and the connection's task can read again."""

from __future__ import annotations

import asyncio
import time

import pytest

from service.errors import IdleError, PduDeadlineError
from service.ingest import pdu
from service.ingest.deadlines import ReadDeadlines
from service.ingest.reader import PduReader

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def _read(reader: PduReader, clocks: ReadDeadlines) -> tuple[int, bytes | memoryview] | None:
    return await pdu.read_pdu(reader, limit=1024, deadlines=clocks, wait_s=0.2, pdu_s=0.4)


async def test_each_clock_expires_as_its_own_error_and_reading_goes_on() -> None:
    reader = PduReader(1024, asyncio.get_running_loop())
    clocks = ReadDeadlines(0.2, 0.4)
    try:
        t0 = time.monotonic()
        with pytest.raises(IdleError, match="no PDU within 0.2 s"):
            await _read(reader, clocks)
        assert 0.2 <= time.monotonic() - t0 < 0.2 + 2 * clocks.period
        reader.feed_data(b"\x04\x00")  # a P-DATA-TF's first two bytes, then nothing
        with pytest.raises(PduDeadlineError, match="not complete within 0.4 s"):
            await _read(reader, clocks)
        reader = PduReader(1024, asyncio.get_running_loop())  # the task was not left cancelled: it reads on
        reader.feed_data(b"\x04\x00\x00\x00\x00\x02ok")
        assert await _read(reader, clocks) == (4, b"ok")
    finally:
        clocks.close()


async def test_a_cancellation_from_elsewhere_stays_one() -> None:
    reader = PduReader(1024, asyncio.get_running_loop())
    clocks: list[ReadDeadlines] = []

    async def connection() -> tuple[int, bytes | memoryview] | None:
        clocks.append(ReadDeadlines(0.2, 0.4))
        try:
            return await _read(reader, clocks[-1])
        finally:
            clocks[-1].close()

    task = asyncio.ensure_future(connection())
    await asyncio.sleep(0.05)
    task.cancel()  # the listener stopping
    with pytest.raises(asyncio.CancelledError):
        await task
    task = asyncio.ensure_future(connection())
    await asyncio.sleep(0.05)
    clocks[-1].start(0, whole_pdu=False)
    clocks[-1]._look()  # the idle clock fires, and in the same turn of the loop the listener stops
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
