"""One inference surface over the local engine and remote model servers, chosen per model.

Why per model: a site may keep a light classifier on the worker's CPU and send a heavy CT model to a GPU
machine running Triton. ``inference.remote_models`` names the remote ones (model name → KServe v2 base
URL); every other registry model runs in the local :class:`~service.inference.engine.InferenceEngine`.
The worker, ``/v1/models`` and ``/healthz/ready`` see one :class:`~service.inference.backend.Backend`
(``run``, ``providers_for``, ``model_names``, ``ready``, ``start``, ``stop``) and need not know where a
model runs.

The local engine gets a view of the registry without the remote models, so it neither loads nor warms a
model that a server elsewhere runs; a local failure still lands in the one registry ``/v1/models`` reads.
Models on the same server share one :class:`~service.inference.kserve.client.KServeV2Backend` (one connection
pool, one in-flight limit).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from service.config import InferenceSettings
from service.inference.engine import InferenceEngine
from service.inference.kserve.client import KServeV2Backend
from service.inference.registry import ModelRegistry
from service.metrics import EngineMetrics
from service.results.schema import Priority

__all__ = ["EngineRouter"]

logger = logging.getLogger(__name__)


@dataclass
class _LocalView(ModelRegistry):
    """The registry less the remote models; failures are recorded in the full registry too.

    ``errors`` is the full registry's dict itself, so the engine's "not loaded: why" finds every reason.
    """

    parent: ModelRegistry = field(default_factory=ModelRegistry)

    def mark_failed(self, name: str, reason: str) -> None:
        self.models.pop(name, None)
        self.parent.mark_failed(name, reason)


class EngineRouter:
    """Dispatches each model to the local engine or to the KServe v2 server that serves it.

    Parameters
    ----------
    local
        The ONNX Runtime engine for every model not listed in ``remotes``.
    remotes
        Remote backends; each serves the models in its ``names``.
    """

    def __init__(self, local: InferenceEngine, remotes: list[KServeV2Backend]) -> None:
        self.local = local
        self.remotes = remotes
        self._route: dict[str, KServeV2Backend] = {}
        for backend in remotes:
            for name in backend.names:
                if name in self._route:
                    raise ValueError(f"model {name!r} is given to two remote backends")
                self._route[name] = backend

    @classmethod
    def from_settings(
        cls,
        registry: ModelRegistry,
        settings: InferenceSettings,
        *,
        metrics: EngineMetrics | None = None,
        remote_options: Mapping[str, Any] | None = None,
    ) -> EngineRouter:
        """The local engine as ``settings`` describe it, plus one backend per URL in ``remote_models``.

        ``remote_options`` are more keywords for every :class:`KServeV2Backend` (``timeout``,
        ``start_timeout``, ``max_in_flight``, ``transport`` in tests); the defaults suit production.
        """
        remote = dict(settings.remote_models)
        local_registry = _LocalView(
            models={n: m for n, m in registry.models.items() if n not in remote},
            errors=registry.errors,
            parent=registry,
        )
        local = InferenceEngine(
            local_registry,
            max_batch=settings.max_batch,
            max_wait_ms=settings.max_wait_ms,
            providers=settings.providers,
            intra_op_threads=settings.intra_op_threads,
            metrics=metrics,
        )
        by_url: dict[str, list[str]] = {}
        for name, url in remote.items():
            by_url.setdefault(url, []).append(name)
        remotes = [
            KServeV2Backend(
                url, registry, names, max_batch=settings.max_batch, metrics=metrics, **(remote_options or {})
            )
            for url, names in by_url.items()
        ]
        return cls(local, remotes)

    @property
    def routes(self) -> Mapping[str, str]:
        """Where each remote model goes (name → server URL without credentials); the rest are local."""
        return {name: backend.url for name, backend in self._route.items()}

    @property
    def ready(self) -> bool:
        """True once the local engine and every remote backend have started."""
        return self.local.ready and all(backend.ready for backend in self.remotes)

    @property
    def model_names(self) -> list[str]:
        """Every model served, local first, then remote (each only once it passed its start-up checks)."""
        return self.local.model_names + [n for backend in self.remotes for n in backend.model_names]

    def providers_for(self, name: str) -> list[str]:
        """ORT execution providers for a local model, ``["KServeV2:<url>"]`` for a remote one."""
        backend = self._route.get(name)
        return backend.providers_for(name) if backend is not None else self.local.providers_for(name)

    async def run(
        self, model_name: str, images: np.ndarray, priority: int = Priority.ROUTINE
    ) -> dict[str, np.ndarray]:
        """Run ``images`` through ``model_name`` wherever it is served (see the engine's ``run``)."""
        backend = self._route.get(model_name)
        if backend is not None:
            return await backend.run(model_name, images, priority)
        return await self.local.run(model_name, images, priority)

    async def start(self) -> None:
        """Start the local engine and the remote backends side by side (CPU work and waiting overlap)."""
        await asyncio.gather(self.local.start(), *(backend.start() for backend in self.remotes))

    async def stop(self, drain_timeout: float = 5.0) -> None:
        """Stop everything, each draining its work for up to ``drain_timeout`` s."""
        await asyncio.gather(
            self.local.stop(drain_timeout), *(backend.stop(drain_timeout) for backend in self.remotes)
        )
