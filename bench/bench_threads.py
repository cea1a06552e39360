"""Where the service's CPU goes while it receives CT instances over DICOM: CPU per instance, thread by thread.

Why: "profile before you guess". A sampling profile (py-spy) says where Python spends its wall time, idle
waits and GIL waits included; this says how much CPU each thread of ``pacs-triage serve`` really used
(user + system time from ``/proc/PID/task/TID/stat``) between the first and the last C-STORE, divided by
the instances sent. Threads are named from a ``py-spy dump`` of the process (Python 3.11 does not give its
threads OS names), numbered pools folded into one line (``dicom-store_N``). It answered, for example, how
much of the receive path the placer's background writes cost (bench/RESULTS.md, 2026-12-04).

The trailing ``--settle`` seconds count too (what the listener does after the last answer: placement, row
commits, and, if the series completes, the analysis). Compare two trees by running it on each.

Usage::

    PYTHONPATH=$PWD .venv/bin/python bench/bench_threads.py [--instances 1000] [--associations 1]
        [--tree DIR] [--settle 2] [--env NAME=VALUE ...]
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ingest_rig import ROOT, Service, ct_series, split, storescu


def _cpu_ticks(pid: int) -> dict[str, int]:
    """user + system clock ticks of each thread of ``pid``, by thread id."""
    ticks = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            stat = Path(f"/proc/{pid}/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()
        except FileNotFoundError:  # the thread ended meanwhile
            continue
        ticks[tid] = int(stat[11]) + int(stat[12])
    return ticks


def _thread_names(pid: int) -> dict[str, str]:
    """Python thread names by thread id, from ``py-spy dump`` (empty if py-spy is not installed)."""
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    try:
        dump = subprocess.run([spy, "dump", "--pid", str(pid)], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return {}
    names = {}
    for line in dump.stdout.splitlines():
        if m := re.match(r'Thread (\S+) \(\S+\): "([^"]+)"', line):
            tid = m.group(1)
            names[str(int(tid, 16)) if tid.startswith("0x") else tid] = m.group(2)
    return names


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--instances", type=int, default=1000)
    parser.add_argument("--associations", type=int, default=1)
    parser.add_argument("--tree", type=Path, default=ROOT, help="the source tree to serve (default: this)")
    parser.add_argument("--settle", type=float, default=2.0, help="seconds counted after the last answer")
    parser.add_argument("--env", action="append", default=[], help="NAME=VALUE for the service (repeatable)")
    args = parser.parse_args()
    extra = dict(item.split("=", 1) for item in args.env)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        paths = ct_series(work / "ct", args.instances)
        service = Service(work, quiet=5.0, tree=args.tree.resolve(), **extra)
        try:
            time.sleep(1.0)  # start-up work (model warm-up) is not counted
            before = _cpu_ticks(service.proc.pid)
            started = time.monotonic()
            storescu(service.dicom, "PACS_TRIAGE", split(paths, args.associations))
            wall = time.monotonic() - started
            time.sleep(args.settle)
            after = _cpu_ticks(service.proc.pid)
            names = _thread_names(service.proc.pid)
        finally:
            service.stop()
    hz = os.sysconf("SC_CLK_TCK")
    used = {tid: (after[tid] - before.get(tid, 0)) / hz for tid in after}
    per_thread: dict[str, float] = collections.defaultdict(float)
    for tid, seconds in used.items():
        per_thread[re.sub(r"_\d+$", "_N", names.get(tid, "unnamed"))] += seconds
    n = args.instances
    total = sum(used.values())
    print(
        f"{n} CT instances, {args.associations} association(s): {n / wall:.0f} instances/s, "
        f"process CPU {1000 * total / n:.2f} ms per instance (wall {1000 * wall / n:.2f} ms per instance)"
    )
    for name, seconds in sorted(per_thread.items(), key=lambda kv: -kv[1])[:12]:
        print(f"  {1000 * seconds / n:6.2f} ms/instance  {name}")


if __name__ == "__main__":
    main()
