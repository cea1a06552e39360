"""What a worklist row shows of a stored result, read from its JSON without building the rest of it.

The worklist page (``GET /v1/worklist``, 200 rows by default, refreshed every few seconds by every open page)
parsed each row's whole :class:`service.results.schema.StudyResult`: about 23 µs a result, the largest cost
of a page. With 20 pages refreshing every 5 s on a worklist of ~3,600 open studies, 16 posting clients got
0.84x of their rate without them (bench/RESULTS.md, session 14; issue 13 asks 0.9x). These models name only
the fields a row shows; pydantic's JSON parser skips every other member without building it (~2.5x
quicker a result). They ignore unknown members on purpose: they read a subset of the full schema.
"""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, ConfigDict

from service.results.schema import PriorityName, ResultStatus

__all__ = ["FindingDigest", "ResultDigest", "SegmentDigest", "TimesDigest"]


class _Digest(BaseModel):
    model_config = ConfigDict(frozen=True, extra="ignore")


class SegmentDigest(_Digest):
    volume_ml: float
    max_axial_diameter_mm: float


class FindingDigest(_Digest):
    model: str
    label: str
    probability: float
    positive: bool
    urgency: PriorityName
    segments: list[SegmentDigest] = []


class TimesDigest(_Digest):
    first_instance_received: datetime | None = None
    worklist_updated: datetime | None = None


class ResultDigest(_Digest):
    """A stored result as the worklist shows it (``StudyResult.model_dump_json`` in, a subset out)."""

    result_id: str
    status: ResultStatus
    findings: list[FindingDigest] = []
    timestamps: TimesDigest = TimesDigest()
