"""Card sections beyond the headline: subgroups, the operating point with its uncertainty, the aim band.

Why (issue 14, "Honest difficulty and evaluation"):

- **Subgroups**: one AUC over a mixed test set hides where a model fails. Results are split by view,
  modality, photometric interpretation and vendor processing (and for CT by reconstruction kernel), and
  lesion results by lesion size or type (positives of one kind against all negatives). Each rate carries a
  Wilson interval; an AUC is given only where both classes have at least :data:`MIN_PER_CLASS` members.
- **Operating point with its CI**: the threshold is chosen on validation; how stable that choice is shows in
  a patient-level bootstrap of the threshold rule on validation, next to the validation sensitivity and
  specificity at the chosen threshold with Wilson intervals.
- **Aim band**: the card states the band the generator's difficulty was tuned for and where the test result
  fell (``within``, ``below`` or ``above``), so a missed band is said on the card, not hidden.
- **Counts**: the number of positives per finding in validation and test, against the aim of 200 each.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Any

import numpy as np

from training.evaluate import binary_metrics, hit, roc_auc
from training.statistics import wilson_interval

__all__ = [
    "AIM_BANDS",
    "MIN_PER_CLASS",
    "MIN_POSITIVES",
    "aim_verdict",
    "lesion_subgroups",
    "operating_point",
    "subgroups",
]

MIN_PER_CLASS = 5
MIN_POSITIVES = 200
AIM_BANDS = {
    "cxr-pneumothorax": ("auc", (0.85, 0.95)),
    "cxr-nodule": ("froc sensitivity at 1 FP/image", (0.6, 0.8)),
    "ct-hemorrhage": ("series auc", (0.90, 0.97)),
}


def _rates(y: np.ndarray, s: np.ndarray, threshold: float) -> dict[str, Any]:
    m = binary_metrics(y, s, threshold)
    cm = m["confusion_matrix"]
    out: dict[str, Any] = {"n": m["n"], "n_positive": m["n_positive"]}
    if cm["tp"] + cm["fn"]:
        out["sensitivity"] = m["sensitivity"]
        out["sensitivity_ci95_wilson"] = wilson_interval(cm["tp"], cm["tp"] + cm["fn"])
    if cm["tn"] + cm["fp"]:
        out["specificity"] = m["specificity"]
        out["specificity_ci95_wilson"] = wilson_interval(cm["tn"], cm["tn"] + cm["fp"])
    n_pos, n_neg = int((y == 1).sum()), int((y == 0).sum())
    if n_pos >= MIN_PER_CLASS and n_neg >= MIN_PER_CLASS:
        out["auc"] = roc_auc(y, s)
    return out


def subgroups(
    labels: Sequence[float] | np.ndarray,
    scores: Sequence[float] | np.ndarray,
    threshold: float,
    extras: Sequence[Mapping[str, str]],
    keys: Sequence[str],
) -> dict[str, dict[str, Any]]:
    """Per key (e.g. ``info_view``) and per value: counts, AUC, sensitivity and specificity at threshold."""
    y, s = np.asarray(labels, dtype=np.float64), np.asarray(scores, dtype=np.float64)
    out: dict[str, dict[str, Any]] = {}
    for key in keys:
        values = np.array([e.get(key, "") or "(none)" for e in extras])
        out[key.removeprefix("info_")] = {
            str(v): _rates(y[values == v], s[values == v], threshold) for v in sorted(set(values.tolist()))
        }
    return out


def lesion_subgroups(
    labels: Sequence[float] | np.ndarray,
    scores: Sequence[float] | np.ndarray,
    threshold: float,
    kinds: Sequence[str],
) -> dict[str, dict[str, Any]]:
    """Positives of each lesion kind (size class or type) against all negatives."""
    y, s = np.asarray(labels, dtype=np.float64), np.asarray(scores, dtype=np.float64)
    k = np.asarray(kinds)
    out = {}
    for kind in sorted({kk for kk, yy in zip(kinds, y, strict=True) if yy == 1}):
        keep = (y == 0) | ((y == 1) & (k == kind))
        out[kind] = _rates(y[keep], s[keep], threshold)
    return out


def nodule_size_sensitivity(
    detections: Sequence[Sequence[Any]],
    truths: Sequence[np.ndarray],
    radii: Sequence[Sequence[float]],
    threshold: float,
    classes: Sequence[tuple[str, float, float]] = (("<7 px", 0, 7), ("7-10 px", 7, 10), (">10 px", 10, 1e9)),
) -> dict[str, Any]:
    """Lesion sensitivity of the detector at ``threshold`` per nodule radius class (source px at 512)."""
    found: dict[str, list[bool]] = {name: [] for name, _, _ in classes}
    for dets, boxes, rs in zip(detections, truths, radii, strict=True):
        kept = [d for d in dets if d.score >= threshold]
        for box, r in zip(boxes, rs, strict=True):
            name = next(n for n, lo, hi in classes if lo <= r < hi)
            found[name].append(any(hit(d, tuple(box)) for d in kept))
    return {
        name: {"n": len(v), "sensitivity": float(np.mean(v)) if v else None,
               "ci95_wilson": wilson_interval(int(sum(v)), len(v))}
        for name, v in found.items()
    }  # fmt: skip


def operating_point(
    labels: Sequence[float] | np.ndarray,
    scores: Sequence[float] | np.ndarray,
    patients: Sequence[Hashable],
    rule: Callable[[np.ndarray, np.ndarray], float],
    n_boot: int = 500,
    seed: int = 0,
) -> dict[str, Any]:
    """The threshold ``rule`` picks on validation, its patient-level bootstrap CI, the validation rates."""
    y, s = np.asarray(labels, dtype=np.float64), np.asarray(scores, dtype=np.float64)
    threshold = rule(y, s)
    groups: dict[Hashable, list[int]] = {}
    for i, p in enumerate(patients):
        groups.setdefault(p, []).append(i)
    members = [np.asarray(v) for _, v in sorted(groups.items(), key=lambda kv: str(kv[0]))]
    rng = np.random.default_rng(seed)
    picks = []
    for _ in range(n_boot):
        idx = np.concatenate([members[g] for g in rng.integers(0, len(members), len(members))])
        if y[idx].min() == y[idx].max():
            continue
        picks.append(rule(y[idx], s[idx]))
    lo, hi = np.quantile(picks, [0.025, 0.975]) if picks else (threshold, threshold)
    return {"threshold": threshold, "threshold_ci95_patient_bootstrap": [float(lo), float(hi)],
            "validation": _rates(y, s, threshold)}  # fmt: skip


def aim_verdict(name: str, value: float, ci: Sequence[float] | None = None) -> dict[str, Any] | None:
    """Where ``value`` fell against the model's aim band (and whether its CI excludes the ceiling); None for
    a model without a band (one trained outside :data:`AIM_BANDS`)."""
    if name not in AIM_BANDS:
        return None
    metric, (lo, hi) = AIM_BANDS[name]
    verdict = "within" if lo <= value <= hi else ("below" if value < lo else "above")
    out: dict[str, Any] = {"metric": metric, "band": [lo, hi], "value": value, "verdict": verdict}
    if ci is not None:
        out["ci_excludes_ceiling"] = bool(ci[1] < 1.0)
    return out
