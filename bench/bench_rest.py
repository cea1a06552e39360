"""REST round trip vs decode + bare ``InferenceSession.run``, side by side in one run, printed as ratios.

Why this baseline: the least any service can do for one chest radiograph is read the DICOM bytes, run the
shared preprocessing and call ONNX Runtime once per chest model. Everything we add on top (HTTP, multipart,
validation, fsync + DB row before answering, job claim, result JSON) is the overhead this ratio shows.

1. Latency: one client, sequential. ``POST /v1/studies`` with ``Prefer: wait=30`` on a real uvicorn server
   (a new study each time) vs in-process decode + preprocess + ``session.run`` for every chest model.
   Goal <= 1.15x.
2. Throughput: 16 concurrent clients posting studies vs bare ORT at its best batch size over the same
   preprocessed images (the bare side gets decoding for free here, so the ratio is conservative).
   Goal >= 0.9x.

Usage::

    .venv/bin/python bench/bench_rest.py [--models models] [--rounds 30] [--clients 16] [--studies 96]
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
import onnxruntime as ort
import pydicom
from pydicom.uid import generate_uid

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from service.inference.preprocess import preprocess_dataset  # noqa: E402
from service.inference.registry import ModelRegistry  # noqa: E402
from training.data.synthetic import generate_cxr  # noqa: E402

CHEST_MODELS = ("cxr-pneumothorax", "cxr-nodule")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _renamed(raw: bytes) -> bytes:
    """The same image as a new study, so every POST is analysed (a duplicate SOP would not re-run)."""
    ds = pydicom.dcmread(io.BytesIO(raw))
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = (generate_uid() for _ in range(3))
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def _bare_once(raw: bytes, sessions: dict[str, tuple[ort.InferenceSession, object]]) -> None:
    ds = pydicom.dcmread(io.BytesIO(raw))
    for session, card in sessions.values():
        x = preprocess_dataset(ds, card.preprocessing).array  # type: ignore[attr-defined]
        session.run(None, {card.input.name: x})  # type: ignore[attr-defined]


def _start_server(models: Path, data: Path, port: int) -> subprocess.Popen[bytes]:
    env = dict(os.environ, PACS_TRIAGE_MODELS_DIR=str(models), PACS_TRIAGE_DATA_DIR=str(data))
    env["PACS_TRIAGE_LOG_LEVEL"] = "WARNING"
    env["PACS_TRIAGE_DICOM__ENABLED"] = "false"
    env["PACS_TRIAGE_AUTH__OPEN"] = "true"
    cmd = [sys.executable, "-m", "service", "serve", "--host", "127.0.0.1", "--port", str(port)]
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz/ready", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise SystemExit("service did not become ready in 120 s")


async def _post(client: httpx.AsyncClient, body: bytes) -> float:
    t0 = time.perf_counter()
    r = await client.post(
        "/v1/studies", content=body, headers={"Content-Type": "application/dicom", "Prefer": "wait=30"}
    )
    if r.status_code != 200:
        raise SystemExit(f"POST answered {r.status_code}: {r.text[:300]}")
    return time.perf_counter() - t0


async def _rest(port: int, bodies: list[bytes], rounds: int, clients: int) -> tuple[list[float], float]:
    """Sequential latencies of the first ``rounds`` bodies, then the rest with ``clients`` in flight."""
    half = rounds
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:
        for body in bodies[:3]:  # warm the path (first job, first DB writes)
            await _post(client, _renamed(body))
        latencies = [await _post(client, b) for b in bodies[:half]]
        queue = list(bodies[half:])
        t0 = time.perf_counter()

        async def worker() -> None:
            while queue:
                await _post(client, queue.pop())

        await asyncio.gather(*(worker() for _ in range(clients)))
        return latencies, (len(bodies) - half) / (time.perf_counter() - t0)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", type=Path, default=ROOT / "models")
    parser.add_argument("--rounds", type=int, default=30, help="sequential requests for the latency ratio")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--studies", type=int, default=96, help="requests for the throughput ratio")
    args = parser.parse_args()

    registry = ModelRegistry.from_directory(args.models)
    missing = [m for m in CHEST_MODELS if m not in registry.models]
    if missing:
        raise SystemExit(f"models not loadable from {args.models}: {missing} {registry.errors}")
    options = ort.SessionOptions()
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    sessions = {
        name: (
            ort.InferenceSession(
                str(registry.models[name].onnx_path), options, providers=["CPUExecutionProvider"]
            ),
            registry.models[name].card,
        )
        for name in CHEST_MODELS
    }

    with tempfile.TemporaryDirectory() as tmp:
        labels = generate_cxr(Path(tmp) / "cxr", n_patients=1, seed=7)
        raw = next(p for p in (labels.parent).rglob("*.dcm")).read_bytes()
        bodies = [_renamed(raw) for _ in range(args.rounds + args.studies)]

        # Bare baseline: decode + preprocess + run, sequential, medians.
        for _ in range(5):
            _bare_once(raw, sessions)
        bare = []
        for _ in range(args.rounds):
            t0 = time.perf_counter()
            _bare_once(raw, sessions)
            bare.append(time.perf_counter() - t0)

        # Bare throughput at its best batch size (preprocessed inputs, no decode: conservative).
        ds = pydicom.dcmread(io.BytesIO(raw))
        best = 0.0
        best_batch = 1
        for batch in (1, 2, 4, 8, 16):
            inputs = {
                name: np.repeat(preprocess_dataset(ds, card.preprocessing).array, batch, 0)  # type: ignore[attr-defined]
                for name, (_, card) in sessions.items()
            }
            t0 = time.perf_counter()
            n_images = 0
            while time.perf_counter() - t0 < 2.0:
                for name, (session, card) in sessions.items():
                    session.run(None, {card.input.name: inputs[name]})  # type: ignore[attr-defined]
                n_images += batch
            rate = n_images / (time.perf_counter() - t0)
            if rate > best:
                best, best_batch = rate, batch

        port = _free_port()
        server = _start_server(args.models, Path(tmp) / "var", port)
        try:
            latencies, rest_rate = asyncio.run(_rest(port, bodies, args.rounds, args.clients))
        finally:
            server.terminate()
            server.wait(timeout=30)

    bare_ms = statistics.median(bare) * 1000
    rest_ms = statistics.median(latencies) * 1000
    print(f"latency  bare decode+preprocess+ORT ({'+'.join(CHEST_MODELS)}): {bare_ms:.1f} ms (median)")
    print(f"latency  REST POST, Prefer: wait, real uvicorn:                 {rest_ms:.1f} ms (median)")
    print(f"latency  ratio REST / bare: {rest_ms / bare_ms:.2f}x   (goal <= 1.15x)")
    print(f"throughput bare ORT best batch {best_batch}: {best:.1f} studies/s")
    print(f"throughput REST, {args.clients} clients:       {rest_rate:.1f} studies/s")
    print(f"throughput ratio REST / bare: {rest_rate / best:.2f}x   (goal >= 0.9x)")


if __name__ == "__main__":
    main()
