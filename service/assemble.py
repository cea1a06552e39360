"""When is a study complete? The gate a job waits behind before the worker may claim it.

DICOM has no "end of study" message, so a study received over C-STORE is complete once no new instance
has arrived for ``assembly.quiet_seconds`` (the quiet timer of mercure's router): every instance pushes
the job's ``not_before`` forward. An HTTP POST is different: the request itself delimits what the client
sent, so the study is ready when the request ends, and ``Prefer: wait`` does not pay the quiet timer.

A sender that says how many instances a series will have (ImagesInAcquisition, filled by most CT and MR
scanners) does not wait for the timer: once every image series of the study is full, the study is complete
at once (:func:`study_gate`). One series without a known count keeps the timer for the whole study.

Late instances (after a result was written) open a new job; its result supersedes the earlier one
(:func:`service.store.jobs.schedule`).
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime, timedelta
from typing import Literal

from service.clock import utcnow
from service.config import Settings

__all__ = ["SeriesFill", "Source", "ready_after", "study_gate"]

Source = Literal["rest", "dicom"]

SeriesFill = tuple[int | None, int]
"""(expected instances or None when unknown, instances received) for one image series."""


def ready_after(settings: Settings, source: Source, now: datetime | None = None) -> datetime:
    """The earliest time the study may be analysed, given where its newest instance came from."""
    now = now or utcnow()
    if source == "rest":
        return now
    return now + timedelta(seconds=settings.assembly.quiet_seconds)


def study_gate(not_before: datetime, now: datetime, series: Iterable[SeriesFill]) -> datetime:
    """When the study's job may run: ``now`` if every image series is known to be full, else the timer."""
    fills = list(series)
    if fills and all(expected is not None and received >= expected for expected, received in fills):
        return min(now, not_before)
    return not_before
