"""InferenceEngine vs bare ``InferenceSession.run``, side by side in one process, printed as ratios.

Why side by side: the machines are noisy (PEERS.md), so absolute numbers from two runs do not compare;
ratios measured in one run do.

1. Single-image latency: one caller, sequential, engine ``run`` vs ``session.run`` (interleaved rounds,
   medians). Goal: the batcher costs almost nothing when nothing is concurrent.
2. Throughput: 16 concurrent clients (each sends one image, awaits, repeats) through the engine vs bare ORT
   at its best batch size (1..32 images per run, one thread). Goal >= 0.9x.

Usage::

    .venv/bin/python bench/bench_engine.py [MODELS_DIR] [--model NAME] [--tiny]

Without a usable model in MODELS_DIR (default ``models/``), or with ``--tiny``, a synthetic conv model
from ``tests/fixtures/tiny_models.py`` is written to a temporary folder and used instead.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from service.inference.engine import InferenceEngine  # noqa: E402
from service.inference.registry import LoadedModel, ModelRegistry  # noqa: E402
from service.metrics import Metrics  # noqa: E402


def _bare_session(model: LoadedModel, providers: list[str], threads: int, spin: bool) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(model.onnx_path), options, providers=providers)


def _images(model: LoadedModel, n: int, seed: int = 0) -> np.ndarray:
    spec = model.card.preprocessing
    return np.random.default_rng(seed).random((n, 1, spec.height, spec.width), dtype=np.float32)


async def _latency(
    engine: InferenceEngine, bare: ort.InferenceSession, model: LoadedModel, rounds: int
) -> tuple[float, float]:
    one = _images(model, 1)
    feed = {model.card.input.name: one}
    outputs = list(model.card.outputs)
    bare_ms: list[float] = []
    engine_ms: list[float] = []
    for _ in range(5):  # warm both paths
        bare.run(outputs, feed)
        await engine.run(model.name, one)
    for i in range(rounds):
        # alternate which goes first: ORT's idle threads spin for a while after a run and slow the next one
        for which in ("bare", "engine") if i % 2 == 0 else ("engine", "bare"):
            t0 = time.perf_counter()
            if which == "bare":
                bare.run(outputs, feed)
                bare_ms.append((time.perf_counter() - t0) * 1000)
            else:
                await engine.run(model.name, one)
                engine_ms.append((time.perf_counter() - t0) * 1000)
    return statistics.median(bare_ms), statistics.median(engine_ms)


def _bare_throughput(bare: ort.InferenceSession, model: LoadedModel, total: int) -> dict[int, float]:
    outputs = list(model.card.outputs)
    rates: dict[int, float] = {}
    for batch in (1, 2, 4, 8, 16, 32):
        images = _images(model, batch)
        feed = {model.card.input.name: images}
        bare.run(outputs, feed)
        runs = max(2, total // batch)
        t0 = time.perf_counter()
        for _ in range(runs):
            bare.run(outputs, feed)
        rates[batch] = runs * batch / (time.perf_counter() - t0)
    return rates


async def _engine_throughput(engine: InferenceEngine, model: LoadedModel, clients: int, total: int) -> float:
    one = _images(model, 1)
    per_client = max(1, total // clients)

    async def client() -> None:
        for _ in range(per_client):
            await engine.run(model.name, one)

    t0 = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    return clients * per_client / (time.perf_counter() - t0)


def _session_seconds(metrics: Metrics, model: str) -> float:
    value = metrics.registry.get_sample_value("pacs_triage_inference_seconds_sum", {"model": model})
    return value or 0.0


def _pick_model(registry: ModelRegistry, name: str | None) -> LoadedModel | None:
    if name is not None:
        return registry.get(name)
    for model in registry.models.values():
        if model.card.task == "classification":
            return model
    return next(iter(registry.models.values()), None)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models_dir", nargs="?", type=Path, default=Path("models"))
    parser.add_argument("--model", help="model name (default: the first classification model)")
    parser.add_argument("--tiny", action="store_true", help="use a synthetic conv model instead")
    parser.add_argument("--providers", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--threads", type=int, default=0, help="ORT intra-op threads (0: ORT decides)")
    parser.add_argument("--spin", action="store_true", help="let ORT threads spin (engine and bare alike)")
    parser.add_argument("--max-batch", type=int, default=8)
    parser.add_argument("--max-wait-ms", type=float, default=2.0)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--images", type=int, default=96, help="images per throughput measurement")
    parser.add_argument("--rounds", type=int, default=100, help="single-image latency rounds")
    parser.add_argument("--throughput-rounds", type=int, default=5, help="interleaved throughput rounds")
    args = parser.parse_args()

    registry = ModelRegistry.from_directory(args.models_dir) if not args.tiny else ModelRegistry()
    model = _pick_model(registry, args.model)
    tmp: tempfile.TemporaryDirectory[str] | None = None
    if model is None:
        from tests.fixtures.tiny_models import write_tiny_model

        tmp = tempfile.TemporaryDirectory()
        write_tiny_model(Path(tmp.name), "bench-tiny", "classification", 256, 256, extra_convs=4, channels=8)
        registry = ModelRegistry.from_directory(Path(tmp.name))
        model = registry.models["bench-tiny"]
        print(
            f"model: synthetic bench-tiny (4 convs x 8 channels, 256x256; none usable in {args.models_dir})"
        )
    else:
        print(f"model: {model.name} {model.card.version} from {model.onnx_path.parent}")
    registry.models = {model.name: model}

    metrics = Metrics()
    engine = InferenceEngine(
        registry,
        max_batch=args.max_batch,
        max_wait_ms=args.max_wait_ms,
        providers=args.providers,
        intra_op_threads=args.threads,
        intra_op_spinning=args.spin,
        metrics=metrics,
    )
    await engine.start()
    try:
        providers = engine.providers_for(model.name)
        bare = _bare_session(model, providers, args.threads, args.spin)
        print(
            f"providers: {providers}; ort {ort.__version__}; max_batch {args.max_batch}, "
            f"max_wait {args.max_wait_ms} ms; spinning {'on' if args.spin else 'off'}"
        )
        bare_ms, engine_ms = await _latency(engine, bare, model, args.rounds)
        print(
            f"single image  bare {bare_ms:8.3f} ms  engine {engine_ms:8.3f} ms  "
            f"ratio {engine_ms / bare_ms:.3f}x (goal close to 1.0)"
        )
        # Throughput rounds interleave bare and engine, and the ratio is taken per round (engine vs the bare
        # best of that same round), then the median: load from other processes drifts within seconds.
        bare_rounds: dict[int, list[float]] = {}
        engine_rounds: list[float] = []
        ratios: list[float] = []
        busy_rounds: list[float] = []
        for _ in range(args.throughput_rounds):
            round_rates = _bare_throughput(bare, model, args.images)
            for batch, rate in round_rates.items():
                bare_rounds.setdefault(batch, []).append(rate)
            busy_before = _session_seconds(metrics, model.name)
            t0 = time.perf_counter()
            engine_rate = await _engine_throughput(engine, model, args.clients, args.images)
            busy_rounds.append(
                (_session_seconds(metrics, model.name) - busy_before) / (time.perf_counter() - t0)
            )
            engine_rounds.append(engine_rate)
            ratios.append(engine_rate / max(round_rates.values()))
        rates = {batch: statistics.median(values) for batch, values in bare_rounds.items()}
        best = max(rates, key=lambda b: rates[b])
        print("bare ORT img/s by batch (median): " + ", ".join(f"{b}: {r:.1f}" for b, r in rates.items()))
        print(
            f"{args.clients} clients  engine {statistics.median(engine_rounds):8.1f} img/s (median)  "
            f"bare best {rates[best]:8.1f} img/s (batch {best})"
        )
        print(
            f"throughput ratio engine / bare best, per round: {', '.join(f'{r:.3f}' for r in ratios)}; "
            f"median {statistics.median(ratios):.3f}x (goal >= 0.9)"
        )
        if args.max_batch in rates:
            print(
                f"engine vs bare at batch {args.max_batch} (the engine's max_batch): "
                f"{statistics.median(engine_rounds) / rates[args.max_batch]:.3f}x "
                "(batching overhead alone; tune max_batch toward the bare best on this hardware)"
            )
        print(
            f"engine session busy {statistics.median(busy_rounds):.0%} of the engine phase "
            "(the rest is batching overhead or idle)"
        )
        stats = engine.batch_stats(model.name)
        mean_batch = stats.images / max(stats.runs, 1)
        sizes = dict(sorted(stats.sizes.items()))
        print(f"engine batches (all phases): {stats.runs} runs, mean {mean_batch:.2f} images, sizes {sizes}")
    finally:
        await engine.stop()
        if tmp is not None:
            tmp.cleanup()


if __name__ == "__main__":
    asyncio.run(main())
