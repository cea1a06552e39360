"""KServe v2 client: tensors on the wire (JSON, binary), start-up checks, errors, retries, priority, router.

The server here is httpx's MockTransport answering the v2 paths from a few lines of numpy: these tests pin
the mapping between our arrays and the protocol's messages. Whether a real server agrees is
tests/e2e/test_kserve.py's job (MLServer serving the shipped models).
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from service.config import InferenceSettings
from service.errors import InferenceError, NotReadyError, UnknownModelError
from service.inference.card import ModelCard
from service.inference.kserve.client import KServeV2Backend
from service.inference.kserve.wire import (
    BINARY_EXTENSION,
    CONFIG_EXTENSION,
    HEADER_LENGTH,
    check_metadata,
    decode_response,
    display_url,
    encode_request,
)
from service.inference.registry import ModelRegistry
from service.inference.router import EngineRouter
from service.results.schema import Priority
from tests.fixtures.tiny_models import expected_probability, write_tiny_models

pytestmark = pytest.mark.anyio

BASE = "http://triton.test:8000"
CXR = "cxr-pneumothorax"
NODULE = "cxr-nodule"


@pytest.fixture
def registry(tmp_path: Path) -> ModelRegistry:
    write_tiny_models(tmp_path)
    return ModelRegistry.from_directory(tmp_path)


def _metadata(card: ModelCard) -> dict[str, Any]:
    outputs = {"probability": [-1, 1], "heatmap": [-1, 1, 16, 16], "size": [-1, 2, 16, 16]}
    return {
        "name": card.name,
        "versions": ["1"],
        "platform": "onnxruntime_onnx",
        "inputs": [{"name": card.input.name, "datatype": "FP32", "shape": [-1, *card.input.shape[1:]]}],
        "outputs": [{"name": n, "datatype": "FP32", "shape": outputs[n]} for n in card.outputs],
    }


def _answer(card: ModelCard, images: np.ndarray) -> dict[str, np.ndarray]:
    """The tiny models' answers (tests/fixtures/tiny_models.py), computed in numpy."""
    n = len(images)
    if card.task == "detection":
        mean = images.mean(axis=(1, 2, 3)).astype(np.float32)
        heatmap = np.broadcast_to(mean[:, None, None, None], (n, 1, 16, 16)).astype(np.float32)
        return {"heatmap": heatmap, "size": np.full((n, 2, 16, 16), 12.0, dtype=np.float32)}
    return {"probability": expected_probability(images)}


