"""An association and the C-STORE requests it carries, as the acceptor hands them to the store.

Split from :mod:`service.ingest.acceptor` (the upper layer: one connection's life, PS3.8 9.2), which makes
these and calls the handlers named here; :mod:`service.ingest.scp` and a listener process
(:mod:`service.ingest.front`) implement them. :class:`Arriving` holds a dataset while its fragments arrive;
:func:`store_on_pool` is how a store that does not run on the listener's loop runs beside it.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field

from zlib_ng import zlib_ng

from service.ingest.dimse import Command

__all__ = [
    "Arriving",
    "Association",
    "EndHandler",
    "OpenHandler",
    "StoreHandler",
    "StoreRequest",
    "store_on_pool",
]

_ids = itertools.count(1)


@dataclass(eq=False)
class Association:
    """One established association (hashable by identity: the key of the open-associations tracker)."""

    calling_ae: str
    called_ae: str
    host: str
    port: int
    contexts: dict[int, tuple[str, str]]
    peer_max_pdu: int
    id: int = field(default_factory=lambda: next(_ids))

    def __str__(self) -> str:
        return f"{self.calling_ae!r} at {self.host}:{self.port}"


@dataclass
class StoreRequest:
    """A complete C-STORE: the command, the transfer syntax of its context and the dataset fragments."""

    association: Association
    command: Command
    transfer_syntax_uid: str
    fragments: list[memoryview]
    on_loop: bool = False
    """Stored on the loop (at most :data:`service.ingest.acceptor.STORE_ON_LOOP_UP_TO` associations open,
    the store would not wait): see that module's docstring."""
    dataset_crc: int | None = None
    """CRC-32 of the dataset's bytes, taken fragment by fragment as they arrived, while at most
    ``STORE_ON_LOOP_UP_TO`` associations are open: the store's slot record needs it
    (:func:`service.store.slots.joined_crc`), and the loop had the time while the sender was still sending;
    None where it was not taken."""


class Arriving:
    """A command waiting for its dataset on one context (PS3.8 E.2: the dataset's fragments follow it on the
    same context); the dataset dropped once it passes the cap, read on to its end so the sender gets a
    status."""

    def __init__(self, command: Command, context_id: int, *, checksum: bool) -> None:
        self.command = command
        self.context_id = context_id
        self.fragments: list[memoryview] = []
        self.size = 0
        self.too_large = False
        self.crc: int | None = 0 if checksum else None
        """The running CRC-32 of the fragments (``StoreRequest.dataset_crc``), if taken."""

    def add(self, fragment: memoryview, cap: int) -> None:
        """One more fragment of the dataset (a view of the PDU it came in), held unless past ``cap`` bytes."""
        self.size += len(fragment)
        if self.size > cap:
            self.too_large = True
            self.fragments.clear()  # keep reading to the end so the sender gets a status, hold nothing
            self.crc = None
        elif not self.too_large:
            self.fragments.append(fragment)
            if self.crc is not None:
                self.crc = zlib_ng.crc32(fragment, self.crc)


StoreHandler = Callable[[StoreRequest], tuple[int, str]]
OpenHandler = Callable[[Association], None]
EndHandler = Callable[[Association, bool], None]


async def store_on_pool(executor: Executor, handle: StoreHandler, request: StoreRequest) -> tuple[int, str]:
    """``handle(request)`` on the store pool, its outcome handed back with one ``call_soon_threadsafe``.

    Why not ``asyncio.shield(loop.run_in_executor(...))``: its future chaining (a concurrent future wrapped
    in an asyncio one, shielded by a third) costs the loop more steps per instance; without it two and four
    associations moved 0.97-1.14x as much in six alternated runs, 1.08x on average (bench/RESULTS.md,
    session 17). As with the shield, a wait cancelled (the listener stopping) leaves the store to finish on
    its thread."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[tuple[int, str]] = loop.create_future()

    def settle(outcome: tuple[int, str] | BaseException) -> None:
        if done.done():  # cancelled meanwhile: nobody waits for the answer
            return
        if isinstance(outcome, BaseException):
            done.set_exception(outcome)
        else:
            done.set_result(outcome)

    def run() -> None:
        outcome: tuple[int, str] | BaseException
        try:
            outcome = handle(request)
        except BaseException as exc:  # raised in the connection's task, as before
            outcome = exc
        loop.call_soon_threadsafe(settle, outcome)

    executor.submit(run)
    return await done
