"""Models served elsewhere: a KServe v2 (Open Inference Protocol) HTTP client that is a
:class:`~service.inference.backend.Backend`.

Why: on GPU machines a model server (NVIDIA Triton, KServe, Seldon MLServer) runs the models, with its own
dynamic batching and GPU memory management, while our workers decode DICOM, route and write results. The
KServe v2 protocol is what all of them speak over HTTP, so one client serves them all. The card stays the
source of truth here: preprocessing, labels, thresholds and the model's sha256 come from
``models/<name>/card.json``; the server only runs the graph (deploy the very ``model.onnx`` the card names;
see docs/scaling.md). The wire format, and what leaves the process (pixels only, issue 18), is
:mod:`service.inference.kserve.wire`.

Start-up (:meth:`KServeV2Backend.start`): wait up to ``start_timeout`` for the server and each model to be
ready, check the model's metadata against its card (input name, FP32, shape; every card output present and
FP32), read the model's ``max_batch_size`` where the server offers Triton's model configuration extension
(requests are cut to it), then run one warm-up image through the whole path. A model that fails any step
is moved to the registry's errors with the reason (``/v1/models`` shows it), as the local engine does; the
others serve.

At run time images are sent in requests of at most ``max_batch`` images, at most ``max_in_flight`` requests
at a time per server; requests waiting for a slot go in (priority, arrival) order, so a stat study does
not queue behind routine ones here either. Connection failures (refused, reset, a keep-alive connection
the server dropped) and 502/503/504 are retried ``retries`` times with backoff: inference is a pure
function, so a retry is safe. Every failure reaches the caller as :class:`InferenceError`, naming the
server and model and carrying the server's own message.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlsplit

import httpx
import numpy as np

from service.errors import InferenceError, NotReadyError
from service.inference import disclosure
from service.inference.backend import Outputs, PriorityGate, check_images, joined, unknown_model, warmup_shape
from service.inference.card import ModelCard
from service.inference.kserve.wire import (
    BINARY_EXTENSION,
    CONFIG_EXTENSION,
    HEADER_LENGTH,
    check_metadata,
    decode_response,
    display_url,
    encode_request,
    server_error,
)
from service.inference.registry import LoadedModel, ModelRegistry
from service.metrics import EngineMetrics
from service.results.schema import Priority, RemoteRequest

__all__ = ["KServeV2Backend"]

logger = logging.getLogger(__name__)

_RETRY_STATUS = frozenset({502, 503, 504})
_BACKOFF_S = 0.1
_POLL_S = 0.25


class _StartError(Exception):
    """Why one remote model cannot be served; the message is shown to people as is."""


class KServeV2Backend:
    """Models served by one KServe v2 server, behind the same surface as the local engine.

    Parameters
    ----------
    base_url
        The server's root, e.g. ``http://triton:8000`` (``/v2`` is appended; a trailing ``/v2`` is taken off).
    registry
        Where the cards come from, and where a model that cannot be served goes (``registry.errors``).
    model_names
        The registry models this server serves, by the same name on the server.
    max_batch
        Most images in one request; a call with more is split and the parts sent concurrently.
    max_in_flight
        Most requests in flight to this server; more wait, ordered by priority.
    timeout
        Seconds for one request, reading the answer included; ``connect_timeout`` for the TCP connect.
    retries
        Extra attempts after a connection failure or a 502/503/504.
    start_timeout
        How long :meth:`start` waits for the server and its models to be ready.
    binary
        Force the binary tensor extension on or off; ``None`` uses it when the server lists it.
    metrics
        Where request times and sizes go (as the engine's session runs), if anywhere.
    transport
        httpx transport (tests pass ``httpx.MockTransport``); default a real connection pool.
    """

    def __init__(
        self,
        base_url: str,
        registry: ModelRegistry,
        model_names: Sequence[str],
        *,
        max_batch: int = 8,
        max_in_flight: int = 8,
        timeout: float = 30.0,
        connect_timeout: float = 5.0,
        retries: int = 3,
        start_timeout: float = 60.0,
        binary: bool | None = None,
        metrics: EngineMetrics | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        if max_batch < 1 or max_in_flight < 1 or retries < 0:
            raise ValueError("max_batch and max_in_flight must be at least 1, retries at least 0")
        base = base_url.rstrip("/").removesuffix("/v2")
        if urlsplit(base).scheme not in ("http", "https"):
            raise ValueError(f"KServe v2 base URL must be http(s)://…, not {display_url(base_url)!r}")
        self.base_url = base
        self.url = display_url(base)
        self.registry = registry
        self.names = list(dict.fromkeys(model_names))
        self.max_batch = max_batch
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self.retries = retries
        self.start_timeout = start_timeout
        self.metrics = metrics
        self.binary = binary
        self._transport = transport
        self._gate = PriorityGate(max_in_flight)
        self._client: httpx.AsyncClient | None = None
        self._models: dict[str, LoadedModel] = {}
        self._batch: dict[str, int] = {}
        self._extensions: list[str] = []
        self._in_flight = 0
        self._ready = False

    # --- the Backend surface ----------------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        """True once :meth:`start` has checked every model (failures are in the registry's errors)."""
        return self._ready

    @property
    def model_names(self) -> list[str]:
        """Models this server serves (passed the start-up checks)."""
        return list(self._models)

    def providers_for(self, name: str) -> list[str]:
        """Where ``name`` runs, as ``/v1/models`` and results show it: ``["KServeV2:<base URL>"]``."""
        self._model(name)
        return [f"KServeV2:{self.url}"]

    async def start(self) -> None:
        """Wait for the server, check each model's metadata against its card, warm each up. Idempotent."""
        if self._ready or self._client is not None:
            return
        self._client = httpx.AsyncClient(
            base_url=self.base_url,
            timeout=httpx.Timeout(self.timeout, connect=self.connect_timeout),
            transport=self._transport,
        )
        deadline = time.monotonic() + self.start_timeout
        try:
            server = await self._wait_server(deadline)
        except _StartError as exc:
            for name in self.names:
                self.registry.mark_failed(name, str(exc))
            self._ready = True
            return
        extensions = server.get("extensions")
        self._extensions = [str(e) for e in extensions] if isinstance(extensions, list) else []
        if self.binary is None:
            self.binary = BINARY_EXTENSION in self._extensions
        logger.info(
            "KServe v2 server %s ready (%s %s); tensors as %s",
            self.url,
            server.get("name", "?"),
            server.get("version", "?"),
            "binary" if self.binary else "JSON",
        )
        for name in self.names:
            model = self.registry.get(name)
            if model is None:
                if name not in self.registry.errors:
                    self.registry.mark_failed(name, f"no loaded card for remote model {name!r}")
                continue
            try:
                await self._start_model(model, deadline)
            except _StartError as exc:
                self.registry.mark_failed(name, f"KServe v2 server {self.url}: {exc}")
                continue
            logger.info("model %s served by KServe v2 server %s", name, self.url)
        self._ready = True

    async def stop(self, drain_timeout: float = 5.0) -> None:
        """Refuse new work, let requests in flight finish for up to ``drain_timeout`` s, close the client."""
        self._ready = False
        self._models = {}
        deadline = time.monotonic() + drain_timeout
        while self._in_flight and time.monotonic() < deadline:
            await asyncio.sleep(0.005)
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()

    async def run(self, model_name: str, images: np.ndarray, priority: int = Priority.ROUTINE) -> Outputs:
        """Run ``images [n, C, H, W]`` through ``model_name`` on the server; outputs by name, first dim ``n``
        (errors as :meth:`service.inference.backend.Runner.run` says: the server's failures are
        :class:`InferenceError`)."""
        if not self._ready:
            raise NotReadyError("the remote inference backend is not ready (starting up or shutting down)")
        model = self._model(model_name)
        array = check_images(images, model.card)
        if len(array) == 0:
            raise ValueError(f"model {model_name}: no images to run")
        step = self._batch.get(model_name, self.max_batch)
        chunks = [array[i : i + step] for i in range(0, len(array), step)]
        if len(chunks) == 1:
            return await self._infer(model.card, chunks[0], priority)
        tasks = [asyncio.ensure_future(self._infer(model.card, chunk, priority)) for chunk in chunks]
        return await joined(tasks, list(model.card.outputs))

    # --- start-up ---------------------------------------------------------------------------------------

    async def _wait_server(self, deadline: float) -> dict[str, Any]:
        """Poll ``/v2/health/ready`` until 200 or ``deadline``; then the server metadata (``GET /v2``)."""
        last = "no answer yet"
        while True:
            try:
                response = await self._http().get("/v2/health/ready", timeout=min(self.timeout, 5.0))
                if response.status_code == 200:
                    break
                last = f"GET /v2/health/ready answered {response.status_code}"
            except httpx.HTTPError as exc:
                last = f"{type(exc).__name__}: {exc}"
            if time.monotonic() >= deadline:
                raise _StartError(
                    f"KServe v2 server {self.url} not ready after {self.start_timeout:g} s ({last})"
                )
            await asyncio.sleep(_POLL_S)
        try:
            metadata = await self._get_json("/v2")
        except InferenceError:
            return {}  # server metadata is optional to us: without it, JSON tensors
        return metadata if isinstance(metadata, dict) else {}

    async def _start_model(self, model: LoadedModel, deadline: float) -> None:
        name = model.name
        while True:
            try:
                response = await self._http().get(f"/v2/models/{name}/ready", timeout=min(self.timeout, 5.0))
                status = str(response.status_code)
            except httpx.HTTPError as exc:
                status = f"{type(exc).__name__}: {exc}"
            if status == "200":
                break
            if time.monotonic() >= deadline:
                raise _StartError(f"model {name!r} not ready after {self.start_timeout:g} s ({status})")
            await asyncio.sleep(_POLL_S)
        try:
            metadata = await self._get_json(f"/v2/models/{name}")
        except InferenceError as exc:
            raise _StartError(f"no model metadata: {exc.detail}") from exc
        problems = check_metadata(model.card, metadata if isinstance(metadata, dict) else {})
        if problems:
            raise _StartError("model metadata does not match the card: " + "; ".join(problems))
        if CONFIG_EXTENSION in self._extensions:
            await self._limit_batch(name)
        warm = np.zeros(warmup_shape(model.card), dtype=np.float32)
        try:
            await self._infer(model.card, warm, Priority.ROUTINE)
        except InferenceError as exc:
            raise _StartError(f"warm-up inference failed: {exc.detail}") from exc
        self._models[name] = model

    async def _limit_batch(self, name: str) -> None:
        """Send no more images per request than the server's ``max_batch_size`` (Triton's model config).

        A Triton model configured with a smaller ``max_batch_size`` than our ``max_batch`` refuses larger
        requests; the v2 metadata does not show it, Triton's ``GET /v2/models/<name>/config`` does.
        """
        try:
            config = await self._get_json(f"/v2/models/{name}/config")
            limit = int(config.get("max_batch_size", 0)) if isinstance(config, dict) else 0
        except (InferenceError, TypeError, ValueError):
            return  # the extension is optional; requests of max_batch will tell
        if 0 < limit < self.max_batch:
            logger.info(
                "model %s: the server batches at most %d images; requests are cut to that", name, limit
            )
            self._batch[name] = limit

    # --- requests ---------------------------------------------------------------------------------------

    async def _infer(self, card: ModelCard, images: np.ndarray, priority: int) -> Outputs:
        async with self._gate.slot(priority):
            self._in_flight += 1
            started = time.perf_counter()
            try:
                outputs = await self._infer_once(card, images)
            finally:
                self._in_flight -= 1
        if self.metrics is not None:
            self.metrics.observe_batch(card.name, len(images), time.perf_counter() - started)
        return outputs

    async def _infer_once(self, card: ModelCard, images: np.ndarray) -> Outputs:
        path = f"/v2/models/{card.name}/infer"
        binary = bool(self.binary)
        request_id = uuid.uuid4().hex  # pseudonymous: random, so it links to nothing outside our log
        logger.info(
            "KServe v2 request %s: model %s, %d image(s) to %s", request_id, card.name, len(images), self.url
        )
        # Audited before it is sent: pixels that reached the server count even if the request fails.
        disclosure.record(
            RemoteRequest(
                model=card.name,
                backend=f"KServeV2:{self.url}",
                request_id=request_id,
                sent="pixels",
                images=len(images),
            )
        )
        # Encoding a JSON tensor is CPU work (~70 ms for a 256x256 image): off the event loop.
        if binary or images.size <= 16384:
            content, headers = encode_request(card, images, binary=binary, request_id=request_id)
        else:
            content, headers = await asyncio.to_thread(
                encode_request, card, images, binary=binary, request_id=request_id
            )
        response = await self._send("POST", path, content=content, headers=headers)
        try:
            outputs = decode_response(response.content, response.headers.get(HEADER_LENGTH))
        except ValueError as exc:
            raise InferenceError(
                f"model {card.name}: {self.url} answered an unusable response: {exc}"
            ) from exc
        missing = [name for name in card.outputs if name not in outputs]
        if missing:
            raise InferenceError(
                f"model {card.name}: {self.url} left out output(s) {missing} (got {sorted(outputs)})"
            )
        for name in card.outputs:
            if outputs[name].ndim == 0 or outputs[name].shape[0] != len(images):
                raise InferenceError(
                    f"model {card.name}: output {name} has shape {outputs[name].shape} from {self.url}, "
                    f"expected first dimension {len(images)}"
                )
        return {name: outputs[name] for name in card.outputs}

    async def _get_json(self, path: str) -> Any:
        response = await self._send("GET", path)
        try:
            return response.json()
        except ValueError as exc:
            raise InferenceError(f"GET {path} on {self.url} did not answer JSON") from exc

    async def _send(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """One request with retries on connection failures and 502/503/504; errors as InferenceError."""
        what = f"{method} {path} on {self.url}"
        for attempt in range(self.retries + 1):
            last_try = attempt == self.retries
            try:
                response = await self._http().request(method, path, **kwargs)
            except (httpx.NetworkError, httpx.RemoteProtocolError, httpx.ConnectTimeout) as exc:
                if last_try:
                    raise InferenceError(
                        f"{what} failed after {attempt + 1} attempt(s): {type(exc).__name__}: {exc}"
                    ) from exc
                logger.warning("%s: %s; retrying", what, type(exc).__name__)
            except httpx.TimeoutException as exc:  # the server is slow, not gone: retrying adds load
                raise InferenceError(f"{what}: no answer within {self.timeout:g} s") from exc
            except httpx.HTTPError as exc:
                raise InferenceError(f"{what} failed: {type(exc).__name__}: {exc}") from exc
            else:
                if response.status_code < 400:
                    return response
                if response.status_code not in _RETRY_STATUS or last_try:
                    raise InferenceError(f"{what} answered {response.status_code}: {server_error(response)}")
                logger.warning("%s answered %d; retrying", what, response.status_code)
            await asyncio.sleep(_BACKOFF_S * 2**attempt)
        raise AssertionError("unreachable")

    def _http(self) -> httpx.AsyncClient:
        if self._client is None:
            raise NotReadyError("the remote inference backend is not started")
        return self._client

    def _model(self, name: str) -> LoadedModel:
        model = self._models.get(name)
        if model is None:
            raise unknown_model(name, self.registry.errors, f"served by KServe v2 server {self.url}")
        return model
