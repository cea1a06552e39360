"""Held-out evaluation in numpy: ROC AUC with a bootstrap CI, operating points, FROC, series AUC, plots.

Rules this module follows (and ``docs/training.md`` states):

- **Thresholds are chosen on the validation set** and applied unchanged to the test set, which is scored
  once, at the end. Urgent findings take the *highest* threshold whose validation sensitivity is at least
  the target (0.95 unless the model's plan says otherwise): as few false alarms as the target allows.
- **AUC** is the Mann-Whitney statistic computed from average ranks (ties count one half); its 95% CI is a
  percentile bootstrap over images (or series), resampled with a fixed seed.
- **FROC** (detection): detections of all images are pooled and ranked by score. A detection is a *hit* when
  its centre lies inside a ground-truth box **or** its IoU with that box is ≥ 0.3; a lesion counts once (a
  second hit on an already-found lesion is neither a true nor a false positive, the LUNA16 convention);
  every other detection is a false positive. Sensitivity is reported at 0.5, 1, 2 and 4 false positives
  per image. The detection score threshold is the lowest one with at most 1 FP/image on validation.
- **Series** (CT): slice probabilities are aggregated with ``service.inference.postprocess.aggregate_series``,
  the function the service runs, and the AUC is computed over series; the key slice is reported.

Every function takes scores (probabilities, or boxes from ``decode_detections``), so the same code scores a
torch model during training and the exported ONNX model for the card.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from service.inference.postprocess import Box, aggregate_series, box_iou

__all__ = [
    "FROC_RATES",
    "FrocResult",
    "binary_metrics",
    "bootstrap_auc_ci",
    "froc",
    "hit",
    "plot_froc",
    "plot_roc",
    "roc_auc",
    "roc_curve",
    "series_scores",
    "threshold_for_fp_rate",
    "threshold_for_sensitivity",
]

FROC_RATES = (0.5, 1.0, 2.0, 4.0)
HIT_IOU = 0.3


def _ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks with ties given their average rank."""
    order = np.argsort(values, kind="mergesort")
    sorted_values = values[order]
    ranks = np.empty(len(values), dtype=np.float64)
    i = 0
    while i < len(values):
        j = i
        while j + 1 < len(values) and sorted_values[j + 1] == sorted_values[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def roc_auc(labels: Sequence[float] | np.ndarray, scores: Sequence[float] | np.ndarray) -> float:
    """Area under the ROC curve = P(score of a positive > score of a negative), ties counting 1/2."""
    y = np.asarray(labels, dtype=np.float64).ravel()
    s = np.asarray(scores, dtype=np.float64).ravel()
    n_pos, n_neg = int((y == 1).sum()), int((y == 0).sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError("AUC needs at least one positive and one negative")
    ranks = _ranks(s)
    return float((ranks[y == 1].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def bootstrap_auc_ci(
    labels: Sequence[float] | np.ndarray,
    scores: Sequence[float] | np.ndarray,
    n_boot: int = 1000,
    alpha: float = 0.05,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile bootstrap ``(1 - alpha)`` interval of the AUC; resamples lacking a class are redrawn."""
    y = np.asarray(labels, dtype=np.float64).ravel()
    s = np.asarray(scores, dtype=np.float64).ravel()
    rng = np.random.default_rng(seed)
    aucs: list[float] = []
    attempts = 0
    while len(aucs) < n_boot and attempts < n_boot * 10:
        attempts += 1
        idx = rng.integers(0, len(y), len(y))
        yb = y[idx]
        if yb.min() == yb.max():
            continue
        aucs.append(roc_auc(yb, s[idx]))
    lo, hi = np.quantile(aucs, [alpha / 2, 1 - alpha / 2])
    return float(lo), float(hi)


def roc_curve(
    labels: Sequence[float] | np.ndarray, scores: Sequence[float] | np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(fpr, tpr, thresholds)``; a point per distinct score, plus (0, 0) at threshold +inf."""
    y = np.asarray(labels, dtype=np.float64).ravel()
    s = np.asarray(scores, dtype=np.float64).ravel()
    thresholds = np.concatenate([[np.inf], np.unique(s)[::-1]])
    n_pos, n_neg = max(1, int((y == 1).sum())), max(1, int((y == 0).sum()))
    tpr = np.array([((s >= t) & (y == 1)).sum() / n_pos for t in thresholds])
    fpr = np.array([((s >= t) & (y == 0)).sum() / n_neg for t in thresholds])
    return fpr, tpr, thresholds


def threshold_for_sensitivity(
    labels: Sequence[float] | np.ndarray, scores: Sequence[float] | np.ndarray, target: float = 0.95
) -> float:
    """The highest threshold ``t`` such that ``score >= t`` has sensitivity ≥ ``target`` on these data."""
    y = np.asarray(labels, dtype=np.float64).ravel()
    s = np.asarray(scores, dtype=np.float64).ravel()
    positives = np.sort(s[y == 1])[::-1]
    if positives.size == 0:
        raise ValueError("no positives to set a sensitivity threshold on")
    needed = int(np.ceil(target * positives.size - 1e-9))
    return float(positives[max(needed, 1) - 1])


def binary_metrics(
    labels: Sequence[float] | np.ndarray, scores: Sequence[float] | np.ndarray, threshold: float
) -> dict[str, Any]:
    """Sensitivity, specificity, PPV, NPV, F1 and the confusion matrix at ``score >= threshold``."""
    y = np.asarray(labels, dtype=np.float64).ravel() == 1
    pred = np.asarray(scores, dtype=np.float64).ravel() >= threshold
    tp, fp = int((pred & y).sum()), int((pred & ~y).sum())
    fn, tn = int((~pred & y).sum()), int((~pred & ~y).sum())

    def ratio(a: int, b: int) -> float | None:
        return a / b if b else None

    sens, ppv = ratio(tp, tp + fn), ratio(tp, tp + fp)
    f1 = 2 * sens * ppv / (sens + ppv) if sens and ppv else 0.0
    return {
        "threshold": float(threshold),
        "sensitivity": sens,
        "specificity": ratio(tn, tn + fp),
        "ppv": ppv,
        "npv": ratio(tn, tn + fn),
        "f1": f1,
        "confusion_matrix": {"tp": tp, "fp": fp, "fn": fn, "tn": tn},
        "n": int(y.size),
        "n_positive": int(y.sum()),
    }


def hit(box: Box | tuple[float, float, float, float], truth: tuple[float, float, float, float]) -> bool:
    """The FROC hit rule: the detection's centre inside the true box, or IoU ≥ 0.3."""
    b = box.xyxy if isinstance(box, Box) else box
    cx, cy = (b[0] + b[2]) / 2, (b[1] + b[3]) / 2
    inside = truth[0] <= cx <= truth[2] and truth[1] <= cy <= truth[3]
    return inside or box_iou(b, truth) >= HIT_IOU


@dataclass(frozen=True)
class FrocResult:
    """Pooled, score-ranked detections: ``fp_per_image`` and ``sensitivity`` after each one."""

    scores: np.ndarray
    fp_per_image: np.ndarray
    sensitivity: np.ndarray
    n_images: int
    n_lesions: int

    def sensitivity_at(self, fp_rate: float) -> float:
        """Best sensitivity reachable with at most ``fp_rate`` false positives per image."""
        ok = self.fp_per_image <= fp_rate + 1e-12
        return float(self.sensitivity[ok].max()) if ok.any() else 0.0

    def at_threshold(self, threshold: float) -> tuple[float, float]:
        """``(sensitivity, fp_per_image)`` keeping detections with ``score >= threshold``."""
        kept = self.scores >= threshold
        if not kept.any():
            return 0.0, 0.0
        last = int(np.nonzero(kept)[0].max())
        return float(self.sensitivity[last]), float(self.fp_per_image[last])

    def summary(self) -> dict[str, float]:
        return {f"sensitivity_at_{r:g}_fp": self.sensitivity_at(r) for r in FROC_RATES}


def froc(detections: Sequence[Sequence[Box]], truths: Sequence[Sequence[tuple[float, ...]]]) -> FrocResult:
    """FROC from per-image detections and per-image true boxes ``(x0, y0, x1, y1)`` (same coordinates)."""
    if len(detections) != len(truths):
        raise ValueError("one list of detections per image, one list of truths per image")
    n_lesions = sum(len(t) for t in truths)
    pooled = sorted(((d.score, i, d) for i, dets in enumerate(detections) for d in dets), key=lambda e: -e[0])
    found = [np.zeros(len(t), dtype=bool) for t in truths]
    scores, fps, sens = [0.0], [0.0], [0.0]  # the point before any detection (threshold above all)
    n_fp = n_tp = 0
    for score, i, det in pooled:
        matches = [j for j, t in enumerate(truths[i]) if hit(det, tuple(t))]  # type: ignore[arg-type]
        new = [j for j in matches if not found[i][j]]
        if new:
            found[i][new[0]] = True
            n_tp += 1
        elif not matches:
            n_fp += 1
        scores.append(score)
        fps.append(n_fp / max(1, len(truths)))
        sens.append(n_tp / max(1, n_lesions))
    scores[0] = float("inf")
    return FrocResult(np.array(scores), np.array(fps), np.array(sens), len(truths), n_lesions)


def threshold_for_fp_rate(result: FrocResult, fp_rate: float = 1.0) -> float:
    """The lowest score threshold that keeps at most ``fp_rate`` false positives per image (validation)."""
    ok = np.nonzero(result.fp_per_image <= fp_rate + 1e-12)[0]
    last = int(ok.max())
    if last == 0:
        return 1.0
    # Ties: a threshold equal to this score also keeps later detections with the same score; step past them.
    score = float(result.scores[last])
    if last + 1 < len(result.scores) and result.scores[last + 1] == score:
        return float(np.nextafter(score, np.inf))
    return score


def series_scores(
    slice_probabilities: np.ndarray, series_ids: Sequence[str], slice_indices: Sequence[int], window: int = 3
) -> dict[str, tuple[float, int]]:
    """``series id → (series probability, key slice index)`` via ``aggregate_series`` (ordered by index)."""
    grouped: dict[str, list[tuple[int, float]]] = {}
    for p, sid, idx in zip(np.asarray(slice_probabilities).ravel(), series_ids, slice_indices, strict=True):
        grouped.setdefault(sid, []).append((int(idx), float(p)))
    out: dict[str, tuple[float, int]] = {}
    for sid, items in grouped.items():
        items.sort()
        prob, key = aggregate_series(np.array([p for _, p in items]), window=window)
        out[sid] = (prob, items[key][0])
    return out


def plot_roc(
    labels: np.ndarray,
    scores: np.ndarray,
    threshold: float,
    path: Path,
    title: str,
    auc_ci: tuple[float, float],
) -> None:
    """ROC curve PNG with the shipped operating point marked."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    fpr, tpr, _ = roc_curve(labels, scores)
    point = binary_metrics(labels, scores, threshold)
    fig, ax = plt.subplots(figsize=(4.5, 4.5), dpi=100)
    ax.plot(
        fpr, tpr, lw=2, label=f"AUC {roc_auc(labels, scores):.3f} (95% CI {auc_ci[0]:.3f}-{auc_ci[1]:.3f})"
    )
    ax.plot([0, 1], [0, 1], ls=":", color="grey")
    if point["specificity"] is not None and point["sensitivity"] is not None:
        ax.plot(
            1 - point["specificity"],
            point["sensitivity"],
            "o",
            color="red",
            label=f"threshold {threshold:.3f}",
        )
    ax.set(xlabel="1 - specificity", ylabel="sensitivity", title=title, xlim=(0, 1), ylim=(0, 1.02))
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_froc(result: FrocResult, path: Path, title: str, threshold: float | None = None) -> None:
    """FROC curve PNG (sensitivity against false positives per image, log x axis)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 4), dpi=100)
    x = np.maximum(result.fp_per_image, 1e-2)
    ax.step(x, result.sensitivity, where="post", lw=2)
    for rate in FROC_RATES:
        ax.plot(rate, result.sensitivity_at(rate), "o", color="black")
    if threshold is not None:
        sens, fp = result.at_threshold(threshold)
        ax.plot(max(fp, 1e-2), sens, "o", color="red", label=f"threshold {threshold:.3f}")
        ax.legend(loc="lower right", fontsize=8)
    ax.set_xscale("log")
    ax.set(xlabel="false positives per image", ylabel="lesion sensitivity", title=title, ylim=(0, 1.02))
    ax.set_xlim(0.05, 8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
