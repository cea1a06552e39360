"""What an idle service costs: CPU per second of ``pacs-triage serve`` with nothing to do, per server tree.

Why: a triage service sits idle most of the night, and whatever it polls it pays for all the time, on the
same cores the next study needs. Idle workers used to read the job queue themselves, each twice per
``worker.poll_seconds``: sixteen reads a second for the default four workers (service/worker.py, 2026-12-05).

Each server (the tree's own code, ``--server NAME=TREE``, as in ``bench_rest.py``) starts on a fresh data
directory with the shipped models, is left alone ``--settle`` seconds, then its CPU time (user + system,
from ``/proc/PID/stat``) is read over ``--seconds``; servers run one after the other, ``--rounds`` times,
interleaved. Printed: the median share of one core per server, and each server's ratio to the first.

Usage::

    .venv/bin/python bench/bench_idle.py --server before=/tmp/before --server after=. [--seconds 20]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from bench_rest import ROOT, _free_port, _start_server, _usage


def _idle_share(tree: Path, models: Path, data: Path, settle: float, seconds: float) -> float:
    """Share of one core the server used while idle."""
    proc = _start_server(tree, models, data, _free_port(), "cpu")
    try:
        time.sleep(settle)
        user0, system0, _ = _usage(proc.pid)
        time.sleep(seconds)
        user1, system1, _ = _usage(proc.pid)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    return (user1 - user0 + system1 - system0) / seconds


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--server", action="append", default=[], help="NAME=TREE (default: this=.)")
    parser.add_argument("--models", type=Path, default=ROOT / "models")
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--settle", type=float, default=5.0)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    servers = [s.split("=", 1) for s in args.server] or [["this", "."]]
    shares: dict[str, list[float]] = {name: [] for name, _ in servers}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for name, tree in servers:
                data = Path(tmp) / f"{name}-{r}"
                share = _idle_share(Path(tree).resolve(), args.models, data, args.settle, args.seconds)
                shares[name].append(share)
    first = statistics.median(shares[servers[0][0]])
    for name, values in shares.items():
        median = statistics.median(values)
        runs = ", ".join(f"{100 * v:.2f}" for v in values)
        ratio = f"{median / first:.2f}x {servers[0][0]}"
        print(f"[{name}] idle: {100 * median:.2f} % of a core (runs: {runs}); {ratio}")


if __name__ == "__main__":
    main()