class V2Server:
    """A MockTransport handler speaking the v2 paths; tests change its fields to make it misbehave."""

    def __init__(self, registry: ModelRegistry, *, binary: bool = False) -> None:
        self.cards = {name: m.card for name, m in registry.models.items()}
        self.extensions = [BINARY_EXTENSION] if binary else []
        self.metadata = {name: _metadata(card) for name, card in self.cards.items()}
        self.config: dict[str, dict[str, Any]] = {}  # Triton's model configuration, where a test sets one
        self.ready = True
        self.infer_hook: Callable[[httpx.Request], Awaitable[httpx.Response | None]] | None = None
        self.requests: list[httpx.Request] = []
        self.inputs: list[np.ndarray] = []

    def transport(self) -> httpx.MockTransport:
        return httpx.MockTransport(self.handle)

    async def handle(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        path = request.url.path
        if path == "/v2/health/ready":
            return httpx.Response(200 if self.ready else 503)
        if path == "/v2":
            return httpx.Response(200, json={"name": "mock", "version": "0", "extensions": self.extensions})
        match = re.fullmatch(r"/v2/models/([^/]+)(/ready|/infer|/config)?", path)
        if match is None or match[1] not in self.cards:
            return httpx.Response(404, json={"error": f"no model at {path}"})
        name, action = match[1], match[2]
        if action == "/ready":
            return httpx.Response(200)
        if action is None:
            return httpx.Response(200, json=self.metadata[name])
        if action == "/config":
            if name not in self.config:
                return httpx.Response(404, json={"error": "no configuration"})
            return httpx.Response(200, json=self.config[name])
        if self.infer_hook is not None:
            canned = await self.infer_hook(request)
            if canned is not None:
                return canned
        return self._infer(self.cards[name], request)

    def _infer(self, card: ModelCard, request: httpx.Request) -> httpx.Response:
        body = request.content
        size = request.headers.get(HEADER_LENGTH)
        header = json.loads(body[: int(size)] if size else body)
        tensor = header["inputs"][0]
        if size:
            images = np.frombuffer(body[int(size) :], dtype="<f4").reshape(tensor["shape"])
        else:
            images = np.asarray(tensor["data"], dtype=np.float32).reshape(tensor["shape"])
        self.inputs.append(images)
        outputs = _answer(card, images)
        wanted = [o["name"] for o in header.get("outputs") or []] or list(outputs)
        if not size:
            tensors = [_json_tensor(n, outputs[n]) for n in wanted]
            return httpx.Response(200, json={"model_name": card.name, "outputs": tensors})
        raw = [np.ascontiguousarray(outputs[n], dtype="<f4").tobytes() for n in wanted]
        tensors = [
            {**_json_tensor(n, outputs[n], data=False), "parameters": {"binary_data_size": len(r)}}
            for n, r in zip(wanted, raw, strict=True)
        ]
        head = json.dumps({"model_name": card.name, "outputs": tensors}).encode()
        return httpx.Response(200, content=head + b"".join(raw), headers={HEADER_LENGTH: str(len(head))})


def _json_tensor(name: str, value: np.ndarray, *, data: bool = True) -> dict[str, Any]:
    tensor: dict[str, Any] = {"name": name, "shape": list(value.shape), "datatype": "FP32"}
    if data:
        tensor["data"] = value.ravel().tolist()
    return tensor


def _backend(registry: ModelRegistry, server: V2Server, names: list[str], **kwargs: Any) -> KServeV2Backend:
    options: dict[str, Any] = {"retries": 2, "start_timeout": 0.5, "transport": server.transport()}
    return KServeV2Backend(BASE, registry, names, **{**options, **kwargs})


def _images(values: list[float], size: int = 64) -> np.ndarray:
    return np.stack([np.full((1, size, size), v, dtype=np.float32) for v in values])


# --- wire format --------------------------------------------------------------------------------------------


def test_json_request_carries_exact_float32_values(registry: ModelRegistry) -> None:
    card = registry.models[CXR].card
    images = np.random.default_rng(0).standard_normal((2, 1, 64, 64)).astype(np.float32)
    body, headers = encode_request(card, images, binary=False)
    assert headers == {"Content-Type": "application/json"}
    message = json.loads(body)
    (tensor,) = message["inputs"]
    assert (tensor["name"], tensor["shape"], tensor["datatype"]) == ("image", [2, 1, 64, 64], "FP32")
    assert np.array_equal(np.asarray(tensor["data"], dtype=np.float32).reshape(2, 1, 64, 64), images)
    assert message["outputs"] == [{"name": "probability"}]


def test_binary_request_is_json_header_then_raw_little_endian(registry: ModelRegistry) -> None:
    card = registry.models[NODULE].card
    images = np.random.default_rng(1).standard_normal((3, 1, 64, 64)).astype(np.float32)
    body, headers = encode_request(card, images, binary=True)
    n = int(headers[HEADER_LENGTH])
    header = json.loads(body[:n])
    assert header["inputs"][0]["parameters"] == {"binary_data_size": images.nbytes}
    assert "data" not in header["inputs"][0]
    assert header["outputs"] == [
        {"name": "heatmap", "parameters": {"binary_data": True}},
        {"name": "size", "parameters": {"binary_data": True}},
    ]
    assert np.array_equal(np.frombuffer(body[n:], dtype="<f4").reshape(images.shape), images)


def test_decode_binary_response_splits_outputs_in_order() -> None:
    a = np.arange(6, dtype=np.float32).reshape(2, 3)
    b = np.arange(4, dtype=np.float64).reshape(2, 2)
    head = json.dumps(
        {
            "outputs": [
                {"name": "a", "shape": [2, 3], "datatype": "FP32", "parameters": {"binary_data_size": 24}},
                {"name": "j", "shape": [2], "datatype": "INT64", "data": [7, 8]},
                {"name": "b", "shape": [2, 2], "datatype": "FP64", "parameters": {"binary_data_size": 32}},
            ]
        }
    ).encode()
    out = decode_response(head + a.tobytes() + b.tobytes(), str(len(head)))
    assert np.array_equal(out["a"], a) and out["a"].dtype == np.float32
    assert np.array_equal(out["b"], b) and out["b"].dtype == np.float64
    assert out["j"].tolist() == [7, 8]
    out["a"][0, 0] = 1.0  # writable, like the local engine's outputs


@pytest.mark.parametrize(
    ("body", "header_length", "message"),
    [
        (b"not json", None, "no 'outputs'"),
        (b'{"model_name": "x"}', None, "no 'outputs'"),
        (
            b'{"outputs": [{"name": "p", "shape": [2], "datatype": "FP32", "data": [1.0]}]}',
            None,
            "do not fill",
        ),
        (b'{"outputs": [{"name": "p", "shape": [1], "datatype": "STRANGE", "data": [1]}]}', None, "datatype"),
        (b'{"outputs": [{"name": "p", "shape": [1], "datatype": "FP32"}]}', None, "neither data"),
        (b'{"outputs": [{"name": "p", "shape": [1], "datatype": "FP32", "data": ["x"]}]}', None, "not FP32"),
        (b"{}", "99", "does not fit"),
        (b"{}", "two", "not a number"),
    ],
)
def test_decode_refuses_malformed_answers(body: bytes, header_length: str | None, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        decode_response(body, header_length)


def test_decode_refuses_binary_data_cut_short() -> None:
    tensor = {"name": "p", "shape": [4], "datatype": "FP32", "parameters": {"binary_data_size": 16}}
    head = json.dumps({"outputs": [tensor]}).encode()
    with pytest.raises(ValueError, match="cut short"):
        decode_response(head + b"\0" * 8, str(len(head)))


# --- metadata against the card ------------------------------------------------------------------------------


def test_metadata_that_fits_has_no_problems(registry: ModelRegistry) -> None:
    for model in registry.models.values():
        assert check_metadata(model.card, _metadata(model.card)) == []


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda m: m["inputs"][0].update(name="input_1"), "input 'image' missing on the server"),
        (lambda m: m["inputs"][0].update(datatype="FP16"), "is FP16 on the server, the card says FP32"),
        (
            lambda m: m["inputs"][0].update(shape=[-1, 1, 224, 224]),
            r"shape \[-1, 1, 224, 224\] on the server",
        ),
        (lambda m: m["inputs"][0].update(shape=[1, 1, 64, 64]), r"shape \[1, 1, 64, 64\] on the server"),
        (lambda m: m["inputs"].append({"name": "mask", "datatype": "FP32", "shape": [-1]}), "does not know"),
        (lambda m: m["outputs"].clear(), "output 'probability' missing on the server"),
        (lambda m: m["outputs"][0].update(datatype="INT64"), "output 'probability' is INT64"),
    ],
)
def test_metadata_mismatch_is_named(
    registry: ModelRegistry, change: Callable[[Any], None], message: str
) -> None:
    card = registry.models[CXR].card
    metadata = _metadata(card)
    change(metadata)
    assert re.search(message, "; ".join(check_metadata(card, metadata)))


