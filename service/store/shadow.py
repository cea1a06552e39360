"""Shadow mode's comparison: a model version running silently beside the current one, measured against it.

A model whose card names ``shadow_of`` runs on every series its primary runs on; its findings are stored
in the result apart (``StudyResult.shadow_findings``) and reach no worklist, SR or notification
(:mod:`service.analyse`, :mod:`service.routing`). This module reads them back over the newest result of
each study (the most recent ``limit`` results) and pairs each shadow finding with the primary's finding of
the same series and label. It reports what a site needs before switching versions: how often the two
agree on positive/negative (and the 2 x 2 table), the flag rate of each over the same studies, and how
the scores relate (Pearson correlation, mean absolute difference).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from sqlalchemy import select
from sqlalchemy.orm import Session

from service.results.schema import Finding, StudyResult
from service.store.database import Database
from service.store.db import ResultRow

__all__ = ["ShadowComparison", "ShadowStore", "compare_pairs"]


@dataclass
class ShadowComparison:
    """The shadow model ``shadow`` against ``primary`` (see the module docstring)."""

    shadow: str
    primary: str | None
    studies: int = 0
    studies_flagged_shadow: int = 0
    studies_flagged_primary: int = 0
    pairs: list[tuple[Finding, Finding]] = field(default_factory=list)
    unpaired: int = 0

    def as_dict(self) -> dict[str, Any]:
        counts = {"both_positive": 0, "shadow_only": 0, "primary_only": 0, "both_negative": 0}
        for s, p in self.pairs:
            key = ("both_positive" if p.positive else "shadow_only") if s.positive else None
            key = key or ("primary_only" if p.positive else "both_negative")
            counts[key] += 1
        n = len(self.pairs)
        shadow_scores = np.array([s.probability for s, _ in self.pairs], dtype=np.float64)
        primary_scores = np.array([p.probability for _, p in self.pairs], dtype=np.float64)
        correlation = None
        if n >= 2 and shadow_scores.std() > 0 and primary_scores.std() > 0:
            correlation = float(np.corrcoef(shadow_scores, primary_scores)[0, 1])
        return {
            "shadow": self.shadow,
            "primary": self.primary,
            "shadow_versions": sorted({s.model_version for s, _ in self.pairs}),
            "studies": self.studies,
            "pairs": n,
            "unpaired_shadow_findings": self.unpaired,
            "agreement": (counts["both_positive"] + counts["both_negative"]) / n if n else None,
            "table": counts,
            "flag_rate_shadow": self.studies_flagged_shadow / self.studies if self.studies else None,
            "flag_rate_primary": self.studies_flagged_primary / self.studies if self.studies else None,
            "score_correlation": correlation,
            "mean_abs_score_difference": float(np.mean(np.abs(shadow_scores - primary_scores)))
            if n
            else None,
        }


def compare_pairs(result: StudyResult, shadow: str, primary: str | None, into: ShadowComparison) -> None:
    """Add one result's shadow findings of ``shadow`` (paired by series and label) to ``into``."""
    mine = [f for f in result.shadow_findings if f.model == shadow]
    if not mine:
        return
    theirs = [f for f in result.findings if primary is None or f.model == primary]
    into.studies += 1
    into.studies_flagged_shadow += any(f.positive for f in mine)
    into.studies_flagged_primary += any(f.positive for f in theirs)
    by_key = {(f.series_uid, f.label): f for f in theirs}
    for f in mine:
        match = by_key.get((f.series_uid, f.label))
        if match is None:
            into.unpaired += 1
        else:
            into.pairs.append((f, match))


class ShadowStore:
    """Reads stored results for the comparison; takes a :class:`Database` like every store."""

    def __init__(self, db: Database) -> None:
        self.db = db

    async def compare(self, shadow: str, primary: str | None, limit: int = 10_000) -> ShadowComparison:
        return await self.db.read(self._compare, shadow, primary, limit)

    @staticmethod
    def _compare(s: Session, shadow: str, primary: str | None, limit: int) -> ShadowComparison:
        comparison = ShadowComparison(shadow=shadow, primary=primary)
        rows = s.execute(
            select(ResultRow.study_uid, ResultRow.body)
            .order_by(ResultRow.created_at.desc(), ResultRow.job_id.desc())
            .limit(limit)
        )
        seen: set[str] = set()
        for study_uid, body in rows:
            if study_uid in seen:
                continue  # superseded: the newest result of the study counts
            seen.add(study_uid)
            compare_pairs(StudyResult.model_validate_json(body), shadow, primary, comparison)
        return comparison
