"""A real MLServer (Seldon's KServe v2 / Open Inference Protocol server) serving our ONNX models.

MLServer lives in its own venv, ``.venv-mlserver`` (``scripts/install-mlserver``; ``scripts/test`` runs it),
because it pins its own fastapi/starlette/uvicorn. It serves a model through the custom runtime in
``tests/peers/mlserver_runtime.py`` (ONNX Runtime, CPU), copied into the server's own folder. Each server
is private: its own temporary model repository and settings, HTTP and gRPC on free loopback ports (gRPC
cannot be switched off in MLServer 1.7), no metrics server, inference in the server process
(``parallel_workers: 0``, one process fewer on a 2-core machine).

Facts this relies on (MLServer 1.7.1): ``mlserver start DIR`` reads ``DIR/settings.json`` and every
``model-settings.json`` below DIR; it answers ``GET /v2/health/ready`` with 200 once its servers are up and
its models loaded; it speaks JSON tensors only over HTTP (no binary tensor extension, SeldonIO/MLServer#324);
SIGTERM stops it cleanly in about a second.

    onnx = models / "cxr-pneumothorax" / "model.onnx"
    with MLServer.start(tmp_path / "mls", {"cxr-pneumothorax": onnx}) as server:
        httpx.post(f"{server.base_url}/v2/models/cxr-pneumothorax/infer", json=...)

or the ``mlserver_factory`` fixture (import it into the test module).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx
import pytest

from tests.peers import free_port, log_tail

__all__ = ["MLSERVER_BIN", "MLServer", "MLServerFactory", "mlserver_factory", "require_mlserver"]

REPO = Path(__file__).resolve().parents[2]
MLSERVER_BIN = REPO / ".venv-mlserver" / "bin" / "mlserver"
RUNTIME_FILE = Path(__file__).with_name("mlserver_runtime.py")
RUNTIME = "mlserver_runtime.OnnxRuntimeModel"
START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 10.0


def require_mlserver() -> None:
    """Fail (not skip) where the venv is missing: scripts/test installs it, so a skip would hide a gap."""
    if not MLSERVER_BIN.exists():
        pytest.fail(f"{MLSERVER_BIN} not installed: run scripts/install-mlserver (scripts/test does)")


class MLServer:
    """One running MLServer; stop it with ``stop()`` or by leaving the ``with`` block (idempotent)."""

    def __init__(
        self, *, root: Path, http_port: int, models: list[str], proc: subprocess.Popen[bytes]
    ) -> None:
        self.root = root
        self.http_port = http_port
        self.models = models
        self.log_path = root / "mlserver.log"
        self.proc = proc

    @property
    def base_url(self) -> str:
        """What ``inference.remote_models`` takes: the server's root, without ``/v2``."""
        return f"http://127.0.0.1:{self.http_port}"

    @classmethod
    def start(cls, tmp_dir: Path | str, models: Mapping[str, Path]) -> MLServer:
        """Write a private model repository under ``tmp_dir`` serving ``models`` (name → .onnx) and start it.

        Waits until the server and every model report ready. Ports are picked free; if a pick loses a race
        with another process, start retries with new ones.
        """
        require_mlserver()
        root = Path(tmp_dir)
        root.mkdir(parents=True, exist_ok=True)
        # The runtime goes on the server's PYTHONPATH alone: tests/peers itself holds this module, whose name
        # would shadow the mlserver package.
        (root / "runtime").mkdir(exist_ok=True)
        shutil.copyfile(RUNTIME_FILE, root / "runtime" / RUNTIME_FILE.name)
        for name, onnx_path in models.items():
            folder = root / "models" / name
            folder.mkdir(parents=True, exist_ok=True)
            settings = {
                "name": name,
                "implementation": RUNTIME,
                "parameters": {"uri": str(Path(onnx_path).resolve())},
            }
            (folder / "model-settings.json").write_text(json.dumps(settings, indent=2))
        for attempt in range(3):
            server = cls._spawn(root, list(models))
            try:
                server._wait_ready()
                return server
            except _ExitedEarly:
                server.stop()
                if attempt == 2:
                    raise RuntimeError(f"MLServer exited at start-up:\n{log_tail(server.log_path)}") from None
            except BaseException:
                server.stop()
                raise
        raise AssertionError("unreachable")

    @classmethod
    def _spawn(cls, root: Path, models: list[str]) -> MLServer:
        http_port, grpc_port = free_port(), free_port()
        while grpc_port == http_port:
            grpc_port = free_port()
        server_settings: dict[str, Any] = {
            "debug": False,
            "host": "127.0.0.1",
            "http_port": http_port,
            "grpc_port": grpc_port,
            "metrics_endpoint": None,  # no metrics server (and no third port)
            "parallel_workers": 0,  # infer in the server process: no worker pool on a 2-core machine
            "model_repository_root": str(root / "models"),
            "load_models_at_startup": True,
        }
        (root / "settings.json").write_text(json.dumps(server_settings, indent=2))
        # Only our runtime on the path; no MLSERVER_* from the caller's environment changes the settings.
        env = {k: v for k, v in os.environ.items() if not k.startswith("MLSERVER")}
        env["PYTHONPATH"] = str(root / "runtime")
        log = (root / "mlserver.log").open("ab")
        try:
            # Same process group as pytest on purpose: a Ctrl-C on the test run reaches the server too.
            proc = subprocess.Popen(
                [str(MLSERVER_BIN), "start", str(root)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=root,
                env=env,
            )
        finally:
            log.close()
        return cls(root=root, http_port=http_port, models=models, proc=proc)

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        paths = ["/v2/health/ready", *(f"/v2/models/{name}/ready" for name in self.models)]
        with httpx.Client(base_url=self.base_url, timeout=1.0) as client:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    if "address already in use" in log_tail(self.log_path).lower():
                        raise _ExitedEarly
                    raise RuntimeError(f"MLServer exited at start-up:\n{log_tail(self.log_path)}")
                with contextlib.suppress(httpx.TransportError):
                    if all(client.get(path).status_code == 200 for path in paths):
                        return
                time.sleep(0.1)
        waited = ", ".join(paths)
        raise RuntimeError(
            f"MLServer not ready ({waited}) within {START_TIMEOUT_S:.0f} s:\n{log_tail(self.log_path)}"
        )

    def stop(self) -> None:
        """SIGTERM (MLServer unloads its models and exits), then SIGKILL; reap. Idempotent."""
        if self.proc.poll() is None:
            for signal_it in (self.proc.terminate, self.proc.kill):
                signal_it()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.proc.wait(timeout=STOP_TIMEOUT_S / 2)
                    break
        self.proc.wait()

    def __enter__(self) -> MLServer:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


class _ExitedEarly(Exception):
    """MLServer exited before answering because a port was taken between picking and binding it."""


class MLServerFactory:
    """Starts MLServers in numbered sub-directories of one temporary directory; stops them all at the end."""

    def __init__(self, tmp_dir: Path) -> None:
        self.tmp_dir = tmp_dir
        self.servers: list[MLServer] = []

    def __call__(self, models: Mapping[str, Path]) -> MLServer:
        server = MLServer.start(self.tmp_dir / f"mlserver{len(self.servers)}", models)
        self.servers.append(server)
        return server

    def stop_all(self) -> None:
        for server in reversed(self.servers):
            server.stop()


@pytest.fixture
def mlserver_factory(tmp_path: Path) -> Iterator[MLServerFactory]:
    """``mlserver_factory({"name": onnx_path})`` -> a running MLServer, stopped and reaped at teardown.

    Import it into a test module: ``from tests.peers.mlserver import mlserver_factory``.
    """
    factory = MLServerFactory(tmp_path)
    try:
        yield factory
    finally:
        factory.stop_all()
