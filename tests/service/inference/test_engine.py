"""InferenceEngine: same answers as bare ONNX Runtime, micro-batches, priorities, never blocks the loop."""

from __future__ import annotations

import asyncio
import logging
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest

from service.errors import InferenceError, NotReadyError, UnknownModelError
from service.inference import engine as engine_module
from service.inference.engine import CUDA, InferenceEngine
from service.inference.registry import LoadedModel, ModelRegistry
from service.metrics import Metrics
from service.results.schema import Priority
from tests.fixtures.tiny_models import expected_probability, write_tiny_model, write_tiny_models

pytestmark = pytest.mark.anyio

CPU = "CPUExecutionProvider"


@pytest.fixture
def models_dir(tmp_path: Path) -> Path:
    write_tiny_models(tmp_path)
    return tmp_path


@pytest.fixture
async def engine(models_dir: Path) -> AsyncIterator[InferenceEngine]:
    eng = InferenceEngine(ModelRegistry.from_directory(models_dir), providers="cpu", metrics=Metrics())
    await eng.start()
    yield eng
    await eng.stop()


def _images(values: list[float], size: int = 64) -> np.ndarray:
    return np.stack([np.full((1, size, size), v, dtype=np.float32) for v in values])


class _Wrapped:
    """A real session whose ``run`` calls ``hook`` first once armed (warm-up runs are not hooked)."""

    def __init__(self, session: ort.InferenceSession, hook: Callable[[], object]) -> None:
        self.session = session
        self.hook = hook
        self.armed = False

    def run(self, output_names: Any, input_feed: dict[str, Any]) -> list[Any]:
        if self.armed:
            self.hook()
        return self.session.run(output_names, input_feed)

    def get_providers(self) -> list[str]:
        return self.session.get_providers()


def _wrapping_factory(hook: Callable[[], object], made: list[_Wrapped]) -> Any:
    def factory(model: LoadedModel, providers: list[str], options: ort.SessionOptions) -> _Wrapped:
        wrapped = _Wrapped(ort.InferenceSession(str(model.onnx_path), options, providers=providers), hook)
        made.append(wrapped)
        return wrapped

    return factory