def test_metadata_that_is_not_v2_is_one_problem(registry: ModelRegistry) -> None:
    problems = check_metadata(registry.models[CXR].card, {"inputs": [42]})
    assert len(problems) == 1 and "not KServe v2 metadata" in problems[0]


# --- the backend --------------------------------------------------------------------------------------------


async def test_runs_json_and_matches_the_model(registry: ModelRegistry) -> None:
    server = V2Server(registry)
    backend = _backend(registry, server, [CXR, NODULE])
    await backend.start()
    try:
        assert backend.ready and backend.model_names == [CXR, NODULE] and backend.binary is False
        assert backend.providers_for(CXR) == [f"KServeV2:{BASE}"]
        images = _images([0.0, 0.5, 1.0])
        out = await backend.run(CXR, images)
        np.testing.assert_array_equal(out["probability"], expected_probability(images))
        assert out["probability"].dtype == np.float32
        det = await backend.run(NODULE, images)
        assert det["heatmap"].shape == (3, 1, 16, 16) and det["size"].shape == (3, 2, 16, 16)
        assert all(r.headers.get(HEADER_LENGTH) is None for r in server.requests)
    finally:
        await backend.stop()
    assert not backend.ready


async def test_binary_when_the_server_lists_the_extension(registry: ModelRegistry) -> None:
    server = V2Server(registry, binary=True)
    backend = _backend(registry, server, [NODULE])
    await backend.start()
    try:
        assert backend.binary is True
        images = np.random.default_rng(2).random((2, 1, 64, 64), dtype=np.float32)
        out = await backend.run(NODULE, images)
        np.testing.assert_array_equal(
            out["heatmap"], _answer(registry.models[NODULE].card, images)["heatmap"]
        )
        infer = [r for r in server.requests if r.url.path.endswith("/infer")]
        assert infer and all(r.headers[HEADER_LENGTH] for r in infer)
        assert all(r.headers["Content-Type"] == "application/octet-stream" for r in infer)
    finally:
        await backend.stop()


