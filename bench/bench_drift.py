"""What the drift monitor costs per analysed series, next to what the hot path already does per image.

Side by side in one run (the machines are noisy, PEERS.md): for one chest radiograph routed to one model,
(a) the drift hook: :func:`service.inference.domain.summarise_series` on the parsed dataset and the
model input, then :meth:`service.lifecycle.drift.DriftMonitor.observe` with a full window (so the PSI is
recomputed every ``check_every`` series, as in service); (b) the input-domain gate's
:func:`service.inference.domain.input_statistics` on the same input, which every image already pays.
Printed: medians in microseconds and the ratio a / b. Goal: well under 1.

Usage::

    .venv/bin/python bench/bench_drift.py [--size 256] [--rounds 2000]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from service.config import DriftSettings  # noqa: E402
from service.inference.domain import summarise_series  # noqa: E402
from service.inference.domain_features import input_statistics  # noqa: E402
from service.inference.preprocess import PreprocessSpec  # noqa: E402
from service.lifecycle.drift import DriftMonitor  # noqa: E402
from tests.service.dicom_factory import make_dataset  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--size", type=int, default=256, help="model input height and width")
    parser.add_argument("--rounds", type=int, default=2000)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    ds = make_dataset(rows=512, columns=512)
    ds.Manufacturer, ds.PixelSpacing, ds.WindowCenter, ds.WindowWidth = "ACME", [0.2, 0.2], 2048, 4096
    model_input = rng.random((1, 1, args.size, args.size), dtype=np.float32)
    spec = PreprocessSpec(height=args.size, width=args.size)
    settings = DriftSettings()
    monitor = DriftMonitor(settings)
    for _ in range(settings.reference_series + settings.window_series):  # reference and window full
        monitor.observe([summarise_series("m", "1", ds, model_input, 0.0, 1.0, {"x": float(rng.random())})])
    hook, gate = [], []
    for _ in range(args.rounds):  # interleaved, so load changes hit both alike
        t0 = time.perf_counter()
        summary = summarise_series("m", "1", ds, model_input, 0.0, 1.0, {"x": float(rng.random())})
        monitor.observe([summary])
        t1 = time.perf_counter()
        input_statistics(model_input, spec)
        t2 = time.perf_counter()
        hook.append(t1 - t0)
        gate.append(t2 - t1)
    a, b = statistics.median(hook) * 1e6, statistics.median(gate) * 1e6
    mean_hook = statistics.fmean(hook) * 1e6
    print(f"input {args.size}x{args.size}, {args.rounds} rounds, PSI every {settings.check_every} series")
    print(f"drift hook per series: median {a:.1f} us, mean {mean_hook:.1f} us (PSI included)")
    print(f"domain gate input_statistics per image: median {b:.1f} us")
    mean_gate = statistics.fmean(gate) * 1e6
    print(f"ratio drift / domain statistics: median {a / b:.3f}, mean {mean_hook / mean_gate:.3f}")


if __name__ == "__main__":
    main()
