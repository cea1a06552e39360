"""Radiologist feedback on findings, and per-model-version statistics drawn from results and feedback.

Why: once a model runs, a hospital needs to know whether it still works there. A reader says, per finding,
``agree``, ``disagree`` or ``unsure`` (with an optional note); that is an audit event of the study
(``feedback``: who, when, which result, model version, label, verdict), so it is kept with the flags and
acknowledgements it comments on and needs no table of its own. The note is free text a person typed: it is
stored like an acknowledgement's note and never logged.

:meth:`FeedbackStore.stats` summarises one model per version over the newest result of each study (the
``limit`` most recent results): studies analysed, studies flagged (flag rate), the positive predictive
value from feedback (agree / (agree + disagree) over positive findings that have a verdict; the latest
verdict on a finding counts), time to flag (first instance received to the worklist updated) of flagged
studies, and the score distribution per label in ten bins.
"""

from __future__ import annotations

import json
import statistics
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

from sqlalchemy import select
from sqlalchemy.orm import Session

from service.clock import utcnow
from service.errors import FindingNotInResultError
from service.results.schema import Finding, StudyResult
from service.store.database import Database
from service.store.db import AuditRow, ResultRow, StudyRow

__all__ = [
    "FEEDBACK_EVENT",
    "FeedbackItem",
    "FeedbackStore",
    "ModelVersionStats",
    "Verdict",
]

FEEDBACK_EVENT = "feedback"
"""The audit event a verdict is stored as."""

Verdict = Literal["agree", "disagree", "unsure"]

SCORE_BINS = 10
"""Score histogram bins over [0, 1]; the last bin includes 1."""


@dataclass(frozen=True)
class FeedbackItem:
    """One verdict on one finding of the study's newest result."""

    at: datetime
    study_uid: str
    result_id: str
    model: str
    model_version: str
    label: str
    verdict: Verdict
    actor: str
    positive: bool
    probability: float
    note: str | None = None


@dataclass
class ModelVersionStats:
    """One model version's numbers (see the module docstring)."""

    version: str
    studies_analysed: int = 0
    studies_flagged: int = 0
    feedback: dict[str, int] = field(default_factory=lambda: {"agree": 0, "disagree": 0, "unsure": 0})
    positive_agree: int = 0
    positive_disagree: int = 0
    time_to_flag_seconds: list[float] = field(default_factory=list)
    scores: dict[str, list[int]] = field(default_factory=dict)

    @property
    def flag_rate(self) -> float | None:
        return self.studies_flagged / self.studies_analysed if self.studies_analysed else None

    @property
    def ppv(self) -> float | None:
        judged = self.positive_agree + self.positive_disagree
        return self.positive_agree / judged if judged else None

    def as_dict(self) -> dict[str, Any]:
        ttf = sorted(self.time_to_flag_seconds)
        return {
            "version": self.version,
            "studies_analysed": self.studies_analysed,
            "studies_flagged": self.studies_flagged,
            "flag_rate": self.flag_rate,
            "feedback": dict(self.feedback),
            "ppv": self.ppv,
            "ppv_n": self.positive_agree + self.positive_disagree,
            "time_to_flag_seconds": {
                "n": len(ttf),
                "median": statistics.median(ttf) if ttf else None,
                "p90": ttf[min(len(ttf) - 1, int(0.9 * len(ttf)))] if ttf else None,
            },
            "score_histogram": {
                "bins": [round(i / SCORE_BINS, 2) for i in range(SCORE_BINS + 1)],
                "counts": dict(self.scores),
            },
        }