async def test_large_calls_are_split_into_max_batch_requests(registry: ModelRegistry) -> None:
    server = V2Server(registry)
    backend = _backend(registry, server, [CXR], max_batch=2)
    await backend.start()
    try:
        images = _images([0.1, 0.2, 0.3, 0.4, 0.5])
        out = await backend.run(CXR, images, Priority.STAT)
        np.testing.assert_array_equal(out["probability"], expected_probability(images))
        sizes = sorted(len(x) for x in server.inputs[1:])  # [0] is the warm-up image
        assert sizes == [1, 2, 2]
    finally:
        await backend.stop()


async def test_requests_respect_the_servers_max_batch_size(registry: ModelRegistry) -> None:
    server = V2Server(registry, binary=True)
    server.extensions.append(CONFIG_EXTENSION)
    server.config[CXR] = {"name": CXR, "max_batch_size": 2}
    backend = _backend(registry, server, [CXR, NODULE], max_batch=8)
    await backend.start()
    try:
        images = _images([0.1, 0.2, 0.3, 0.4, 0.5])
        np.testing.assert_array_equal(
            (await backend.run(CXR, images))["probability"], expected_probability(images)
        )
        assert sorted(len(x) for x in server.inputs[2:]) == [1, 2, 2]  # [0], [1]: the warm-ups
        await backend.run(NODULE, images)  # no config on the server: max_batch
        assert len(server.inputs[-1]) == 5
    finally:
        await backend.stop()


async def test_waiting_requests_go_by_priority(registry: ModelRegistry) -> None:
    server = V2Server(registry)
    backend = _backend(registry, server, [CXR], max_in_flight=1)
    await backend.start()
    release = asyncio.Event()

    async def hold(request: httpx.Request) -> None:
        await release.wait()

    server.infer_hook = hold
    server.inputs.clear()
    try:
        first = asyncio.create_task(backend.run(CXR, _images([0.1]), Priority.ROUTINE))
        await asyncio.sleep(0.05)  # holds the only slot
        routine = asyncio.create_task(backend.run(CXR, _images([0.2]), Priority.ROUTINE))
        await asyncio.sleep(0)
        stat = asyncio.create_task(backend.run(CXR, _images([0.3]), Priority.STAT))
        await asyncio.sleep(0.05)
        release.set()
        await asyncio.gather(first, routine, stat)
        order = [round(float(x.mean()), 1) for x in server.inputs]
        assert order == [0.1, 0.3, 0.2]
    finally:
        await backend.stop()


async def test_a_cancelled_waiter_does_not_lose_the_slot(registry: ModelRegistry) -> None:
    server = V2Server(registry)
    backend = _backend(registry, server, [CXR], max_in_flight=1)
    await backend.start()
    release = asyncio.Event()

    async def hold(request: httpx.Request) -> None:
        await release.wait()

    server.infer_hook = hold
    try:
        first = asyncio.create_task(backend.run(CXR, _images([0.1])))
        await asyncio.sleep(0.05)
        waiter = asyncio.create_task(backend.run(CXR, _images([0.2])))
        await asyncio.sleep(0.01)
        waiter.cancel()
        release.set()
        await first
        with pytest.raises(asyncio.CancelledError):
            await waiter
        out = await asyncio.wait_for(backend.run(CXR, _images([0.3])), 2.0)
        assert out["probability"].shape == (1, 1)
    finally:
        await backend.stop()


