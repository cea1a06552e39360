"""REST round trip vs the work itself (decode + preprocess + ONNX Runtime), side by side in one run.

Why this baseline: the least any service can do for one chest radiograph is read the DICOM bytes, run the
shared preprocessing and call ONNX Runtime once per chest model. Everything we add on top (HTTP, multipart,
validation, fsync + DB row before answering, job, result JSON, worklist, outbox) is the overhead shown.

For each image (the synthetic generator's chest radiograph, and a 1024x1024 12-bit CR):

1. Latency: one client, sequential. ``POST /v1/studies`` with ``Prefer: wait=30`` on a real uvicorn server
   (a new study each time) vs in-process decode + preprocess + ``session.run`` for every chest model, one
   after the other. Goal <= 1.3x (then <= 1.15x).
2. Throughput: 16 concurrent clients vs the same pipeline in-process at its best: decode + preprocess on
   every core, ORT at its best batch size, both overlapping. Goal >= 0.8x.
3. With ``--pollers N``: the 16-client throughput again while N clients refresh ``GET /v1/worklist`` as the
   web page does (``?status=open``, the default page of 200; every 5 s, their starts staggered over the
   interval, or back to back with ``--poll-interval 0``), against the same throughput without them on the
   same database; ``--preload K`` first posts K more studies (all open on the worklist, as a busy day leaves
   it). Use ``--studies`` large enough to span a few intervals. Goal >= 0.9x of without.
4. Per hop, from the results' own timestamps (medians over the sequential requests): what is left for HTTP,
   parsing and answering; inference start relative to the durable commit (negative: inference started
   before the files were durable, i.e. overlapped); inference; build + save of the result.

Several servers can be measured in the same run (``--server before=/work/main --server after=.``): each is
the tree's own code, started with its own ``PYTHONPATH``, against the same bodies and the same baseline.
``NAME=TREE@MODELS`` also gives that server its own models folder (e.g. the same models with a ``cam``
output, to see what the heat maps cost); the baseline always runs ``--models``.

Usage::

    .venv/bin/python bench/bench_rest.py [--models models] [--rounds 30] [--clients 16] [--studies 96]
        [--server NAME=TREE ...] [--images generator cr1024]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path

import httpx
import numpy as np
import onnxruntime as ort
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ComputedRadiographyImageStorage, ExplicitVRLittleEndian, generate_uid

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from service.inference.preprocess import preprocess_dataset  # noqa: E402
from service.inference.registry import ModelRegistry  # noqa: E402
from training.data.synthetic import generate_cxr  # noqa: E402

CHEST_MODELS = ("cxr-pneumothorax", "cxr-nodule")
Sessions = dict[str, tuple[ort.InferenceSession, object]]


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


def cr_1024(seed: int = 3) -> bytes:
    """A 1024x1024 12-bit CR chest-like image (smooth anatomy-ish field plus noise), as a Part 10 file."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[-1:1:1024j, -1:1:1024j]
    lungs = np.exp(-(((np.abs(x) - 0.45) / 0.3) ** 2 + (y / 0.6) ** 2))
    field = 3000 - 1800 * lungs + 200 * np.sin(8 * y) + rng.normal(0, 60, (1024, 1024))
    pixels = np.clip(field, 0, 4095).astype(np.uint16)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ComputedRadiographyImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = ComputedRadiographyImageStorage, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.PatientName, ds.PatientID, ds.Modality, ds.BodyPartExamined = "BENCH^CR", "BENCH", "CR", "CHEST"
    ds.ViewPosition, ds.StudyDescription = "PA", "CHEST PA"
    ds.Rows = ds.Columns = 1024
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.WindowCenter, ds.WindowWidth = 2048, 4096
    ds.PixelData = pixels.tobytes()
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def _bare_once(raw: bytes, sessions: Sessions) -> None:
    ds = pydicom.dcmread(io.BytesIO(raw))
    for session, card in sessions.values():
        x = preprocess_dataset(ds, card.preprocessing).array  # type: ignore[attr-defined]
        session.run(None, {card.input.name: x})  # type: ignore[attr-defined]


