"""What every inference backend is: the :class:`Backend` Protocol, and the helpers the backends share.

Two backends run models today: the local ONNX Runtime engine (:mod:`service.inference.engine`) and a KServe
v2 server (:mod:`service.inference.kserve.client`); :class:`~service.inference.router.EngineRouter` puts them
behind one object per process. The worker, ``/v1/models`` and ``/healthz/ready`` hold a :class:`Backend`
and never ask which kind it is. A new backend (another protocol, a GPU pool) satisfies the Protocol and
reuses the helpers below, so the input checks, warm-up image and batch splitting stay the same everywhere:
a remote run sees the very input a local run would.

Priorities are :class:`~service.results.schema.Priority` values (stat 0, urgent 1, routine 2); lower runs
first when work is queued, in every backend.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import Protocol

import numpy as np

from service.errors import UnknownModelError
from service.inference.card import ModelCard
from service.results.schema import Priority

__all__ = [
    "Backend",
    "Outputs",
    "PriorityGate",
    "Runner",
    "check_images",
    "joined",
    "unknown_model",
    "warmup_shape",
]

Outputs = dict[str, np.ndarray]
"""Output tensors by name, each with the images along its first dimension."""


class Runner(Protocol):
    """The part of a backend that analysis needs (:func:`service.analyse.analyse_study`)."""

    async def run(self, model_name: str, images: np.ndarray, priority: int = Priority.ROUTINE) -> Outputs:
        """Run ``images [n, C, H, W]`` (float32, preprocessed with the card's spec) through ``model_name``.

        Raises :class:`~service.errors.NotReadyError` before start or while stopping,
        :class:`~service.errors.UnknownModelError` for a model this backend does not serve, ValueError for
        images that do not fit the card's input, :class:`~service.errors.InferenceError` when the run fails.
        """
        ...

    def providers_for(self, name: str) -> list[str]:
        """Where ``name`` runs, as ``/v1/models`` and the result's ``models[].provider`` show it."""
        ...


class Backend(Runner, Protocol):
    """A whole backend: it starts, warms its models, says when it is ready and which models it serves."""

    @property
    def ready(self) -> bool:
        """True once every model has been started and warmed up, or has failed to (``/healthz/ready``)."""
        ...

    @property
    def model_names(self) -> list[str]:
        """The models served now: each passed its start-up checks (failures are in the registry's errors)."""
        ...

    async def start(self) -> None:
        """Load, check and warm every model; a model that fails goes to the registry's errors. Idempotent."""
        ...

    async def stop(self, drain_timeout: float = 5.0) -> None:
        """Refuse new work; let work in progress finish for up to ``drain_timeout`` s."""
        ...


def warmup_shape(card: ModelCard) -> tuple[int, int, int, int]:
    """One image of the card's input shape: ``[1, C, H, W]`` (channels 1 when the graph leaves it open)."""
    shape = card.input.shape
    channels = shape[1] if len(shape) > 1 and shape[1] else 1
    return (1, channels, card.preprocessing.height, card.preprocessing.width)


def check_images(images: np.ndarray, card: ModelCard) -> np.ndarray:
    """``images`` as a contiguous float32 ``[n, C, H, W]`` array; ValueError naming the axis that does not
    fit the card's input shape (a dimension the card leaves open fits anything)."""
    array = np.asarray(images)
    if array.ndim != 4:
        raise ValueError(f"model {card.name} takes [n, C, H, W] images, got shape {array.shape}")
    expected = card.input.shape
    for axis, (got, want) in enumerate(zip(array.shape[1:], expected[1:], strict=False), start=1):
        if want is not None and got != want:
            raise ValueError(f"model {card.name} takes shape {expected}, got {array.shape} (axis {axis})")
    return np.ascontiguousarray(array, dtype=np.float32)


def unknown_model(name: str, errors: Mapping[str, str], not_what: str = "loaded") -> UnknownModelError:
    """The error for a model a backend does not serve, with the registry's reason when it has one."""
    why = errors.get(name)
    return UnknownModelError(f"model {name!r} is not {not_what}" + (f": {why}" if why else ""))


async def joined(parts: Sequence[asyncio.Future[Outputs]], names: Sequence[str]) -> Outputs:
    """The outputs of a call cut into batches, back in one piece (in order, along the first dimension).

    One part is awaited as is (cancelling the caller cancels it); with more, a failure or a cancel of one
    cancels the others, so no batch runs for a caller that has gone.
    """
    if len(parts) == 1:
        return await parts[0]
    try:
        results = await asyncio.gather(*parts)
    except BaseException:
        for part in parts:
            part.cancel()
        raise
    return {name: np.concatenate([result[name] for result in results], axis=0) for name in names}


class PriorityGate:
    """At most ``limit`` holders at a time; waiters are let in by (priority, arrival), so a stat study
    does not queue behind routine ones for a remote server's in-flight slots either."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.active = 0
        self._waiters: list[tuple[int, int, asyncio.Future[None]]] = []
        self._seq = itertools.count()

    @asynccontextmanager
    async def slot(self, priority: int) -> AsyncIterator[None]:
        if self.active < self.limit and not self._waiters:
            self.active += 1
        else:
            future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            heapq.heappush(self._waiters, (priority, next(self._seq), future))
            try:
                await future  # on success the releasing holder handed its slot to us
            except asyncio.CancelledError:
                if future.done() and not future.cancelled():  # handed a slot, then cancelled: pass it on
                    self._release()
                raise
        try:
            yield
        finally:
            self._release()

    def _release(self) -> None:
        while self._waiters:
            _, _, future = heapq.heappop(self._waiters)
            if not future.done():  # skip waiters that were cancelled
                future.set_result(None)
                return
        self.active -= 1
