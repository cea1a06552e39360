"""Service fixtures: settings on a temporary data dir, tiny ONNX models, a started app and a client.

ASGITransport does not run the lifespan, so :func:`running_app` enters ``app.router.lifespan_context``
itself and waits until ``/healthz/ready`` says the engine is warm.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from service.app import create_app
from service.config import Settings
from tests.fixtures.tiny_models import write_tiny_models


@pytest.fixture(scope="session")
def tiny_models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    models_dir = tmp_path_factory.mktemp("models")
    write_tiny_models(models_dir)
    return models_dir


@pytest.fixture
def make_settings(tmp_path: Path, tiny_models_dir: Path) -> Callable[..., Settings]:
    def build(**overrides: Any) -> Settings:
        base: dict[str, Any] = {
            "models_dir": tiny_models_dir,
            "data_dir": tmp_path / "var",
            "inference": {"providers": "cpu", "max_wait_ms": 5.0},
            "assembly": {"quiet_seconds": 0.1},
            "worker": {"poll_seconds": 0.05},
            "store": {"sqlite_synchronous": "NORMAL"},
            "auth": {"open": True},  # tests/service/api/test_auth.py covers tokens
            "dicom": {"host": "127.0.0.1", "port": 0},  # never the real 11112: runs may overlap
        }
        for key, value in overrides.items():
            if isinstance(value, dict) and isinstance(base.get(key), dict):
                base[key] = {**base[key], **value}
            else:
                base[key] = value
        return Settings(**base)

    return build


@asynccontextmanager
async def running_app(settings: Settings) -> AsyncIterator[tuple[FastAPI, httpx.AsyncClient]]:
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            for _ in range(400):
                if (await client.get("/healthz/ready")).status_code == 200:
                    break
                await asyncio.sleep(0.025)
            else:
                raise AssertionError("engine never became ready")
            yield app, client


def wait_until_ready(base: str, died: Callable[[], str | None], timeout: float = 60) -> None:
    """Poll ``base``/healthz/ready until 200; ``died()`` says why the server stopped, or None if it runs."""
    deadline = time.monotonic() + timeout
    while True:
        reason = died()
        assert reason is None, f"the server stopped during start-up: {reason}"
        try:
            if httpx.get(f"{base}/healthz/ready", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, "server never became ready"
        time.sleep(0.05)


@pytest.fixture
def settings(make_settings: Callable[..., Settings]) -> Settings:
    return make_settings()


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"
