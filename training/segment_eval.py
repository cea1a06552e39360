"""Held-out numbers of the exported ``ct-hemorrhage-seg`` ONNX model, and its card.

What the card reports is what the service computes: the ONNX Runtime output, mapped back to the source
pixels by :func:`service.inference.postprocess.source_mask`, measured by :mod:`service.results.quantify`
with the voxel size read from the slices' headers. So:

- **Dice** per series with blood (the 3-D mask at source resolution against the generator's painted mask),
  its mean with a 95 % percentile-bootstrap interval over patients (one series per patient here);
- **volume error** in mL, predicted minus true, per series with blood (mean absolute error with its 95 %
  bootstrap interval, median, mean signed error = bias);
- **negative series**: how many got any predicted blood and how much (the service runs the model only on
  series the classifier flags, so this is the cost of a classifier false positive, not a served mask).

The pixel threshold is chosen on validation (the grid value with the best mean series Dice) and the test set
is scored once with it.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from service.inference.card import ModelCard
from service.inference.postprocess import source_mask
from service.inference.preprocess import PreprocessSpec, preprocess_dataset
from service.results.quantify import dice, measure, voxel_size
from training.data.formats.images import read_image_dataset
from training.data.records import Record
from training.export import ort_predict

__all__ = ["THRESHOLDS", "SeriesScore", "score_series", "seg_metrics", "write_seg_card_md"]

THRESHOLDS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7)


@dataclass(frozen=True)
class SeriesScore:
    patient_id: str
    dice: float
    true_ml: float
    predicted_ml: float


def score_series(
    session: Any,
    spec: PreprocessSpec,
    records: list[Record],
    read_mask: Callable[[Record], np.ndarray],
    thresholds: tuple[float, ...] = THRESHOLDS,
) -> dict[float, list[SeriesScore]]:
    """Per threshold, the score of each series (records of one series may come in any order)."""
    by_series: dict[str, list[Record]] = {}
    for record in records:
        by_series.setdefault(record.series_uid, []).append(record)
    out: dict[float, list[SeriesScore]] = {t: [] for t in thresholds}
    for series in by_series.values():
        datasets = [read_image_dataset(r.path) for r in series]
        voxel = voxel_size(datasets)
        pre = [preprocess_dataset(ds, spec) for ds in datasets]
        probs = ort_predict(session, np.concatenate([p.array for p in pre]))["probability"][:, 0]
        truth = np.stack([np.asarray(read_mask(r), bool) for r in series])
        true_ml = measure(truth, voxel).volume_ml if truth.any() else 0.0
        for t in thresholds:
            pred = np.stack([source_mask(p, q.geometry, t) for p, q in zip(probs, pre, strict=True)])
            out[t].append(
                SeriesScore(
                    patient_id=series[0].patient_id,
                    dice=dice(pred, truth),
                    true_ml=true_ml,
                    predicted_ml=float(pred.sum()) * voxel.ml,
                )
            )
    return out


def _boot(values: np.ndarray, seed: int = 0, n: int = 2000) -> list[float] | None:
    if len(values) < 2:
        return None
    rng = np.random.default_rng(seed)
    means = [float(values[rng.integers(0, len(values), len(values))].mean()) for _ in range(n)]
    return [round(float(q), 4) for q in np.quantile(means, [0.025, 0.975])]


def seg_metrics(scores: list[SeriesScore], threshold: float, val_dice: float) -> dict[str, Any]:
    """The card's ``metrics``: Dice (mean, CI, per series), volume error, negative series."""
    blood = [s for s in scores if s.true_ml > 0]
    none = [s for s in scores if s.true_ml == 0]
    dices = np.array([s.dice for s in blood])
    errors = np.array([s.predicted_ml - s.true_ml for s in blood])
    return {
        "pixel_threshold": threshold,
        "validation_mean_dice": round(val_dice, 4),
        "dice": {
            "unit": "series with blood, 3-D mask at source resolution",
            "n_series": len(blood),
            "mean": round(float(dices.mean()), 4) if len(dices) else None,
            "ci95": _boot(dices),
            "median": round(float(np.median(dices)), 4) if len(dices) else None,
        },
        "volume_error_ml": {
            "mean_abs": round(float(np.abs(errors).mean()), 3) if len(errors) else None,
            "mean_abs_ci95": _boot(np.abs(errors)),
            "median_abs": round(float(np.median(np.abs(errors))), 3) if len(errors) else None,
            "mean_signed": round(float(errors.mean()), 3) if len(errors) else None,
        },
        "negative_series": {
            "n": len(none),
            "with_predicted_blood": sum(s.predicted_ml > 0 for s in none),
            "mean_predicted_ml": round(float(np.mean([s.predicted_ml for s in none])), 3) if none else None,
        },
        "per_series": [
            {
                "patient": s.patient_id,
                "dice": round(s.dice, 4),
                "true_ml": round(s.true_ml, 3),
                "predicted_ml": round(s.predicted_ml, 3),
            }
            for s in blood
        ],
    }


def write_seg_card_md(card: ModelCard, folder: Path, plots: list[Path]) -> Path:
    """``card.md`` for people: what the model does, the held-out Dice and volume error, training."""
    for plot in plots:
        if plot.exists() and plot.resolve().parent != folder.resolve():
            shutil.copy2(plot, folder / plot.name)
    m = card.metrics
    d, v, neg = m["dice"], m["volume_error_ml"], m["negative_series"]
    rows = [
        f"| {s['patient']} | {s['dice']:.3f} | {s['true_ml']:.2f} | {s['predicted_ml']:.2f} |"
        for s in m["per_series"]
    ]
    lines = [
        f"# {card.name} {card.version}",
        "",
        f"**{card.intended_use.capitalize()}.** Trained and tested on synthetic head CT only.",
        "",
        card.description,
        "",
        "## What it does",
        "",
        f"- Input `{card.input.name}` {card.input.shape}; output `probability` per pixel; pixel threshold "
        f"{card.labels[0].threshold:.2f} (chosen on validation)",
        f"- Runs after `{card.segmentation.after if card.segmentation else '-'}` flags a series; "
        f"{card.size_bytes / 1e6:.2f} MB, sha256 `{card.sha256}`",
        f"- Export parity (torch vs ONNX Runtime): max abs diff {card.parity.get('max_abs_diff', 0):.2e}",
        "",
        "## Held-out test set (ONNX Runtime, source resolution, scored once)",
        "",
        f"- Dice over {d['n_series']} series with blood: mean **{d['mean']}** (95 % CI {d['ci95']}), "
        f"median {d['median']}",
        f"- Volume error: mean absolute **{v['mean_abs']} mL** (95 % CI {v['mean_abs_ci95']}), median "
        f"{v['median_abs']} mL, bias {v['mean_signed']} mL",
        f"- Negative series: {neg['with_predicted_blood']} of {neg['n']} got some predicted blood "
        f"(mean {neg['mean_predicted_ml']} mL); served only where the classifier is positive",
        "",
        "| patient | Dice | true mL | predicted mL |",
        "|---|---|---|---|",
        *rows,
        "",
        "## Training",
        "",
        "```json",
        json.dumps(card.training, indent=2, default=str),
        "```",
        "",
        *[f"![{p.stem}]({p.name})" for p in plots if p.exists()],
        "",
    ]
    path = folder / "card.md"
    path.write_text("\n".join(lines), encoding="utf-8")
    return path