class TestInferenceEngine:
    async def test_matches_bare_onnxruntime(self, engine: InferenceEngine, models_dir: Path) -> None:
        rng = np.random.default_rng(0)
        images = rng.random((20, 1, 64, 64), dtype=np.float32)  # 20 > max_batch 8: split and reassembled
        for name in ("cxr-pneumothorax", "cxr-nodule", "ct-hemorrhage"):
            bare = ort.InferenceSession(str(models_dir / name / "model.onnx"), providers=[CPU])
            names = [o.name for o in bare.get_outputs()]
            expected = dict(zip(names, bare.run(names, {"image": images}), strict=True))
            got = await engine.run(name, images)
            assert set(got) == set(expected)
            for key, value in expected.items():
                np.testing.assert_allclose(got[key], value, rtol=1e-6, atol=1e-7)
        assert engine.batch_stats("cxr-nodule").sizes[8] == 2  # 8 + 8 + 4
        assert engine.batch_stats("cxr-nodule").sizes[4] == 1

    async def test_concurrent_calls_batch_and_stay_in_order(self, engine: InferenceEngine) -> None:
        values = [i / 31 for i in range(32)]
        results = await asyncio.gather(
            *(engine.run("cxr-pneumothorax", _images([v]), priority=i % 3) for i, v in enumerate(values))
        )
        for v, result in zip(values, results, strict=True):
            assert result["probability"].shape == (1, 1)
            np.testing.assert_allclose(result["probability"], expected_probability(_images([v])), rtol=1e-5)
        stats = engine.batch_stats("cxr-pneumothorax")
        assert stats.max_batch > 1
        assert stats.images == 32 + 0  # warm-up is not counted
        assert engine.queue_depth("cxr-pneumothorax") == 0
        assert engine.metrics is not None
        text, content_type = engine.metrics.render()  # type: ignore[attr-defined]
        assert content_type.startswith("text/plain")
        assert b'pacs_triage_inference_batch_size_bucket{le="1.0",model="cxr-pneumothorax"}' in text

    async def test_multi_image_calls_keep_their_rows(self, engine: InferenceEngine) -> None:
        calls = [_images([a, b, c]) for a, b, c in np.random.default_rng(1).random((10, 3))]
        results = await asyncio.gather(*(engine.run("ct-hemorrhage", images) for images in calls))
        for images, result in zip(calls, results, strict=True):
            np.testing.assert_allclose(result["probability"], expected_probability(images), rtol=1e-5)

    async def test_stat_overtakes_routine_backlog(self, models_dir: Path) -> None:
        gate = threading.Event()
        made: list[_Wrapped] = []
        registry = ModelRegistry.from_directory(models_dir)
        eng = InferenceEngine(
            registry,
            providers="cpu",
            max_batch=1,
            session_factory=_wrapping_factory(lambda: gate.wait(5), made),
        )
        await eng.start()
        try:
            for wrapped in made:
                wrapped.armed = True
            order: list[str] = []

            async def call(label: str, priority: int) -> None:
                await eng.run("cxr-pneumothorax", _images([0.5]), priority=priority)
                order.append(label)

            first = asyncio.create_task(call("blocker", Priority.ROUTINE))
            await asyncio.sleep(0.02)
            assert eng.queue_depth("cxr-pneumothorax") == 0  # the blocker left the queue: held in the session
            routine = [asyncio.create_task(call(f"routine{i}", Priority.ROUTINE)) for i in range(4)]
            await asyncio.sleep(0.01)
            stat = asyncio.create_task(call("stat", Priority.STAT))
            await asyncio.sleep(0.01)
            assert eng.queue_depth("cxr-pneumothorax") == 5
            gate.set()
            await asyncio.gather(first, stat, *routine)
            assert order == ["blocker", "stat", "routine0", "routine1", "routine2", "routine3"]
        finally:
            gate.set()
            await eng.stop()

    async def test_event_loop_keeps_ticking_during_long_batch(self, models_dir: Path) -> None:
        made: list[_Wrapped] = []
        eng = InferenceEngine(
            ModelRegistry.from_directory(models_dir),
            providers="cpu",
            session_factory=_wrapping_factory(lambda: time.sleep(0.3), made),
        )
        await eng.start()
        try:
            for wrapped in made:
                wrapped.armed = True
            ticks = 0
            stop = asyncio.Event()

            async def heartbeat() -> None:
                nonlocal ticks
                while not stop.is_set():
                    ticks += 1
                    await asyncio.sleep(0.01)

            beat = asyncio.create_task(heartbeat())
            await eng.run("cxr-pneumothorax", _images([0.2, 0.4]))
            stop.set()
            await beat
            assert ticks >= 10  # ~30 if the loop is free; ~1 if the session ran on it
        finally:
            await eng.stop()

    async def test_failed_batch_reaches_every_caller_and_engine_recovers(self, models_dir: Path) -> None:
        def boom() -> None:
            raise RuntimeError("simulated ORT failure")

        made: list[_Wrapped] = []
        eng = InferenceEngine(
            ModelRegistry.from_directory(models_dir),
            providers="cpu",
            session_factory=_wrapping_factory(boom, made),
        )
        await eng.start()
        try:
            for wrapped in made:
                wrapped.armed = True
            results = await asyncio.gather(
                *(eng.run("cxr-nodule", _images([0.5])) for _ in range(5)), return_exceptions=True
            )
            assert all(isinstance(r, InferenceError) for r in results)
            assert "simulated ORT failure" in str(results[0])
            for wrapped in made:
                wrapped.armed = False
            out = await eng.run("cxr-nodule", _images([0.5]))
            assert out["heatmap"].shape == (1, 1, 16, 16)
        finally:
            await eng.stop()

    async def test_unknown_model_and_bad_shape(self, engine: InferenceEngine) -> None:
        with pytest.raises(UnknownModelError, match="not loaded"):
            await engine.run("no-such-model", _images([0.5]))
        with pytest.raises(KeyError):
            await engine.run("no-such-model", _images([0.5]))
        with pytest.raises(ValueError, match="shape"):
            await engine.run("cxr-pneumothorax", _images([0.5], size=32))
        with pytest.raises(ValueError, match="no images"):
            await engine.run("cxr-pneumothorax", np.zeros((0, 1, 64, 64), dtype=np.float32))

    async def test_not_ready_before_start_and_after_stop(self, models_dir: Path) -> None:
        eng = InferenceEngine(ModelRegistry.from_directory(models_dir), providers="cpu")
        assert not eng.ready
        with pytest.raises(NotReadyError):
            await eng.run("cxr-pneumothorax", _images([0.5]))
        await eng.start()
        assert eng.ready
        await eng.stop()
        with pytest.raises(NotReadyError):
            await eng.run("cxr-pneumothorax", _images([0.5]))

    async def test_model_that_onnxruntime_cannot_load_is_moved_to_errors(self, tmp_path: Path) -> None:
        write_tiny_models(tmp_path)
        broken = write_tiny_model(tmp_path, "broken", "classification")
        # A graph whose declarations agree with its card (the registry's checks pass) but whose last
        # operator does not exist: only ONNX Runtime finds out (not-an-ONNX-file is test_cardcheck's).
        import onnx

        graph = onnx.load(str(broken / "model.onnx"))
        graph.graph.node[-1].op_type = "NoSuchOperator"
        onnx.save(graph, broken / "model.onnx")
        card = (broken / "card.json").read_text()
        from service.inference.card import ModelCard, sha256_file

        fixed = ModelCard.model_validate_json(card).model_copy(
            update={
                "sha256": sha256_file(broken / "model.onnx"),
                "size_bytes": (broken / "model.onnx").stat().st_size,
            }
        )
        fixed.write(broken / "card.json")
        registry = ModelRegistry.from_directory(tmp_path)
        assert "broken" in registry.models
        eng = InferenceEngine(registry, providers="cpu")
        await eng.start()
        try:
            assert "ONNX Runtime could not start" in registry.errors["broken"]
            assert sorted(eng.model_names) == ["ct-hemorrhage", "cxr-nodule", "cxr-pneumothorax"]
            with pytest.raises(UnknownModelError, match="could not start"):
                await eng.run("broken", _images([0.5]))
            assert (await eng.run("cxr-pneumothorax", _images([1.0])))["probability"][0, 0] > 0.8
        finally:
            await eng.stop()

    async def test_cpu_provider(self, engine: InferenceEngine) -> None:
        for name in engine.model_names:
            assert engine.providers_for(name) == [CPU]

    async def test_auto_provider_on_this_machine(
        self, models_dir: Path, caplog: pytest.LogCaptureFixture
    ) -> None:
        if "CUDAExecutionProvider" in ort.get_available_providers():
            try:
                import ctypes

                ctypes.CDLL("libcuda.so.1")
                pytest.skip("a GPU machine: auto picks CUDA there")
            except OSError:
                pass
        eng = InferenceEngine(ModelRegistry.from_directory(models_dir), providers="auto")
        with caplog.at_level(logging.INFO, logger="service"):
            await eng.start()
        try:
            assert all(eng.providers_for(name) == [CPU] for name in eng.model_names)
            assert len(eng.model_names) == 3
            assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
            assert any("CPU" in r.getMessage() for r in caplog.records)
        finally:
            await eng.stop()

    async def test_stop_fails_queued_work(self, models_dir: Path) -> None:
        gate = threading.Event()
        made: list[_Wrapped] = []
        eng = InferenceEngine(
            ModelRegistry.from_directory(models_dir),
            providers="cpu",
            max_batch=1,
            session_factory=_wrapping_factory(lambda: gate.wait(5), made),
        )
        await eng.start()
        for wrapped in made:
            wrapped.armed = True
        calls = [asyncio.create_task(eng.run("cxr-pneumothorax", _images([0.5]))) for _ in range(3)]
        await asyncio.sleep(0.02)
        stopping = asyncio.create_task(eng.stop(drain_timeout=0.05))
        await asyncio.sleep(0.1)
        gate.set()
        await stopping
        results = await asyncio.gather(*calls, return_exceptions=True)
        assert any(isinstance(r, InferenceError) for r in results)


