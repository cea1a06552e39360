"""Honest intervals and calibration for the card: Wilson, patient-level bootstrap, ECE, detector image level.

Why each (issue 14, "Evaluation"):

- **Wilson intervals** for sensitivity and specificity (Wilson 1927; Brown, Cai & DasGupta 2001): a
  proportion of 9/9 has the Wald interval [1, 1], which claims certainty from nine cases; Wilson's is
  [0.70, 1.00].
- **Patient-level bootstrap** (a cluster bootstrap, Field & Welsh 2007): images of one patient are not
  independent, so resampling images understates the spread. Patients are resampled with replacement and
  bring all their images; resamples without both classes are drawn again.
- **Calibration**: expected calibration error over equal-width probability bins (Guo et al. 2017) and the
  reliability diagram's points (mean predicted probability, observed rate, count per bin), so a card says
  whether "P = 0.9" means nine in ten.
- **Detector at its threshold, per image**: the fraction of lesion-free images with no box
  (image-level specificity) and the fraction of images with a box that do have a lesion (image-level PPV):
  what a worklist sees, which FROC's lesion-level numbers do not show.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from training.evaluate import roc_auc

__all__ = [
    "calibration",
    "detector_image_level",
    "patient_bootstrap_auc_ci",
    "plot_reliability",
    "wilson_interval",
]


def wilson_interval(successes: int, n: int, z: float = 1.959963984540054) -> tuple[float, float] | None:
    """The Wilson score interval of ``successes / n`` (95 % by default); None when ``n`` is 0."""
    if n <= 0:
        return None
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def patient_bootstrap_auc_ci(
    labels: Sequence[float] | np.ndarray,
    scores: Sequence[float] | np.ndarray,
    patients: Sequence[Hashable],
    n_boot: int = 1000,
    alpha: float = 0.05,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile bootstrap ``(1 - alpha)`` interval of the AUC, resampling patients (all their images)."""
    y = np.asarray(labels, dtype=np.float64).ravel()
    s = np.asarray(scores, dtype=np.float64).ravel()
    keys = sorted(set(patients), key=str)
    rows: dict[object, list[int]] = {k: [] for k in keys}
    for i, patient in enumerate(patients):
        rows[patient].append(i)
    groups = [np.asarray(rows[k]) for k in keys]
    rng = np.random.default_rng(seed)
    aucs: list[float] = []
    attempts = 0
    while len(aucs) < n_boot and attempts < n_boot * 10:
        attempts += 1
        idx = np.concatenate([groups[g] for g in rng.integers(0, len(groups), len(groups))])
        if y[idx].min() == y[idx].max():
            continue
        aucs.append(roc_auc(y[idx], s[idx]))
    if not aucs:
        raise ValueError("no bootstrap resample had both classes")
    lo, hi = np.quantile(aucs, [alpha / 2, 1 - alpha / 2])
    return float(lo), float(hi)


def calibration(
    labels: Sequence[float] | np.ndarray, probabilities: Sequence[float] | np.ndarray, n_bins: int = 10
) -> dict[str, Any]:
    """ECE over ``n_bins`` equal-width bins (the last includes 1.0) and the reliability diagram's bins."""
    y = np.asarray(labels, dtype=np.float64).ravel()
    p = np.clip(np.asarray(probabilities, dtype=np.float64).ravel(), 0.0, 1.0)
    which = np.minimum((p * n_bins).astype(int), n_bins - 1)
    bins, ece = [], 0.0
    for b in range(n_bins):
        mask = which == b
        if not mask.any():
            continue
        mean_p, observed, count = float(p[mask].mean()), float(y[mask].mean()), int(mask.sum())
        ece += count / len(p) * abs(mean_p - observed)
        bins.append({"low": b / n_bins, "high": (b + 1) / n_bins, "mean_probability": mean_p,
                     "observed_rate": observed, "n": count})  # fmt: skip
    return {"ece": ece, "n_bins": n_bins, "bins": bins}


def detector_image_level(
    scores_per_image: Sequence[Sequence[float]], has_lesion: Sequence[bool], threshold: float
) -> dict[str, Any]:
    """Per image at ``threshold``: sensitivity (lesion images with a box), specificity (lesion-free images
    without a box), PPV (images with a box that have a lesion), with Wilson intervals."""
    flagged = [any(s >= threshold for s in scores) for scores in scores_per_image]
    lesion = [bool(h) for h in has_lesion]
    tp = sum(f and h for f, h in zip(flagged, lesion, strict=True))
    fp = sum(f and not h for f, h in zip(flagged, lesion, strict=True))
    tn = sum(not f and not h for f, h in zip(flagged, lesion, strict=True))
    fn = sum(not f and h for f, h in zip(flagged, lesion, strict=True))

    def rate(a: int, b: int) -> dict[str, Any]:
        return {"value": a / b if b else None, "ci95_wilson": wilson_interval(a, b), "n": b}

    return {
        "threshold": float(threshold),
        "sensitivity": rate(tp, tp + fn),
        "specificity": rate(tn, tn + fp),
        "ppv": rate(tp, tp + fp),
        "confusion_matrix": {"tp": tp, "fp": fp, "fn": fn, "tn": tn},
    }


def plot_reliability(result: dict[str, Any], path: Path, title: str) -> None:
    """The reliability diagram of :func:`calibration`'s ``result`` (bin means against observed rates)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.5, 4.5), dpi=100)
    ax.plot([0, 1], [0, 1], color="grey", lw=1, ls="--", label="perfect calibration")
    xs = [b["mean_probability"] for b in result["bins"]]
    ys = [b["observed_rate"] for b in result["bins"]]
    sizes = [20 + 200 * b["n"] / max(1, max(c["n"] for c in result["bins"])) for b in result["bins"]]
    ax.plot(xs, ys, color="C0", lw=1)
    ax.scatter(xs, ys, s=sizes, color="C0", label=f"bins (ECE {result['ece']:.3f})")
    ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="mean predicted probability", ylabel="observed positive rate")
    ax.set_title(title)
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
