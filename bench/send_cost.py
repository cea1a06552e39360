"""What one measured send cost the machine: the receiver's CPU, the senders' CPU, how busy the cores were.

Why: a rate says how fast a receiver went on this machine, where the ``storescu`` senders share its two
cores; it does not say how much of the machine the receiver needed for it. A receiver that waits (for its
disk, its database lock) leaves cores idle; one that computes leaves none. Orthanc and ``pacs-triage``
differ in exactly that (bench/RESULTS.md, session 31), and CPU per instance is also the steadier figure:
it moves far less from round to round than the rate does.

Counted from ``/proc`` (proc(5)), in clock ticks:

- **the receiver**: ``utime + stime`` of its process and of every process under it (the service's listener
  processes: :mod:`service.ingest.processes`), plus ``cutime + cstime`` for children they reaped; the
  kernel's own threads (block I/O completions, ``kworker``) are not in it;
- **the senders**: the ``storescu`` runs this process started and reaped during the send
  (``getrusage(RUSAGE_CHILDREN)``); only they are reaped inside the measured window;
- **the machine**: busy cores (all but ``idle`` and ``iowait`` in ``/proc/stat``) and the hypervisor's
  ``steal`` share.
"""

from __future__ import annotations

import os
import resource
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

__all__ = ["Cost", "Meter", "machine_ticks", "print_steal"]

_HZ = os.sysconf("SC_CLK_TCK")
_CORES = os.cpu_count() or 1


@dataclass(frozen=True)
class Cost:
    """One send's cost; CPU in seconds."""

    receiver_s: float
    senders_s: float
    busy_cores: float
    steal: float
    """Share of the machine's time the hypervisor took (a send with much of it measured the host)."""


def machine_ticks() -> list[int]:
    """The machine's line of ``/proc/stat``: user nice system idle iowait irq softirq steal ..."""
    with open("/proc/stat") as f:
        return [int(x) for x in f.readline().split()[1:]]


def _stat(pid: int) -> list[str] | None:
    """The fields of ``/proc/<pid>/stat`` after the command name (which may hold spaces), or None if the
    process is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rindex(")") + 2 :].split()


def _children(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` (``/proc/<pid>/task/<tid>/children`` of each thread)."""
    out: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tasks:
        try:
            out += [int(c) for c in Path(f"/proc/{pid}/task/{tid}/children").read_text().split()]
        except OSError:
            continue
    return out


def tree_ticks(pid: int) -> int:
    """CPU ticks of ``pid`` and every process under it, with the children each of them reaped."""
    total, todo, seen = 0, [pid], set()
    while todo:
        p = todo.pop()
        if p in seen:
            continue
        seen.add(p)
        fields = _stat(p)
        if fields is None:
            continue
        total += sum(int(x) for x in fields[11:15])  # utime stime cutime cstime (proc(5), fields 14-17)
        todo += _children(p)
    return total


def _reaped_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


class Meter:
    """``with Meter(pid) as m: send()``; then ``m.cost`` (:class:`Cost`)."""

    cost: Cost

    def __init__(self, pid: int) -> None:
        self.pid = pid

    def __enter__(self) -> Meter:
        self._receiver = tree_ticks(self.pid)
        self._machine = machine_ticks()
        self._reaped = _reaped_s()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        spent = [b - a for a, b in zip(self._machine, machine_ticks(), strict=True)]
        total = max(1, sum(spent))
        self.cost = Cost(
            receiver_s=(tree_ticks(self.pid) - self._receiver) / _HZ,
            senders_s=_reaped_s() - self._reaped,
            busy_cores=_CORES * (1 - (spent[3] + spent[4]) / total),
            steal=spent[7] / total,
        )


def print_steal(steals: Sequence[float]) -> None:
    """The hypervisor's share of the measured sends (:attr:`Cost.steal` of each), where it was any."""
    if steals and max(steals) > 0.01:
        print(
            f"\nhypervisor steal during the measured sends: median {statistics.median(steals):.0%},"
            f" max {max(steals):.0%} (ratios from rounds with much steal are less sure)"
        )
