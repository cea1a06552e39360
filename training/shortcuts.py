"""Trivial features that a too-easy generator lets separate the classes: the shortcut check.

Why: issue 14 found that on the old generator one hand-made number, the left-right difference of mean lung
brightness, separated pneumothorax at AUC 0.98, and a one-line HU-range rule separated hemorrhage at AUC
1.000. A model whose AUC such a number reaches may have learned the number. The card reports each feature's
AUC next to the model's, and ``tests/training/test_shortcuts.py`` asserts the gap on fresh images.

- :func:`lung_asymmetry`: ``|mean(left lung zone) - mean(right lung zone)|`` of the preprocessed chest
  image (fixed zones at the lungs' usual place, the feature needs no segmentation, as a shortcut would not);
- :func:`blood_range_fraction`: the fraction of head pixels (HU > -100 and < 200) whose HU lies in 50-90,
  the range of acute blood, per slice; a series scores its maximum.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from training.data.records import Record
from training.evaluate import roc_auc

__all__ = ["blood_range_fraction", "feature_auc", "lung_asymmetry", "series_blood_fraction"]


def lung_asymmetry(image: np.ndarray) -> float:
    """Left-right difference of mean brightness over the lung zones of a ``[H, W]`` preprocessed image."""
    h, w = image.shape[-2:]
    rows = slice(int(0.25 * h), int(0.7 * h))
    right = image[..., rows, int(0.15 * w) : int(0.42 * w)]  # the patient's right lung is on the image left
    left = image[..., rows, int(0.58 * w) : int(0.85 * w)]
    return float(abs(right.mean() - left.mean()))


def blood_range_fraction(hu: np.ndarray, low: float = 50.0, high: float = 90.0) -> float:
    """Fraction of soft-tissue pixels of a slice (in HU) that lie in the acute-blood range."""
    head = (hu > -100) & (hu < 200)
    if not head.any():
        return 0.0
    return float(((hu >= low) & (hu <= high) & head).sum() / head.sum())


def feature_auc(labels: Sequence[float] | np.ndarray, values: Sequence[float] | np.ndarray) -> float:
    """AUC of a feature used as a score, in the direction that separates better (a shortcut may go either
    way, and a rule-maker would pick the better one)."""
    auc = roc_auc(np.asarray(labels, dtype=np.float64), np.asarray(values, dtype=np.float64))
    return max(auc, 1.0 - auc)


def series_blood_fraction(records: Sequence[Record]) -> dict[str, float]:
    """Per series: the largest :func:`blood_range_fraction` over its slices, read from the files (HU)."""
    from pydicom import dcmread

    out: dict[str, float] = {}
    for record in records:
        ds = dcmread(record.path)
        hu = ds.pixel_array.astype(np.float32) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        out[record.series_uid] = max(out.get(record.series_uid, 0.0), blood_range_fraction(hu))
    return out