def _prepared(raw: bytes, sessions: Sessions) -> dict[str, np.ndarray]:
    ds = pydicom.dcmread(io.BytesIO(raw))
    return {n: preprocess_dataset(ds, c.preprocessing).array for n, (_, c) in sessions.items()}  # type: ignore[attr-defined]


def _best_batch(raw: bytes, sessions: Sessions) -> int:
    """The batch size at which bare ORT runs the chest models fastest (preprocessed inputs)."""
    inputs = _prepared(raw, sessions)
    best, best_batch = 0.0, 1
    for batch in (1, 2, 4, 8, 16):
        t0, n = time.perf_counter(), 0
        while time.perf_counter() - t0 < 1.0:
            for name, (session, card) in sessions.items():
                session.run(None, {card.input.name: np.repeat(inputs[name], batch, 0)})  # type: ignore[attr-defined]
            n += batch
        rate = n / (time.perf_counter() - t0)
        if rate > best:
            best, best_batch = rate, batch
    return best_batch


def _in_process_rate(bodies: list[bytes], sessions: Sessions, batch: int) -> float:
    """Studies/s in-process: decode + preprocess on every core, ORT at ``batch``, the two overlapped."""
    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        prepared = pool.map(_prepared, bodies, [sessions] * len(bodies))
        pending: list[dict[str, np.ndarray]] = []
        for item in prepared:
            pending.append(item)
            if len(pending) == batch:
                _run_batch(pending, sessions)
                pending = []
        if pending:
            _run_batch(pending, sessions)
    return len(bodies) / (time.perf_counter() - t0)


def _run_batch(items: list[dict[str, np.ndarray]], sessions: Sessions) -> None:
    for name, (session, card) in sessions.items():
        session.run(None, {card.input.name: np.concatenate([i[name] for i in items])})  # type: ignore[attr-defined]


def _usage(pid: int) -> tuple[float, float, int]:
    """(user s, system s, minor page faults) of a process, all threads (``/proc/PID/stat`` fields 14, 15
    and 10). Page faults are the steadiest of the three on a shared machine: they count work, not time."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick, int(fields[7])


def _start_server(tree: Path, models: Path, data: Path, port: int, providers: str) -> subprocess.Popen[bytes]:
    env = dict(os.environ, PACS_TRIAGE_MODELS_DIR=str(models), PACS_TRIAGE_DATA_DIR=str(data))
    env["PACS_TRIAGE_INFERENCE__PROVIDERS"] = providers
    # the tree first; packages installed with ``pip --target`` (bench/gpu_check.sh --wheels) stay reachable
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(tree), os.environ.get("PYTHONPATH", "")) if p)
    env["PACS_TRIAGE_LOG_LEVEL"] = "WARNING"
    env["PACS_TRIAGE_DICOM__ENABLED"] = "false"
    env["PACS_TRIAGE_AUTH__OPEN"] = "true"
    cmd = [sys.executable, "-m", "service", "serve", "--host", "127.0.0.1", "--port", str(port)]
    proc = subprocess.Popen(cmd, env=env, cwd=tree)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz/ready", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise SystemExit(f"service from {tree} did not become ready in 120 s")


async def _post(client: httpx.AsyncClient, body: bytes) -> tuple[float, dict[str, object]]:
    t0 = time.perf_counter()
    r = await client.post(
        "/v1/studies", content=body, headers={"Content-Type": "application/dicom", "Prefer": "wait=30"}
    )
    if r.status_code != 200:
        raise SystemExit(f"POST answered {r.status_code}: {r.text[:300]}")
    return time.perf_counter() - t0, r.json()


def _hops(total: float, result: dict[str, object]) -> dict[str, float]:
    """Milliseconds per hop from the result's timestamps (see the module docstring)."""
    stamps = result["timestamps"]
    assert isinstance(stamps, dict)
    ts = {k: datetime.fromisoformat(v) for k, v in stamps.items() if v}
    first, started = ts["first_instance_received"], ts["inference_started"]
    done, stored = ts["inference_done"], ts["result_stored"]
    inside = (max(stored, done) - min(first, started)).total_seconds()
    return {
        "http+parse+answer": (total - inside) * 1000,
        "inference start - durable commit": (started - first).total_seconds() * 1000,
        "inference": (done - started).total_seconds() * 1000,
        "build + save": (stored - done).total_seconds() * 1000,
    }