async def test_metadata_mismatch_keeps_the_model_out_with_the_reason(registry: ModelRegistry) -> None:
    server = V2Server(registry)
    server.metadata[CXR]["inputs"][0]["shape"] = [-1, 3, 224, 224]
    backend = _backend(registry, server, [CXR, NODULE])
    await backend.start()
    try:
        assert backend.ready and backend.model_names == [NODULE]
        reason = registry.errors[CXR]
        assert f"KServe v2 server {BASE}" in reason and "does not match the card" in reason
        assert "[-1, 3, 224, 224] on the server, card [-1, 1, 64, 64]" in reason
        assert CXR not in registry.models
        with pytest.raises(UnknownModelError, match="does not match the card"):
            await backend.run(CXR, _images([0.5]))
    finally:
        await backend.stop()


async def test_model_unknown_to_the_server_fails_its_start(registry: ModelRegistry) -> None:
    server = V2Server(registry)
    del server.cards[CXR]
    backend = _backend(registry, server, [CXR, NODULE], start_timeout=0.3)
    await backend.start()
    try:
        assert backend.model_names == [NODULE]
        assert "model 'cxr-pneumothorax' not ready after 0.3 s (404)" in registry.errors[CXR]
    finally:
        await backend.stop()


async def test_server_down_at_start_fails_every_model_clearly(registry: ModelRegistry) -> None:
    server = V2Server(registry)
    server.ready = False
    backend = _backend(registry, server, [CXR, NODULE], start_timeout=0.3)
    await backend.start()
    try:
        assert backend.ready and backend.model_names == []
        for name in (CXR, NODULE):
            assert registry.errors[name].startswith(f"KServe v2 server {BASE} not ready after 0.3 s")
            assert "answered 503" in registry.errors[name]
    finally:
        await backend.stop()


async def test_server_errors_reach_the_caller_with_the_servers_message(registry: ModelRegistry) -> None:
    server = V2Server(registry)
    backend = _backend(registry, server, [CXR])
    await backend.start()
    answers = [
        httpx.Response(400, json={"error": "unexpected shape for input 'image'"}),
        httpx.Response(500, text="Internal Server Error"),
    ]

    async def refuse(request: httpx.Request) -> httpx.Response:
        return answers.pop(0)

    server.infer_hook = refuse
    try:
        with pytest.raises(InferenceError, match="answered 400: unexpected shape for input 'image'") as info:
            await backend.run(CXR, _images([0.5]))
        assert f"POST /v2/models/{CXR}/infer on {BASE}" in info.value.detail
        with pytest.raises(InferenceError, match="answered 500: Internal Server Error"):
            await backend.run(CXR, _images([0.5]))
    finally:
        await backend.stop()


async def test_connection_failures_and_503_are_retried(registry: ModelRegistry) -> None:
    server = V2Server(registry)
    backend = _backend(registry, server, [CXR], retries=3)
    await backend.start()
    failures: list[Exception | httpx.Response] = [
        httpx.ConnectError("connection refused"),
        httpx.ReadError("connection reset by peer"),
        httpx.Response(503, json={"error": "model is loading"}),
    ]

    async def flaky(request: httpx.Request) -> httpx.Response | None:
        if not failures:
            return None
        failure = failures.pop(0)
        if isinstance(failure, Exception):
            raise failure
        return failure

    server.infer_hook = flaky
    try:
        out = await backend.run(CXR, _images([0.5]))
        np.testing.assert_array_equal(out["probability"], expected_probability(_images([0.5])))
        assert failures == []
    finally:
        await backend.stop()


async def test_a_server_that_stays_away_gives_inference_error(registry: ModelRegistry) -> None:
    server = V2Server(registry)
    backend = _backend(registry, server, [CXR], retries=1)
    await backend.start()
    calls = 0

    async def gone(request: httpx.Request) -> None:
        nonlocal calls
        calls += 1
        raise httpx.ConnectError("connection refused")

    server.infer_hook = gone
    try:
        with pytest.raises(InferenceError, match="failed after 2 attempt"):
            await backend.run(CXR, _images([0.5]))
        assert calls == 2
    finally:
        await backend.stop()


async def test_a_slow_server_is_not_retried(registry: ModelRegistry) -> None:
    server = V2Server(registry)
    backend = _backend(registry, server, [CXR], retries=3)
    await backend.start()
    calls = 0

    async def slow(request: httpx.Request) -> None:
        nonlocal calls
        calls += 1
        raise httpx.ReadTimeout("timed out")

    server.infer_hook = slow
    try:
        with pytest.raises(InferenceError, match="no answer within 30 s"):
            await backend.run(CXR, _images([0.5]))
        assert calls == 1
    finally:
        await backend.stop()


