"""Per-site threshold calibration: the threshold that reaches a target sensitivity on the site's own
labelled studies, with its confidence intervals.

Why: a card's threshold was chosen on the developer's validation set; another site's scanners, processing
and case mix move the score distribution, and with it the sensitivity at that threshold. A site that has
labelled some of its own stored studies can pick its own operating point (``pacs-triage models calibrate``)
without touching the shipped card: the choice goes to the site-thresholds file
(:mod:`service.lifecycle.site_thresholds`), which the service applies at start.

How: each labelled study's score is the largest probability of the label over the study's series in its
newest stored result, from the model file now installed (same sha256; results of another file are not
counted). The threshold is the k-th highest score among the positives, k = ceil(target x positives): the
highest threshold whose sensitivity on these studies is at least the target. Intervals (95 % by default):

- sensitivity and specificity at that threshold: **Wilson score interval** (Wilson 1927; Brown, Cai &
  DasGupta, *Statistical Science* 2001, who recommend it over the Wald interval for small n);
- the threshold itself: **percentile bootstrap** (Efron & Tibshirani 1993, ch. 13) over the positive
  studies (the threshold depends on them alone; each replicate keeps their number), with a fixed seed, so
  the same labels give the same interval.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from statistics import NormalDist

import numpy as np
from sqlalchemy import select
from sqlalchemy.orm import Session

from service.errors import LabelsError
from service.results.schema import StudyResult
from service.store.db import ResultRow

__all__ = ["Calibration", "calibrate", "read_labels", "study_scores", "wilson"]

_TRUE = {"1", "true", "yes", "positive", "pos", "y"}
_FALSE = {"0", "false", "no", "negative", "neg", "n"}


def read_labels(path: Path, label: str) -> dict[str, bool]:
    """``study_uid`` → truth for ``label`` from a CSV with a header: ``study_uid`` (or
    ``StudyInstanceUID``) and ``positive`` (1/0, true/false, yes/no, positive/negative); rows with a
    ``label`` column naming another label are skipped. A study labelled both ways is refused."""
    try:
        with path.open(newline="", encoding="utf-8-sig") as fh:
            rows = list(csv.DictReader(fh))
            fields = {f.strip() for f in (rows[0].keys() if rows else [])}
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise LabelsError(f"{path}: cannot be read as CSV ({exc})") from exc
    uid_field = next((f for f in ("study_uid", "StudyInstanceUID") if f in fields), None)
    if uid_field is None or "positive" not in fields:
        raise LabelsError(f"{path}: needs a header with study_uid (or StudyInstanceUID) and positive columns")
    truth: dict[str, bool] = {}
    for line, row in enumerate(rows, start=2):
        if (row.get("label") or label).strip() != label:
            continue
        uid = (row.get(uid_field) or "").strip()
        value = (row.get("positive") or "").strip().lower()
        if not uid or value not in _TRUE | _FALSE:
            raise LabelsError(f"{path}, line {line}: needs a study UID and positive as 1/0, yes/no, ...")
        if truth.get(uid, value in _TRUE) != (value in _TRUE):
            raise LabelsError(f"{path}, line {line}: study {uid} is labelled both positive and negative")
        truth[uid] = value in _TRUE
    return truth


def study_scores(s: Session, model: str, sha256: str, label: str, studies: Iterable[str]) -> dict[str, float]:
    """Study UID → the label's largest probability in the study's newest result from this model file."""
    wanted = sorted(set(studies))
    scores: dict[str, float] = {}
    for start in range(0, len(wanted), 500):  # bound the IN list (SQLite allows 32,766 parameters)
        chunk = wanted[start : start + 500]
        rows = s.execute(
            select(ResultRow.study_uid, ResultRow.body)
            .where(ResultRow.study_uid.in_(chunk))
            .order_by(ResultRow.created_at.desc(), ResultRow.job_id.desc())
        )
        seen: set[str] = set()
        for study_uid, body in rows:
            if study_uid in seen:
                continue  # an older result of the study
            seen.add(study_uid)
            found = [
                f.probability
                for f in StudyResult.model_validate_json(body).findings
                if f.model == model and f.label == label and f.model_sha256 == sha256
            ]
            if found:
                scores[study_uid] = max(found)
    return scores


def wilson(successes: int, n: int, z: float) -> tuple[float, float]:
    """The Wilson score interval of a proportion (Wilson 1927)."""
    if n == 0:
        return (0.0, 1.0)
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return (max(0.0, centre - half), min(1.0, centre + half))


@dataclass(frozen=True)
class Calibration:
    """The chosen threshold and what it achieves on the site's studies."""

    threshold: float
    target_sensitivity: float
    positives: int
    negatives: int
    sensitivity: float
    sensitivity_ci: tuple[float, float]
    specificity: float | None
    specificity_ci: tuple[float, float] | None
    threshold_ci: tuple[float, float]
    confidence: float
    bootstrap_replicates: int


def _kth(scores: np.ndarray, k: int) -> np.ndarray:
    """The k-th highest value of each row."""
    return -np.sort(-scores, axis=-1)[..., k - 1]


def calibrate(
    positives: list[float],
    negatives: list[float],
    target: float,
    *,
    confidence: float = 0.95,
    replicates: int = 2000,
    seed: int = 0,
) -> Calibration:
    """The highest threshold with sensitivity >= ``target`` on ``positives``, with intervals."""
    if not positives:
        raise ValueError("no positive study: a sensitivity cannot be calibrated")
    pos = np.asarray(positives, dtype=np.float64)
    neg = np.asarray(negatives, dtype=np.float64)
    k = max(1, math.ceil(target * len(pos) - 1e-9))
    threshold = float(_kth(pos, k))
    z = NormalDist().inv_cdf((1 + confidence) / 2)
    tp = int((pos >= threshold).sum())
    tn = int((neg < threshold).sum())
    rng = np.random.default_rng(seed)
    boot = _kth(pos[rng.integers(0, len(pos), size=(replicates, len(pos)))], k)
    alpha = (1 - confidence) / 2
    low, high = np.quantile(boot, [alpha, 1 - alpha])
    return Calibration(
        threshold=threshold,
        target_sensitivity=target,
        positives=len(pos),
        negatives=len(neg),
        sensitivity=tp / len(pos),
        sensitivity_ci=wilson(tp, len(pos), z),
        specificity=tn / len(neg) if len(neg) else None,
        specificity_ci=wilson(tn, len(neg), z) if len(neg) else None,
        threshold_ci=(float(low), float(high)),
        confidence=confidence,
        bootstrap_replicates=replicates,
    )