async def _rest(
    port: int, pid: int, bodies: list[bytes], rounds: int, clients: int
) -> tuple[list[float], float, dict[str, float], tuple[float, ...]]:
    """Sequential latencies of the first ``rounds`` bodies, then the rest with ``clients`` in flight;
    also the server's (user s, system s, minor faults) per study during the concurrent part (load on the
    machine from other processes does not change them much, unlike wall time)."""
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:
        for body in bodies[:3]:  # warm the path (first job, first DB writes)
            await _post(client, _renamed(body))
        latencies, hops = [], []
        for body in bodies[:rounds]:
            total, result = await _post(client, body)
            latencies.append(total)
            hops.append(_hops(total, result))
        usage0 = _usage(pid)
        rate = await _drain(client, bodies[rounds:], clients)
        n = len(bodies) - rounds
        cpu = tuple((after - before) / n for after, before in zip(_usage(pid), usage0, strict=True))
    per_hop = {k: statistics.median(h[k] for h in hops) for k in hops[0]}
    return latencies, rate, per_hop, cpu


async def _drain(client: httpx.AsyncClient, bodies: list[bytes], clients: int) -> float:
    """Post every body, ``clients`` requests in flight; studies/s."""
    queue = list(bodies)
    t0 = time.perf_counter()

    async def worker() -> None:
        while queue:
            await _post(client, queue.pop())

    await asyncio.gather(*(worker() for _ in range(clients)))
    return len(bodies) / (time.perf_counter() - t0)


async def _post_all(port: int, bodies: list[bytes], clients: int) -> float:
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:
        return await _drain(client, bodies, clients)


async def _with_pollers(port: int, bodies: list[bytes], clients: int, pollers: int, interval: float) -> float:
    """Studies/s with ``clients`` posting while ``pollers`` clients refresh ``GET /v1/worklist`` every
    ``interval`` seconds (0: back to back), as a ward of worklist pages does."""
    stop = asyncio.Event()
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:

        async def poller(i: int) -> None:
            # staggered over the interval, as pages opened at different moments are: all at once made
            # every measurement start with a burst of 20 pages that a ward never sends
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), interval * i / pollers)
            while not stop.is_set():
                r = await client.get("/v1/worklist", params={"status": "open"})  # as the page asks
                r.raise_for_status()
                if interval:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(stop.wait(), interval)

        polling = [asyncio.create_task(poller(i)) for i in range(pollers)]
        rate = await _drain(client, bodies, clients)
        stop.set()
        await asyncio.gather(*polling)
    return rate


