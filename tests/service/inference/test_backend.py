"""The Backend Protocol and the helpers every backend shares (service/inference/backend.py).

The local engine, the KServe v2 client and the router that dispatches between them are one kind of object
to the worker and the API: each has every member the Protocol declares, with the same kind (property,
coroutine, method), so nothing needs a ``getattr`` fallback.
"""

from __future__ import annotations

import asyncio
import inspect
from pathlib import Path

import numpy as np
import pytest

from service.config import InferenceSettings
from service.errors import UnknownModelError
from service.inference.backend import (
    Backend,
    Outputs,
    PriorityGate,
    check_images,
    joined,
    unknown_model,
    warmup_shape,
)
from service.inference.engine import InferenceEngine
from service.inference.kserve.client import KServeV2Backend
from service.inference.registry import ModelRegistry
from service.inference.router import EngineRouter
from service.results.schema import Priority
from tests.fixtures.tiny_models import write_tiny_models

pytestmark = pytest.mark.anyio


@pytest.fixture
def registry(tmp_path: Path) -> ModelRegistry:
    write_tiny_models(tmp_path)
    return ModelRegistry.from_directory(tmp_path)


def _members() -> dict[str, str]:
    """Each member the Protocol declares, as ``property``, ``coroutine`` or ``method``."""
    kinds = {}
    for name in ("ready", "model_names", "providers_for", "run", "start", "stop"):
        member = inspect.getattr_static(Backend, name)
        kinds[name] = (
            "property"
            if isinstance(member, property)
            else "coroutine"
            if inspect.iscoroutinefunction(member)
            else "method"
        )
    return kinds


@pytest.mark.parametrize("cls", [InferenceEngine, KServeV2Backend, EngineRouter])
def test_every_backend_has_every_member_of_the_protocol(cls: type) -> None:
    for name, kind in _members().items():
        member = inspect.getattr_static(cls, name)
        if kind == "property":
            assert isinstance(member, property), f"{cls.__name__}.{name} is not a property"
        elif kind == "coroutine":
            assert inspect.iscoroutinefunction(member), f"{cls.__name__}.{name} is not async"
        else:
            assert callable(member) and not inspect.iscoroutinefunction(member), f"{cls.__name__}.{name}"


async def test_a_router_with_a_local_engine_serves_as_a_backend(registry: ModelRegistry) -> None:
    backend: Backend = EngineRouter.from_settings(registry, InferenceSettings(providers="cpu"))
    assert not backend.ready and backend.model_names == []
    await backend.start()
    try:
        assert backend.ready and sorted(backend.model_names) == sorted(registry.models)
        name = backend.model_names[0]
        card = registry.models[name].card
        out = await backend.run(name, np.zeros(warmup_shape(card), dtype=np.float32), Priority.STAT)
        assert all(v.shape[0] == 1 for v in out.values())
        assert backend.providers_for(name) == ["CPUExecutionProvider"]
    finally:
        await backend.stop()
    assert not backend.ready


def test_images_that_do_not_fit_the_card_are_refused_naming_the_axis(registry: ModelRegistry) -> None:
    card = next(iter(registry.models.values())).card
    one = np.zeros(warmup_shape(card), dtype=np.float64)
    fitted = check_images(one, card)
    assert fitted.dtype == np.float32 and fitted.flags.c_contiguous and fitted.shape == one.shape
    with pytest.raises(ValueError, match=r"\[n, C, H, W\]"):
        check_images(one[0], card)
    with pytest.raises(ValueError, match="axis 2"):
        check_images(np.zeros((1, one.shape[1], one.shape[2] + 1, one.shape[3]), dtype=np.float32), card)


def test_an_unknown_model_names_the_registry_reason() -> None:
    error = unknown_model("ct-x", {"ct-x": "sha256 mismatch"}, "served by KServe v2 server http://t:8000")
    assert isinstance(error, UnknownModelError)
    assert str(error) == "model 'ct-x' is not served by KServe v2 server http://t:8000: sha256 mismatch"
    assert str(unknown_model("cxr", {})) == "model 'cxr' is not loaded"


async def test_joined_concatenates_in_order_and_a_failure_cancels_the_rest() -> None:
    async def part(value: float, fail: bool = False) -> Outputs:
        await asyncio.sleep(0)
        if fail:
            raise RuntimeError("part failed")
        return {"p": np.full((2, 1), value, dtype=np.float32)}

    ok = [asyncio.ensure_future(part(v)) for v in (1.0, 2.0)]
    out = await joined(ok, ["p"])
    assert out["p"][:, 0].tolist() == [1.0, 1.0, 2.0, 2.0]

    slow = asyncio.ensure_future(asyncio.sleep(60, result={"p": np.zeros((1, 1))}))
    with pytest.raises(RuntimeError, match="part failed"):
        await joined([asyncio.ensure_future(part(0.0, fail=True)), slow], ["p"])
    await asyncio.sleep(0)
    assert slow.cancelled()


async def test_the_priority_gate_lets_stat_in_before_routine() -> None:
    gate = PriorityGate(1)
    order: list[str] = []
    release = asyncio.Event()

    async def hold(name: str, priority: int) -> None:
        async with gate.slot(priority):
            order.append(name)
            if name == "first":
                await release.wait()

    first = asyncio.create_task(hold("first", Priority.ROUTINE))
    await asyncio.sleep(0)
    waiting = [
        asyncio.create_task(hold("routine", Priority.ROUTINE)),
        asyncio.create_task(hold("stat", Priority.STAT)),
    ]
    await asyncio.sleep(0)
    release.set()
    await asyncio.gather(first, *waiting)
    assert order == ["first", "stat", "routine"]