class FeedbackStore:
    """Verdicts (as audit events) and per-model statistics; takes a :class:`Database` like every store."""

    def __init__(self, db: Database) -> None:
        self.db = db

    async def record(
        self, study_uid: str, actor: str, model: str, label: str, verdict: Verdict, note: str | None
    ) -> FeedbackItem | None:
        """Store ``actor``'s verdict on the finding; None if the study is unknown.

        Raises :class:`FindingNotInResultError` when the newest result has no such finding.
        """
        return await self.db.run(self._record, study_uid, actor, model, label, verdict, note)

    @staticmethod
    def _record(
        s: Session, study_uid: str, actor: str, model: str, label: str, verdict: Verdict, note: str | None
    ) -> FeedbackItem | None:
        if s.get(StudyRow, study_uid) is None:
            return None
        row = s.scalars(
            select(ResultRow)
            .where(ResultRow.study_uid == study_uid)
            .order_by(ResultRow.created_at.desc(), ResultRow.job_id.desc())
            .limit(1)
        ).first()
        if row is None:
            raise FindingNotInResultError("the study has no result yet")
        result = StudyResult.model_validate_json(row.body)
        finding = next((f for f in result.findings if (f.model, f.label) == (model, label)), None)
        if finding is None:
            raise FindingNotInResultError(
                f"the study's result {result.result_id} has no finding {model}/{label}"
            )
        item = FeedbackItem(
            at=utcnow(),
            study_uid=study_uid,
            result_id=result.result_id,
            model=model,
            model_version=finding.model_version,
            label=label,
            verdict=verdict,
            actor=actor,
            positive=finding.positive,
            probability=finding.probability,
            note=note,
        )
        detail = {
            "result_id": item.result_id,
            "model": model,
            "model_version": item.model_version,
            "label": label,
            "verdict": verdict,
            "positive": item.positive,
            "probability": item.probability,
        }
        if note:
            detail["note"] = note
        s.add(
            AuditRow(
                at=item.at,
                study_uid=study_uid,
                event=FEEDBACK_EVENT,
                actor=actor,
                detail=json.dumps(detail, sort_keys=True),
            )
        )
        return item

    async def stats(self, model: str, limit: int = 10_000) -> list[ModelVersionStats]:
        """Per version of ``model``, newest version first (by the newest result it appears in)."""
        return await self.db.read(self._stats, model, limit)

    @staticmethod
    def _stats(s: Session, model: str, limit: int) -> list[ModelVersionStats]:
        rows = s.execute(
            select(ResultRow.study_uid, ResultRow.body)
            .order_by(ResultRow.created_at.desc(), ResultRow.job_id.desc())
            .limit(limit)
        )
        by_version: dict[str, ModelVersionStats] = {}
        seen: set[str] = set()
        for study_uid, body in rows:
            if study_uid in seen:
                continue  # an older, superseded result of a study already counted
            seen.add(study_uid)
            result = StudyResult.model_validate_json(body)
            findings = [f for f in result.findings if f.model == model]
            if findings:
                _count_result(by_version, result, findings)
        verdicts = _latest_verdicts(s, model, seen)
        for (_, _label, version), (verdict, positive) in verdicts.items():
            stats = by_version.setdefault(version, ModelVersionStats(version))
            stats.feedback[verdict] += 1
            if positive and verdict == "agree":
                stats.positive_agree += 1
            elif positive and verdict == "disagree":
                stats.positive_disagree += 1
        return list(by_version.values())


def _count_result(
    by_version: dict[str, ModelVersionStats], result: StudyResult, findings: list[Finding]
) -> None:
    versions: dict[str, list[Finding]] = defaultdict(list)
    for f in findings:
        versions[f.model_version].append(f)
    times = result.timestamps
    for version, mine in versions.items():
        stats = by_version.setdefault(version, ModelVersionStats(version))
        stats.studies_analysed += 1
        for f in mine:
            bins = stats.scores.setdefault(f.label, [0] * SCORE_BINS)
            bins[min(SCORE_BINS - 1, int(f.probability * SCORE_BINS))] += 1
        if any(f.positive for f in mine):
            stats.studies_flagged += 1
            if times.worklist_updated and times.first_instance_received:
                stats.time_to_flag_seconds.append(
                    (times.worklist_updated - times.first_instance_received).total_seconds()
                )


def _latest_verdicts(
    s: Session, model: str, studies: set[str]
) -> dict[tuple[str, str, str], tuple[str, bool]]:
    """(study, label, version) → (latest verdict, finding positive), for the studies counted."""
    latest: dict[tuple[str, str, str], tuple[str, bool]] = {}
    rows = s.execute(
        select(AuditRow.study_uid, AuditRow.detail)
        .where(AuditRow.event == FEEDBACK_EVENT)
        .order_by(AuditRow.id)
    )
    for study_uid, detail in rows:
        if study_uid not in studies:
            continue
        d = json.loads(detail or "{}")
        if d.get("model") == model:
            latest[(study_uid, d["label"], d["model_version"])] = (d["verdict"], bool(d.get("positive")))
    return latest