def _measure(name: str, raw: bytes, args: argparse.Namespace, sessions: Sessions, tmp: Path) -> None:
    bodies = [_renamed(raw) for _ in range(args.rounds + args.studies)]
    for _ in range(5):
        _bare_once(raw, sessions)
    bare = []
    for _ in range(args.rounds):
        t0 = time.perf_counter()
        _bare_once(raw, sessions)
        bare.append(time.perf_counter() - t0)
    batch = _best_batch(raw, sessions)
    cpu0 = time.process_time()
    in_process = _in_process_rate(bodies[: args.studies], sessions, batch)
    in_process_cpu = (time.process_time() - cpu0) / args.studies
    bare_ms = statistics.median(bare) * 1000
    print(f"\n== {name} ({len(raw) // 1024} KiB) ==")
    print(f"bare decode+preprocess+ORT ({'+'.join(CHEST_MODELS)}), sequential: {bare_ms:.1f} ms (median)")
    print(
        f"in-process pipeline (all cores, ORT batch {batch}): {in_process:.1f} studies/s, "
        f"{in_process_cpu * 1000:.1f} ms CPU per study"
    )
    for label, where in args.server:
        tree, _, models = where.partition("@")
        port = _free_port()
        data = tmp / f"var-{name}-{label}"
        served = Path(models or args.models).resolve()
        server = _start_server(Path(tree).resolve(), served, data, port, args.providers)
        try:
            latencies, rate, hops, cpu = asyncio.run(
                _rest(port, server.pid, bodies, args.rounds, args.clients)
            )
            if args.pollers:
                if args.preload:  # not timed: a worklist as full as a busy day leaves it
                    asyncio.run(_post_all(port, [_renamed(raw) for _ in range(args.preload)], args.clients))
                more = [_renamed(raw) for _ in range(args.studies)]
                alone = asyncio.run(_post_all(port, more, args.clients))
                more = [_renamed(raw) for _ in range(args.studies)]
                polled = asyncio.run(
                    _with_pollers(port, more, args.clients, args.pollers, args.poll_interval)
                )
        finally:
            server.terminate()
            server.wait(timeout=30)
        rest_ms = statistics.median(latencies) * 1000
        print(
            f"[{label}] sequential {rest_ms:.1f} ms = {rest_ms / bare_ms:.2f}x bare (goal <= 1.3x); "
            f"{args.clients} clients {rate:.1f} studies/s = {rate / in_process:.2f}x in-process "
            "(goal >= 0.8x)"
        )
        user, system, faults = cpu
        print(
            f"[{label}] CPU per study under {args.clients} clients: {(user + system) * 1000:.1f} ms "
            f"(system {system * 1000:.1f}) = {(user + system) / in_process_cpu:.2f}x in-process; "
            f"{faults:.0f} minor page faults per study"
        )
        print(f"[{label}] per hop (median ms): " + ", ".join(f"{k} {v:.1f}" for k, v in hops.items()))
        if args.pollers:
            held = args.rounds + 2 * args.studies + args.preload  # when the pollers start
            print(
                f"[{label}] on a worklist of ~{held} open studies: {alone:.1f} studies/s alone, with "
                f"{args.pollers} worklist pollers (every {args.poll_interval:g} s) {polled:.1f} studies/s = "
                f"{polled / alone:.2f}x (goal >= 0.9x)"
            )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", type=Path, default=ROOT / "models")
    parser.add_argument("--rounds", type=int, default=30, help="sequential requests for the latency ratio")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--studies", type=int, default=96, help="requests for the throughput ratio")
    parser.add_argument(
        "--images", nargs="+", default=["generator", "cr1024"], choices=["generator", "cr1024"]
    )
    parser.add_argument(
        "--providers", choices=["cpu", "cuda"], default="cpu", help="bare ORT and the servers"
    )
    parser.add_argument("--pollers", type=int, default=0, help="also measure with N worklist pollers")
    parser.add_argument("--poll-interval", type=float, default=5.0, help="seconds between a poller's GETs")
    parser.add_argument(
        "--preload", type=int, default=0, help="with --pollers: post this many studies first (full worklist)"
    )
    parser.add_argument(
        "--server",
        action="append",
        type=lambda s: tuple(s.split("=", 1)),
        help="NAME=TREE[@MODELS]: a source tree to serve, with its own models folder (repeatable); "
        "default: this tree",
    )
    args = parser.parse_args()
    args.server = args.server or [("this", str(ROOT))]

    registry = ModelRegistry.from_directory(args.models)
    missing = [m for m in CHEST_MODELS if m not in registry.models]
    if missing:
        raise SystemExit(f"models not loadable from {args.models}: {missing} {registry.errors}")
    providers = ["CPUExecutionProvider"]
    if args.providers == "cuda":
        providers.insert(0, "CUDAExecutionProvider")
    options = ort.SessionOptions()
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    sessions: Sessions = {
        name: (
            ort.InferenceSession(str(registry.models[name].onnx_path), options, providers=providers),
            registry.models[name].card,
        )
        for name in CHEST_MODELS
    }
    used = sorted({p for session, _ in sessions.values() for p in session.get_providers()})
    print(
        f"machine: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at start; bare ORT on {used}"
    )
    with tempfile.TemporaryDirectory() as tmp:
        for image in args.images:
            if image == "generator":
                labels = generate_cxr(Path(tmp) / "cxr", n_patients=1, seed=7)
                raw = next(labels.parent.rglob("*.dcm")).read_bytes()
            else:
                raw = cr_1024()
            _measure(image, raw, args, sessions, Path(tmp))


if __name__ == "__main__":
    main()
