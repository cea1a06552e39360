"""When is a study complete? The gate a job waits behind before the worker may claim it.

DICOM has no "end of study" message, so the gate is read from evidence, strongest first:

1. **Series counts.** A sender that says how many instances a series will have (ImagesInAcquisition, filled
   by most CT and MR scanners) makes the study complete at once when every image series is full.
2. **Association end.** A sender that releases its association (A-RELEASE, PS3.8 §7.2) has sent what it
   meant to; once no association of the study is open, a study of single-image modalities (CR, DX, MG, ...:
   each instance is a whole image) is complete at once (:func:`end_gate`).
3. **Holding.** While an association of the study is open, a series that has fewer instances than it
   declares is not complete, however long the pause (a loaded receiver falls behind its sender): the job
   waits, up to ``assembly.max_hold_seconds`` after the last instance.
4. **Quiet timer** (mercure's router): otherwise the study is complete once no new instance has arrived for
   ``assembly.quiet_seconds``; every instance pushes the job's ``not_before`` forward.

An HTTP POST is different: the request delimits what the client sent, so the study is ready when the request
ends and ``Prefer: wait`` does not pay the quiet timer.

Late instances (after a result was written) open a new job; its result supersedes the earlier one. A result
says how complete its study was (:func:`completeness`): complete by the counts, incomplete by the counts, or
presumed complete (no counts declared).
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime, timedelta
from typing import Literal

from service.config import AssemblySettings, Settings
from service.store.db import utcnow

__all__ = [
    "SINGLE_IMAGE_MODALITIES",
    "SeriesFill",
    "Source",
    "completeness",
    "end_gate",
    "ready_after",
    "study_gate",
]

Source = Literal["rest", "dicom"]

SeriesFill = tuple[int | None, int]
"""(expected instances or None when unknown, instances received) for one image series."""

SINGLE_IMAGE_MODALITIES = frozenset({"CR", "DX", "MG", "IO", "PX", "XC", "RG"})
"""Projection modalities (PS3.3 C.7.3.1.1.1) whose every instance is one whole view."""


def ready_after(settings: Settings, source: Source, now: datetime | None = None) -> datetime:
    """The earliest time the study may be analysed, given where its newest instance came from."""
    now = now or utcnow()
    if source == "rest":
        return now
    return now + timedelta(seconds=settings.assembly.quiet_seconds)


def _full(fills: list[SeriesFill]) -> bool:
    return bool(fills) and all(expected is not None and received >= expected for expected, received in fills)


def _short(fills: list[SeriesFill]) -> bool:
    """Some series declares more instances than it has."""
    return any(expected is not None and received < expected for expected, received in fills)


def study_gate(
    not_before: datetime,
    now: datetime,
    series: Iterable[SeriesFill],
    *,
    hold_until: datetime | None = None,
    complete_when_full: bool = True,
) -> datetime:
    """When the study's job may run, after an instance arrived.

    ``now`` if every image series is known to be full; ``hold_until`` (an association of the study is open)
    if some series still lacks instances it declared; the quiet timer ``not_before`` otherwise.
    """
    fills = list(series)
    if complete_when_full and _full(fills):
        return min(now, not_before)
    if hold_until is not None and _short(fills):
        return max(hold_until, not_before)
    return not_before


def end_gate(
    now: datetime,
    series: Iterable[SeriesFill],
    modalities: Iterable[str | None],
    *,
    quiet_until: datetime,
    released: bool,
    settings: AssemblySettings,
) -> datetime | None:
    """The gate once no association of the study is open, or None to keep the one it has.

    Full series: now. A released association of single-image modalities: now. A series still short of its
    count: the quiet timer (the sender may send the rest on another association; if not, the result is
    labelled incomplete). An aborted association proves nothing about completeness: the quiet timer.
    """
    fills = list(series)
    if settings.complete_when_full and _full(fills):
        return now
    kinds = set(modalities)
    if (
        released
        and settings.complete_on_association_end
        and kinds
        and kinds <= SINGLE_IMAGE_MODALITIES
        and not _short(fills)
    ):
        return now
    if _short(fills):
        return quiet_until
    return None


def completeness(fills: Iterable[SeriesFill]) -> tuple[bool | None, int, int | None]:
    """(complete?, instances received, instances declared) of a study's image series.

    ``True`` when every series declares its count and has it, ``False`` when one has fewer than it
    declares, ``None`` (presumed complete) when some series declares nothing.
    """
    fills = list(fills)
    received = sum(n for _, n in fills)
    if _short(fills):
        declared = sum(e if e is not None else n for e, n in fills)
        return False, received, declared
    if _full(fills):
        return True, received, sum(e for e, _ in fills if e is not None)
    return None, received, None
