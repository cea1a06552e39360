"""Models served elsewhere: a KServe v2 (Open Inference Protocol) HTTP client with the engine's surface.

Why: on GPU machines a model server (NVIDIA Triton, KServe, Seldon MLServer) runs the models, with its own
dynamic batching and GPU memory management, while our workers decode DICOM, route and write results. The
KServe v2 protocol is what all of them speak over HTTP, so one client serves them all. The card stays the
source of truth here: preprocessing, labels, thresholds and the model's sha256 come from
``models/<name>/card.json``; the server only runs the graph (deploy the very ``model.onnx`` the card names;
see docs/scaling.md).

The protocol (kserve/open-inference-protocol, "REST" section; Triton's docs name the same paths):

- ``GET /v2/health/ready``, ``GET /v2/models/{name}/ready``: 200 when ready;
- ``GET /v2``: server metadata, whose ``extensions`` say whether the binary tensor extension is there;
- ``GET /v2/models/{name}``: inputs and outputs with ``name``, ``datatype``, ``shape`` (-1 = dynamic);
- ``POST /v2/models/{name}/infer``: tensors as JSON (``data`` is the tensor flattened in row-major order),
  or, with Triton's binary tensor data extension, a JSON header of ``Inference-Header-Content-Length``
  bytes followed by the raw little-endian tensors. Errors are ``{"error": "..."}`` with a 4xx/5xx status.

Wire format: binary when the server lists ``binary_tensor_data`` (Triton does), JSON otherwise (MLServer
1.7 has no binary extension over HTTP). JSON costs ~1 µs per number each way in Python (a 256x256 image is
~70 ms to encode), binary next to nothing. Both are exact for FP32: a float32 widened to a Python float
prints in a form that parses back to the same float32, so a remote run sees the very input a local run
would.

Start-up (:meth:`KServeV2Backend.start`): wait up to ``start_timeout`` for the server and each model to be
ready, check the model's metadata against its card (input name, FP32, shape; every card output present and
FP32), read the model's ``max_batch_size`` where the server offers Triton's model configuration extension
(requests are cut to it), then run one warm-up image through the whole path. A model that fails any step
is moved to the registry's errors with the reason (``/v1/models`` shows it), as the local engine does; the
others serve.

What leaves the process (issue 18, de-identified remote inference): an ``infer`` request carries the
preprocessed pixels as one FP32 tensor (name, shape, datatype, values), the names of the outputs wanted,
and ``id``, a random pseudonymous request id (UUID4, new for every request, derived from nothing): no DICOM
header, no UID, name, ID, accession number or date, and no file. The model server therefore never holds
anything that identifies a patient, whatever it logs. Which backend saw which study stays on our side:
each request is logged at INFO with its id, model and server, stamped with the job id
(:mod:`service.logs`), the study's result names the backend per model (``models[].provider``), and every
request is an audit event of its study (:mod:`service.inference.disclosure`). See
docs/deidentification.md. A future backend that needs DICOM must de-identify it first (PS3.15 Annex E).

At run time images are sent in requests of at most ``max_batch`` images, at most ``max_in_flight`` requests
at a time per server; requests waiting for a slot go in (priority, arrival) order, so a stat study does
not queue behind routine ones here either. Connection failures (refused, reset, a keep-alive connection
the server dropped) and 502/503/504 are retried ``retries`` times with backoff: inference is a pure
function, so a retry is safe. Every failure reaches the caller as :class:`InferenceError`, naming the
server and model and carrying the server's own message.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx
import numpy as np

from service.errors import NotReadyError
from service.inference import disclosure
from service.inference.card import ModelCard
from service.inference.engine import PRIORITY_ROUTINE, InferenceError, UnknownModelError
from service.inference.registry import LoadedModel, ModelRegistry
from service.metrics import EngineMetrics
from service.results.schema import RemoteRequest

__all__ = [
    "BINARY_EXTENSION",
    "CONFIG_EXTENSION",
    "HEADER_LENGTH",
    "KServeV2Backend",
    "check_metadata",
    "decode_response",
    "display_url",
    "encode_request",
]

logger = logging.getLogger(__name__)

BINARY_EXTENSION = "binary_tensor_data"
CONFIG_EXTENSION = "model_configuration"
HEADER_LENGTH = "Inference-Header-Content-Length"

# v2 datatypes (open-inference-protocol "Tensor Data Types") as little-endian numpy dtypes.
_DTYPES: dict[str, np.dtype[Any]] = {
    "BOOL": np.dtype("?"),
    "UINT8": np.dtype("u1"),
    "INT8": np.dtype("i1"),
    "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
}
_RETRY_STATUS = frozenset({502, 503, 504})
_BACKOFF_S = 0.1
_POLL_S = 0.25


def display_url(url: str) -> str:
    """``url`` without user or password, for logs, ``/v1/models`` and error messages."""
    parts = urlsplit(url)
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit((parts.scheme, host, parts.path, "", "")).rstrip("/")


def check_metadata(card: ModelCard, metadata: Mapping[str, Any]) -> list[str]:
    """What does not fit between the card and the server's v2 model metadata; empty when it all fits.

    The card's one input must be the server's only input, FP32, with the same rank and every fixed
    dimension equal (a dynamic dimension is ``-1`` on the wire and ``None`` in the card; both must agree).
    Every output the card names must be there, FP32; outputs the card does not name are not asked for.
    """
    problems: list[str] = []
    try:
        inputs = {str(t["name"]): t for t in metadata.get("inputs") or []}
        outputs = {str(t["name"]): t for t in metadata.get("outputs") or []}
    except (TypeError, KeyError, AttributeError):
        return [f"the server's model metadata is not KServe v2 metadata: {str(metadata)[:200]}"]
    want = card.input
    if want.name not in inputs:
        problems.append(f"input {want.name!r} missing on the server (it has {sorted(inputs) or 'none'})")
    else:
        tensor = inputs[want.name]
        if tensor.get("datatype") != "FP32":
            problems.append(
                f"input {want.name!r} is {tensor.get('datatype')} on the server, the card says FP32"
            )
        shape = [None if d in (-1, None) else d for d in tensor.get("shape") or []]
        if shape != list(want.shape):
            problems.append(
                f"input {want.name!r} has shape {_wire(shape)} on the server, card {_wire(want.shape)}"
            )
    extra = sorted(set(inputs) - {want.name})
    if extra:
        problems.append(f"the server's model takes inputs the card does not know: {extra}")
    for name in card.outputs:
        if name not in outputs:
            problems.append(f"output {name!r} missing on the server (it has {sorted(outputs) or 'none'})")
        elif outputs[name].get("datatype") != "FP32":
            problems.append(
                f"output {name!r} is {outputs[name].get('datatype')} on the server, expected FP32"
            )
    return problems


def _wire(shape: Sequence[int | None]) -> list[int]:
    return [-1 if d is None else d for d in shape]


class _StartError(Exception):
    """Why one remote model cannot be served; the message is shown to people as is."""


class _PriorityGate:
    """At most ``limit`` holders at a time; waiters are let in by (priority, arrival)."""

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
        if max_batch < 1 or max_in_flight < 1:
            raise ValueError("max_batch and max_in_flight must be at least 1")
        if retries < 0:
            raise ValueError("retries must be >= 0")
        base = base_url.rstrip("/")
        base = base.removesuffix("/v2")
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
        self._gate = _PriorityGate(max_in_flight)
        self._client: httpx.AsyncClient | None = None
        self._models: dict[str, LoadedModel] = {}
        self._batch: dict[str, int] = {}
        self._extensions: list[str] = []
        self._in_flight = 0
        self._ready = False

    # --- the engine's surface ---------------------------------------------------------------------------

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

    async def run(
        self, model_name: str, images: np.ndarray, priority: int = PRIORITY_ROUTINE
    ) -> dict[str, np.ndarray]:
        """Run ``images [n, C, H, W]`` through ``model_name`` on the server; outputs by name, first dim ``n``.

        Raises
        ------
        NotReadyError
            Not started, or stopping.
        UnknownModelError
            This server does not serve ``model_name`` (or it failed its start-up checks).
        ValueError
            ``images`` is empty or does not fit the card's input shape.
        InferenceError
            The server could not be reached, refused the request or answered something unusable.
        """
        if not self._ready:
            raise NotReadyError("the remote inference backend is not ready (starting up or shutting down)")
        model = self._model(model_name)
        array = _check_images(np.asarray(images), model.card)
        if len(array) == 0:
            raise ValueError(f"model {model_name}: no images to run")
        step = self._batch.get(model_name, self.max_batch)
        chunks = [array[i : i + step] for i in range(0, len(array), step)]
        if len(chunks) == 1:
            return await self._infer(model.card, chunks[0], priority)
        tasks = [asyncio.ensure_future(self._infer(model.card, chunk, priority)) for chunk in chunks]
        try:
            parts = await asyncio.gather(*tasks)
        except BaseException:
            for task in tasks:
                task.cancel()
            raise
        return {name: np.concatenate([part[name] for part in parts], axis=0) for name in model.card.outputs}

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
        warm = np.zeros(_warmup_shape(model.card), dtype=np.float32)
        try:
            await self._infer(model.card, warm, PRIORITY_ROUTINE)
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

    async def _infer(self, card: ModelCard, images: np.ndarray, priority: int) -> dict[str, np.ndarray]:
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

    async def _infer_once(self, card: ModelCard, images: np.ndarray) -> dict[str, np.ndarray]:
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
                    raise InferenceError(f"{what} answered {response.status_code}: {_server_error(response)}")
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
            why = self.registry.errors.get(name)
            raise UnknownModelError(
                f"model {name!r} is not served by KServe v2 server {self.url}" + (f": {why}" if why else "")
            )
        return model


def encode_request(
    card: ModelCard, images: np.ndarray, *, binary: bool, request_id: str | None = None
) -> tuple[bytes, dict[str, str]]:
    """The body and headers of one ``infer`` request for ``images`` (float32 ``[n, C, H, W]``).

    Pixels, output names and ``request_id`` (the v2 ``id``, pseudonymous) only: see the module docstring.
    """
    tensor: dict[str, Any] = {"name": card.input.name, "shape": list(images.shape), "datatype": "FP32"}
    outputs: list[dict[str, Any]] = [{"name": name} for name in card.outputs]
    message: dict[str, Any] = {"id": request_id} if request_id else {}
    if not binary:
        tensor["data"] = images.ravel().tolist()
        message.update(inputs=[tensor], outputs=outputs)
        body = json.dumps(message, separators=(",", ":")).encode()
        return body, {"Content-Type": "application/json"}
    raw = np.ascontiguousarray(images, dtype="<f4").tobytes()
    tensor["parameters"] = {"binary_data_size": len(raw)}
    for output in outputs:
        output["parameters"] = {"binary_data": True}
    message.update(inputs=[tensor], outputs=outputs)
    header = json.dumps(message, separators=(",", ":")).encode()
    return header + raw, {"Content-Type": "application/octet-stream", HEADER_LENGTH: str(len(header))}


def decode_response(body: bytes, header_length: str | None) -> dict[str, np.ndarray]:
    """Output tensors of an ``infer`` answer, JSON or binary extension; ``ValueError`` when malformed."""
    if header_length is None:
        header, raw = body, b""
    else:
        try:
            n = int(header_length)
        except ValueError:
            raise ValueError(f"{HEADER_LENGTH} is {header_length!r}, not a number") from None
        if not 0 <= n <= len(body):
            raise ValueError(f"{HEADER_LENGTH} {n} does not fit a {len(body)}-byte body")
        header, raw = body[:n], body[n:]
    try:
        payload = json.loads(header)
        tensors = payload["outputs"]
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"no 'outputs' in the answer ({exc.__class__.__name__}): {header[:200]!r}") from None
    outputs: dict[str, np.ndarray] = {}
    offset = 0
    for tensor in tensors:
        try:
            name = str(tensor["name"])
            shape = [int(d) for d in tensor["shape"]]
            dtype = _DTYPES[tensor["datatype"]]
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(
                f"output tensor {str(tensor)[:200]} lacks a name, shape or known datatype"
            ) from exc
        native = dtype.newbyteorder("=")
        size = (tensor.get("parameters") or {}).get("binary_data_size")
        if size is not None:
            chunk = raw[offset : offset + int(size)]
            if len(chunk) != int(size):
                raise ValueError(f"output {name}: binary data cut short ({len(chunk)} of {size} bytes)")
            offset += int(size)
            array = np.frombuffer(chunk, dtype=dtype).astype(native)  # a copy: frombuffer's is read-only
        elif "data" in tensor:
            try:
                array = np.asarray(tensor["data"], dtype=native)
            except (TypeError, ValueError) as exc:
                raise ValueError(f"output {name}: data is not {tensor['datatype']}: {exc}") from exc
        else:
            raise ValueError(f"output {name} has neither data nor binary_data_size")
        if array.size != int(np.prod(shape)):
            raise ValueError(f"output {name}: {array.size} values do not fill shape {shape}")
        outputs[name] = array.reshape(shape)
    return outputs


def _server_error(response: httpx.Response) -> str:
    """The server's own message: v2 errors are ``{"error": "..."}``; anything else as text, cut short."""
    try:
        payload = response.json()
    except ValueError:
        payload = None
    if isinstance(payload, dict) and isinstance(payload.get("error"), str):
        return str(payload["error"])[:500]
    return response.text[:500] or response.reason_phrase


def _warmup_shape(card: ModelCard) -> tuple[int, int, int, int]:
    shape = card.input.shape
    channels = shape[1] if len(shape) > 1 and shape[1] else 1
    return (1, channels, card.preprocessing.height, card.preprocessing.width)


def _check_images(array: np.ndarray, card: ModelCard) -> np.ndarray:
    if array.ndim != 4:
        raise ValueError(f"model {card.name} takes [n, C, H, W] images, got shape {array.shape}")
    for axis, (got, want) in enumerate(zip(array.shape[1:], card.input.shape[1:], strict=False), start=1):
        if want is not None and got != want:
            raise ValueError(
                f"model {card.name} takes shape {card.input.shape}, got {array.shape} (axis {axis})"
            )
    return np.ascontiguousarray(array, dtype=np.float32)
