"""The listener's stream reader (:mod:`service.ingest.reader`): the reads a stream reader documents, a
PDU body inside one received chunk handed out without a copy, flow control, and the end of the stream."""

from __future__ import annotations

import asyncio

import pytest

from service.ingest.reader import PduReader

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class _Transport(asyncio.ReadTransport):
    """Records pause/resume as a socket transport would apply them."""

    def __init__(self) -> None:
        super().__init__()
        self.paused = False
        self.calls: list[str] = []

    def pause_reading(self) -> None:
        self.paused = True
        self.calls.append("pause")

    def resume_reading(self) -> None:
        self.paused = False
        self.calls.append("resume")


def _reader(limit: int = 64) -> PduReader:
    return PduReader(limit, asyncio.get_running_loop())


async def test_a_body_inside_one_chunk_is_a_view_of_it_and_one_across_chunks_is_joined() -> None:
    reader = _reader()
    chunk = b"\x04\x00\x00\x00\x00\x05hello" + b"\x04\x00"
    reader.feed_data(chunk)
    assert await reader.readexactly(6) == b"\x04\x00\x00\x00\x00\x05"
    body = await reader.read_view(5)
    assert isinstance(body, memoryview) and body.obj is chunk and bytes(body) == b"hello"  # no copy
    reader.feed_data(b"\x00\x00")
    reader.feed_data(b"\x00\x03ab")
    reader.feed_data(b"c")
    assert await reader.readexactly(6) == b"\x04\x00\x00\x00\x00\x03"  # header across three chunks
    assert await reader.read_view(3) == b"abc"
    assert not reader.at_eof()
    reader.feed_eof()
    assert reader.at_eof()


async def test_a_read_waits_for_all_it_needs_and_is_woken_once() -> None:
    reader = _reader()
    wakes = 0
    original = reader._wake

    def counted() -> None:
        nonlocal wakes
        if reader._reading is not None:
            wakes += 1
        original()

    reader._wake = counted  # type: ignore[method-assign]
    task = asyncio.ensure_future(reader.read_view(30))
    await asyncio.sleep(0)
    for _ in range(5):
        reader.feed_data(b"x" * 5)  # 25 bytes: not enough, nobody woken
        await asyncio.sleep(0)
    assert not task.done() and wakes == 0
    reader.feed_data(b"y" * 10)
    assert await task == b"x" * 25 + b"y" * 5
    assert wakes == 1
    assert await reader.read(100) == b"y" * 5  # read(n): what is there, up to n


async def test_the_end_of_the_stream_and_errors() -> None:
    reader = _reader()
    reader.feed_data(b"abc")
    reader.feed_eof()
    with pytest.raises(asyncio.IncompleteReadError) as cut:
        await reader.readexactly(5)
    assert cut.value.partial == b"abc" and cut.value.expected == 5
    assert await reader.read(1) == b""  # at the end: empty, no wait
    assert reader.at_eof()

    failing = _reader()
    task = asyncio.ensure_future(failing.read(1))
    await asyncio.sleep(0)
    failing.set_exception(ConnectionResetError("reset"))
    with pytest.raises(ConnectionResetError):
        await task
    assert isinstance(failing.exception(), ConnectionResetError)
    with pytest.raises(ConnectionResetError):
        await failing.read_view(1)


async def test_two_reads_at_once_are_a_bug_not_a_race() -> None:
    reader = _reader()
    first = asyncio.ensure_future(reader.read(1))
    await asyncio.sleep(0)
    with pytest.raises(RuntimeError, match="two reads"):
        await reader.read(1)
    reader.feed_data(b"a")
    assert await first == b"a"


async def test_reading_pauses_above_twice_the_limit_and_resumes_at_the_limit() -> None:
    reader, transport = _reader(limit=10), _Transport()
    reader.set_transport(transport)
    reader.feed_data(b"a" * 15)
    assert not transport.paused
    reader.feed_data(b"b" * 10)  # 25 > 2 x 10
    assert transport.paused
    assert await reader.readexactly(10) == b"a" * 10  # 15 left: still above the limit
    assert transport.paused
    assert await reader.readexactly(5) == b"a" * 5  # 10 left: resumed
    assert not transport.paused and transport.calls == ["pause", "resume"]
    reader.feed_data(b"c" * 15)  # 25 again
    assert transport.paused


async def test_a_read_larger_than_what_pausing_holds_resumes_reading_first() -> None:
    reader, transport = _reader(limit=4), _Transport()
    reader.set_transport(transport)
    reader.feed_data(b"x" * 9)  # paused: 9 > 8
    assert transport.paused
    task = asyncio.ensure_future(reader.read_view(20))  # needs more than is held: must not deadlock
    await asyncio.sleep(0)
    assert not transport.paused
    reader.feed_data(b"y" * 11)
    assert await task == b"x" * 9 + b"y" * 11


async def test_the_door_hears_the_first_byte() -> None:
    reader = _reader()
    assert not reader.heard
    reader.feed_data(b"")
    assert not reader.heard
    reader.feed_data(b"\x01")
    assert reader.heard


async def test_lines_as_the_base_class_reads_them() -> None:
    """Nothing of ours reads lines, but a StreamReader offers them: on the reader's own chunks."""
    reader = _reader(limit=16)
    reader.feed_data(b"one\ntw")
    assert await reader.readline() == b"one\n"
    task = asyncio.ensure_future(reader.readuntil(b"\r\n"))
    await asyncio.sleep(0)
    assert not task.done()  # waits for the separator, across chunks
    reader.feed_data(b"o\r")
    reader.feed_data(b"\nrest")
    assert await task == b"two\r\n"
    reader.feed_eof()
    with pytest.raises(asyncio.IncompleteReadError) as cut:
        await reader.readuntil(b"\n")
    assert cut.value.partial == b"rest"
    assert await reader.readline() == b"rest"  # what is left at the end of the stream
    assert await reader.readline() == b"" and reader.at_eof()

    long = _reader(limit=4)
    long.feed_data(b"abcdefgh")
    with pytest.raises(asyncio.LimitOverrunError):
        await long.readuntil(b"\n")
    with pytest.raises(ValueError):
        await long.readuntil(b"")