@pytest.mark.parametrize(
    ("answer", "message"),
    [
        ({"outputs": [{"name": "other", "shape": [1, 1], "datatype": "FP32", "data": [0.5]}]}, "left out"),
        (
            {"outputs": [{"name": "probability", "shape": [2, 1], "datatype": "FP32", "data": [0.5, 0.5]}]},
            "first",
        ),
        ({"error": "nothing"}, "unusable response"),
    ],
)
async def test_answers_that_do_not_fit_the_card_are_errors(
    registry: ModelRegistry, answer: dict[str, Any], message: str
) -> None:
    server = V2Server(registry)
    backend = _backend(registry, server, [CXR])
    await backend.start()

    async def odd(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json=answer)

    server.infer_hook = odd
    try:
        with pytest.raises(InferenceError, match=message):
            await backend.run(CXR, _images([0.5]))
    finally:
        await backend.stop()


async def test_refuses_before_start_and_bad_input(registry: ModelRegistry) -> None:
    backend = _backend(registry, V2Server(registry), [CXR])
    with pytest.raises(NotReadyError):
        await backend.run(CXR, _images([0.5]))
    await backend.start()
    try:
        with pytest.raises(ValueError, match="takes shape"):
            await backend.run(CXR, _images([0.5], size=32))
        with pytest.raises(ValueError, match="no images"):
            await backend.run(CXR, np.zeros((0, 1, 64, 64), dtype=np.float32))
        with pytest.raises(UnknownModelError):
            await backend.run("ct-hemorrhage", _images([0.5]))
    finally:
        await backend.stop()


def test_urls(registry: ModelRegistry) -> None:
    assert (
        display_url("https://user:secret@triton.example:8443/kserve/") == "https://triton.example:8443/kserve"
    )
    backend = KServeV2Backend("http://u:p@triton:8000/v2/", registry, [CXR])
    assert backend.base_url == "http://u:p@triton:8000" and backend.url == "http://triton:8000"
    with pytest.raises(ValueError, match="http"):
        KServeV2Backend("triton:8000", registry, [CXR])


# --- the router ---------------------------------------------------------------------------------------------


async def test_router_sends_remote_models_away_and_keeps_the_rest_local(registry: ModelRegistry) -> None:
    server = V2Server(registry)
    settings = InferenceSettings(providers="cpu", remote_models={CXR: BASE, "cxr-missing": BASE})
    options = {"transport": server.transport(), "start_timeout": 0.5}
    router = EngineRouter.from_settings(registry, settings, remote_options=options)
    assert router.routes == {CXR: BASE, "cxr-missing": BASE}
    await router.start()
    try:
        assert router.ready
        assert sorted(router.local.model_names) == ["ct-hemorrhage", NODULE]  # CXR not loaded locally
        assert sorted(router.model_names) == sorted(["ct-hemorrhage", NODULE, CXR])
        assert router.providers_for(CXR) == [f"KServeV2:{BASE}"]
        assert router.providers_for(NODULE) == ["CPUExecutionProvider"]
        assert "no loaded card for remote model 'cxr-missing'" in registry.errors["cxr-missing"]
        images = _images([0.25, 0.75])
        remote = await router.run(CXR, images)
        np.testing.assert_array_equal(remote["probability"], expected_probability(images))
        assert len(server.inputs) == 2  # warm-up and this call
        local = await router.run(NODULE, images)
        assert set(local) == {"heatmap", "size"} and len(server.inputs) == 2
    finally:
        await router.stop()
    assert not router.ready


async def test_router_local_failures_land_in_the_shared_registry(registry: ModelRegistry) -> None:
    router = EngineRouter.from_settings(registry, InferenceSettings(providers="cpu"))
    router.local.registry.mark_failed(NODULE, "broken on purpose")
    assert registry.errors[NODULE] == "broken on purpose" and NODULE not in registry.models
    assert router.local.registry.errors is registry.errors


def test_remote_models_setting_wants_urls() -> None:
    assert InferenceSettings(remote_models={CXR: "https://triton:8000"}).remote_models == {
        CXR: "https://triton:8000"
    }
    with pytest.raises(ValueError, match="pattern"):
        InferenceSettings(remote_models={CXR: "triton:8000"})
