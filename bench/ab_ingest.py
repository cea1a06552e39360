"""Alternated A/B of the DICOM receive rate: two or more source trees (or settings), fresh services, in turn.

Why beside ``bench_ingest.py``: on a shared machine the rate drifts by a third within an hour (RESULTS.md,
session 20), so a change worth 10 % shows only when the variants run interleaved, each round in the other
order, and are compared by their medians. Each variant is ``name=TREE[,ENV=VALUE...]``: the tree's
``pacs-triage serve`` on a fresh data directory, with those environment variables (settings or a
prototype's switches), receiving the same CT series from ``K`` concurrent ``storescu`` associations.

Usage: ``PYTHONPATH=$PWD .venv/bin/python bench/ab_ingest.py --instances 800 --associations 1 --rounds 6
before=/path/to/old/tree after=.`` (``--presleep`` seconds between the service's readiness and the
first association, for variants that prepare something at start).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import ingest_rig  # noqa: E402  (the senders, the series, the service)
from send_cost import Cost, Meter, print_steal  # noqa: E402


def _variant(text: str) -> tuple[str, Path, dict[str, str]]:
    name, _, rest = text.partition("=")
    tree, *settings = rest.split(",")
    if not name or not tree:
        raise argparse.ArgumentTypeError(f"expected name=TREE[,ENV=VALUE...], got {text!r}")
    return name, Path(tree).resolve(), dict(kv.split("=", 1) for kv in settings)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--instances", type=int, default=800)
    parser.add_argument("--associations", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--presleep", type=float, default=1.0)
    parser.add_argument("variants", nargs="+", type=_variant)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="ab-ingest-"))
    try:
        paths = ingest_rig.ct_series(work / "series", args.instances)
        shares = ingest_rig.split(paths, args.associations)
        rates: dict[str, list[float]] = {name: [] for name, _, _ in args.variants}
        costs: dict[str, list[Cost]] = {name: [] for name, _, _ in args.variants}
        for rnd in range(args.rounds):
            order = args.variants if rnd % 2 == 0 else args.variants[::-1]
            for name, tree, settings in order:
                ingest_rig.settle()  # (and no run's files are removed before the end: see ingest_rig.kept)
                svc = ingest_rig.Service(work / f"{name}-{rnd}", quiet=5.0, tree=tree, **settings)
                try:
                    time.sleep(args.presleep)
                    with Meter(svc.proc.pid) as meter:
                        seconds = ingest_rig.storescu(svc.dicom, "PACS_TRIAGE", shares)
                finally:
                    svc.stop()
                rates[name].append(args.instances / max(seconds))
                costs[name].append(meter.cost)
        first = statistics.median(rates[args.variants[0][0]])
        print(f"{args.instances} CT instances, {args.associations} association(s), {args.rounds} rounds")
        for name, values in rates.items():
            median = statistics.median(values)
            runs = " ".join(f"{r:.0f}" for r in values)
            cpu = statistics.median(c.receiver_s for c in costs[name]) / args.instances * 1e6
            print(
                f"  {name:12s} {runs}  median {median:.0f}/s  {median / first:.2f}x"
                f"   CPU {cpu:.0f} us/instance (the service's processes, median)"
            )
        print_steal([cost.steal for each in costs.values() for cost in each])
    finally:
        shutil.rmtree(work, ignore_errors=True)
        os.sync()


if __name__ == "__main__":
    main()