class TestCudaLibraries:
    """CUDA and cuDNN from NVIDIA's pip wheels are loaded before the first CUDA session, once, quietly."""

    @pytest.fixture(autouse=True)
    def _fresh(self) -> Any:
        engine_module._load_cuda_libraries.cache_clear()
        yield
        engine_module._load_cuda_libraries.cache_clear()

    def _gpu_like(self, monkeypatch: pytest.MonkeyPatch, preload: Callable[[], None]) -> None:
        monkeypatch.setattr(ort, "get_available_providers", lambda: [CUDA, CPU])
        monkeypatch.setattr(engine_module, "_nvidia_driver_present", lambda: True)
        monkeypatch.setattr(ort, "preload_dlls", preload, raising=False)

    def test_preloaded_once_when_cuda_is_wanted(
        self, models_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
    ) -> None:
        calls: list[int] = []

        def preload() -> None:
            calls.append(1)
            sys.stdout.write("Failed to load libcudnn.so.9: not found\n")  # as onnxruntime prints

        self._gpu_like(monkeypatch, preload)
        eng = InferenceEngine(ModelRegistry.from_directory(models_dir), providers="auto")
        assert eng._cuda_wanted() and eng._cuda_wanted()
        assert calls == [1]
        assert "libcudnn" not in capsys.readouterr().out

    def test_not_loaded_for_cpu_and_failure_is_logged_not_raised(
        self, models_dir: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
    ) -> None:
        def preload() -> None:
            raise RuntimeError("Invalid parameter of directory")

        self._gpu_like(monkeypatch, preload)
        registry = ModelRegistry.from_directory(models_dir)
        assert not InferenceEngine(registry, providers="cpu")._cuda_wanted()
        assert engine_module._load_cuda_libraries.cache_info().currsize == 0
        with caplog.at_level(logging.INFO, logger="service"):
            assert InferenceEngine(registry, providers="cuda")._cuda_wanted()
        assert any("not preloaded" in r.getMessage() for r in caplog.records)
