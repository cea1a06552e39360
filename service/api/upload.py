"""A request's DICOM instances, received as they arrive; a large body never held in memory whole.

Why: ``POST /v1/studies`` and STOW-RS read the whole body, split it into parts and parsed them all before
storing anything: a 500 MiB multipart CT was held three times over (the body, its parts, each part's parsed
dataset) and one such upload peaked at 1.9 GiB, three at once far more (bench/bench_memory.py ``--via
rest``); ``api.max_body_bytes`` times ``api.max_concurrent_uploads`` is 8 GiB of bodies alone.

Now the body is split as it arrives (:class:`service.api.stow.PartReader`) and each part checked as soon as
it is complete. While the parts of a request add up to at most ``api.upload_memory_bytes`` they stay in
memory, as before: the request's study is analysed on the datasets it parsed, while their files are
written (the one-pass path of :mod:`service.api.studies`). Past that, the request is **spooled**: each
instance is written and fsynced under a temporary name beside its final place as it arrives
(:func:`service.store.files.stage`, up to :data:`_IN_FLIGHT` at once, overlapping the network) and its bytes
and dataset are dropped; the ingest renames the staged files into place
(:meth:`service.store.instances.Instances.ingest` with ``staged``), and the study's job reads them from
disk slice by slice, as for DICOM. So a request holds at most ``api.upload_memory_bytes`` plus a few
instances in memory, whatever its size. Nothing is acknowledged before its file is in place and fsynced;
a request that fails (a bad body, a client gone, a full disk) removes what it staged, and a crash leaves
only temporary files, removed at the next start (:func:`service.store.files.remove_partial_writes`).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Generic, TypeVar

from starlette.requests import Request

from service.api.stow import BodyPart, PartReader
from service.compute import run_compute
from service.config import ApiSettings
from service.errors import PayloadTooLargeError
from service.store.files import Staged
from service.store.instances import Instances
from service.store.validate import ParsedInstance

__all__ = ["Upload", "receive"]

F = TypeVar("F")

_IN_FLIGHT = 4
"""Parts being parsed and written at once while a spooled request is received."""


@dataclass
class Upload(Generic[F]):
    """What a request carried: the good instances in body order, what was refused, and, when the request was
    spooled, each good instance's staged file (same order); ``good`` then carries no bytes or datasets."""

    parts: int = 0
    good: list[ParsedInstance] = field(default_factory=list)
    bad: list[F] = field(default_factory=list)
    staged: list[Staged] | None = None

    def discard(self) -> None:
        """Remove the staged files (the request failed, or the ingest did not take them)."""
        for st in self.staged or ():
            st.discard()

    async def release(self) -> None:
        """:meth:`discard`, off the event loop, for what the ingest did not take (nothing when the request
        was held in memory: then no system call at all)."""
        if self.staged:
            await asyncio.to_thread(self.discard)


async def receive(
    request: Request,
    content_type: str | None,
    api: ApiSettings,
    instances: Instances,
    check: Callable[[BodyPart], ParsedInstance | F],
) -> Upload[F]:
    """Receive and check every part of the request's body, of ``content_type`` (``check`` returns the
    parsed instance, or what to report for a refused part); spooled to disk once the parts pass
    ``api.upload_memory_bytes``. Raises the API's errors for the body itself (400, 413, 415), and
    :class:`service.errors.StorageFullError` when a spooled instance cannot be written; then nothing is
    kept."""
    content_length = request.headers.get("content-length")
    limit, memory = api.max_body_bytes, api.upload_memory_bytes
    if content_length and content_length.isdigit() and int(content_length) > limit:
        raise PayloadTooLargeError(f"the body is {content_length} bytes; the limit is {limit}", part="body")
    reader = PartReader(content_type)
    upload: Upload[F] = Upload()
    held: list[BodyPart] = []
    held_bytes = size = 0
    pending: list[asyncio.Task[tuple[ParsedInstance | F, Staged | None]]] = []

    async def spool(part: BodyPart) -> None:
        pending.append(asyncio.create_task(asyncio.to_thread(_check_and_stage, part, check, instances)))
        while len(pending) > _IN_FLIGHT or (pending and pending[0].done()):
            _collect(upload, await pending.pop(0))

    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise PayloadTooLargeError(f"the body is larger than the limit of {limit} bytes", part="body")
            for part in reader.feed(chunk):
                upload.parts += 1
                if upload.staged is not None:
                    await spool(part)
                    continue
                held.append(part)
                held_bytes += len(part.data)
                if held_bytes > memory:  # too much to hold: from now on, each part goes to disk
                    upload.staged = []
                    for p in held:
                        await spool(p)
                    held.clear()
        for part in reader.finish():
            upload.parts += 1
            if upload.staged is not None:
                await spool(part)
            else:
                held.append(part)
        while pending:
            _collect(upload, await pending.pop(0))
    except BaseException:
        for task in pending:  # a part being written finishes (a thread cannot be stopped), then goes too
            with contextlib.suppress(Exception):
                _collect(upload, await task)
        upload.discard()
        raise
    if upload.staged is None:
        results = await run_compute(lambda: [check(p) for p in held])
        for r in results:
            if isinstance(r, ParsedInstance):
                upload.good.append(r)
            else:
                upload.bad.append(r)
    return upload


def _check_and_stage(
    part: BodyPart, check: Callable[[BodyPart], ParsedInstance | F], instances: Instances
) -> tuple[ParsedInstance | F, Staged | None]:
    """On a thread: the part checked and, if good, its file written and fsynced under a temporary name; the
    instance kept without its bytes or dataset (the job reads the file)."""
    result = check(part)
    if not isinstance(result, ParsedInstance):
        return result, None
    staged = instances.stage(result)
    return replace(result, data=b"", dataset=None), staged


def _collect(upload: Upload[F], done: tuple[ParsedInstance | F, Staged | None]) -> None:
    result, staged = done
    if isinstance(result, ParsedInstance):
        assert staged is not None and upload.staged is not None
        upload.good.append(result)
        upload.staged.append(staged)
    else:
        upload.bad.append(result)
