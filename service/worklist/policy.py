"""The priority policy: what a result does to its study's place on the worklist.

Rules, as commercial triage devices apply them:

- a study's priority is the most urgent priority any of its results asked for, and **never goes down**: a
  re-run that finds nothing (late images, a newer model) is recorded and shown, but a radiologist who saw a
  study jump up must not see it silently drop back;
- a routine study that has waited longer than ``max_wait_minutes`` is promoted to urgent (starvation guard).
  AI prioritisation alone cut mean pneumothorax report turnaround from 80 to 36 min in a published
  simulation but stretched the longest wait of other studies from 890 to 1,293 min until a cap was added;
- each positive finding asks for its label's urgency from the model card, or the site's override
  (``worklist.priorities``, keyed ``"model/label"``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta

from service.results.schema import Finding, Priority, PriorityName

__all__ = ["RANK_NAME", "Change", "apply_overrides", "effective_priority", "raise_only"]

RANK_NAME: dict[int, PriorityName] = {p.value: p.label for p in Priority}


def apply_overrides(findings: list[Finding], overrides: Mapping[str, str]) -> list[Finding]:
    """Findings with the site's urgency per ``model/label`` (``urgent`` recomputed from it)."""
    out = []
    for f in findings:
        urgency = overrides.get(f"{f.model}/{f.label}")
        if urgency is None or urgency == f.urgency:
            out.append(f)
            continue
        out.append(f.model_copy(update={"urgency": urgency, "urgent": f.positive and urgency != "routine"}))
    return out


@dataclass(frozen=True)
class Change:
    """What one result did to the study's worklist priority."""

    priority: int
    """The study's priority after the result (rank: 0 stat, 1 urgent, 2 routine)."""
    event: str
    """``flagged`` (first result), ``raised``, ``unchanged`` or ``rerun_lower`` (recorded, not applied)."""


def raise_only(current: int | None, result_priority: str) -> Change:
    """The study's new priority: the result's if more urgent than the current one, else unchanged."""
    rank = int(Priority.of(result_priority))
    if current is None:
        return Change(rank, "flagged")
    if rank < current:
        return Change(rank, "raised")
    if rank > current:
        return Change(current, "rerun_lower")
    return Change(current, "unchanged")


def effective_priority(
    ai_priority: int | None, waiting_since: datetime, now: datetime, max_wait_minutes: float
) -> tuple[int, bool]:
    """(rank shown on the worklist, promoted by the starvation guard?)."""
    rank = 2 if ai_priority is None else ai_priority
    if max_wait_minutes > 0 and rank == 2 and now - waiting_since > timedelta(minutes=max_wait_minutes):
        return 1, True
    return rank, False
