"""Fuzzing and contract tests (issue 9): a short form by default, a long form on request.

The short form (~300 DICOM cases, ~300 multipart bodies, ~100 examples per API operation) runs in CI with
the rest of the suite in about a minute. The long form (10,000 DICOM cases and more of everything else)
is for a release or after touching the parsers: ``pytest tests/reliability --long`` or
``PACS_TRIAGE_LONG_TESTS=1 pytest``. (``--long`` is registered here, so it is known only when this
directory is named on the command line; the environment variable works from anywhere.)

Hypothesis keeps no example database here (``database=None``): a failure prints the seed and the
shrunk example, which is what the bug report needs, and nothing is written under the source tree.
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest

from service.config import Settings
from tests.service.conftest import make_settings, running_app, tiny_models_dir

__all__ = ["LiveApp", "examples", "live_app", "long_form", "make_settings", "tiny_models_dir"]

LONG_ENV = "PACS_TRIAGE_LONG_TESTS"
_long = {"on": os.environ.get(LONG_ENV, "") not in ("", "0")}


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--long",
        action="store_true",
        default=False,
        help=f"run the long form of the fuzzing tests (same as {LONG_ENV}=1)",
    )


def pytest_configure(config: pytest.Config) -> None:
    if config.getoption("--long", default=False):
        _long["on"] = True


def long_form() -> bool:
    """True when the long form was asked for (``--long`` or the environment variable)."""
    return _long["on"]


def examples(short: int, long: int) -> int:
    """How many cases a fuzzing test runs in this form."""
    return long if long_form() else short


class LiveApp:
    """The real app (lifespan entered, engine warm) on an event loop in a background thread, so that
    hypothesis' synchronous tests can send requests through the in-process ASGI transport one by one."""

    def __init__(self, settings: Settings, *, raise_app_exceptions: bool = True) -> None:
        self.settings = settings
        self.raise_app_exceptions = raise_app_exceptions
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="live-app", daemon=True)
        self._thread.start()
        self._started = threading.Event()
        self._stop: asyncio.Event | None = None
        self._client: httpx.AsyncClient | None = None
        self._main = asyncio.run_coroutine_threadsafe(self._serve(), self.loop)
        if not self._started.wait(60) or self._client is None:
            self.close()  # re-raises what stopped the start-up, if anything did
            raise AssertionError("the app did not start within 60 s")

    async def _serve(self) -> None:
        self._stop = asyncio.Event()
        try:
            async with running_app(self.settings) as (app, client):
                if self.raise_app_exceptions:  # an exception in the app reaches the test, traceback and all
                    self._client = client
                else:  # the 500 problem the service would send (a contract check wants the answer)
                    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
                    self._client = httpx.AsyncClient(transport=transport, base_url="http://test")
                self._started.set()
                await self._stop.wait()
                if self._client is not client:
                    await self._client.aclose()
        finally:
            self._started.set()

    def request(self, method: str, url: str, **kwargs: Any) -> httpx.Response:
        assert self._client is not None, "the app failed to start"
        future = asyncio.run_coroutine_threadsafe(self._client.request(method, url, **kwargs), self.loop)
        return future.result(timeout=120)

    def close(self) -> None:
        if self._stop is not None:
            self.loop.call_soon_threadsafe(self._stop.set)
        try:
            self._main.result(timeout=60)  # re-raises a failed start-up or shutdown
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(10)
            self.loop.close()


@pytest.fixture
def live_app(make_settings: Callable[..., Settings]) -> Iterator[Callable[..., LiveApp]]:
    """Start a :class:`LiveApp` with ``make_settings(**overrides)``; stopped after the test."""
    started: list[LiveApp] = []

    def start(*, raise_app_exceptions: bool = True, **overrides: Any) -> LiveApp:
        app = LiveApp(make_settings(**overrides), raise_app_exceptions=raise_app_exceptions)
        started.append(app)
        return app

    yield start
    for app in started:
        app.close()
