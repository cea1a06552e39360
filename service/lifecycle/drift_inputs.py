"""What the drift monitor learns from one routed series: a handful of header values, the mean of the model
input and the scores, taken while the study is analysed, from data already in memory.

Why these: a model meets a new scanner, a new processing chain or a new protocol long before anyone
measures its accuracy there. Manufacturer (0008,0070), pixel spacing (PixelSpacing, else
ImagerPixelSpacing: PS3.3 10.7.1.3), the first VOI window (WindowCenter / WindowWidth, PS3.3 C.11.2),
the image size (Rows x Columns) and the mean of the VOI output show such a change in the inputs; the
score distribution shows what it does to the model. None of them identifies a patient.

Cost: reading six attributes of a dataset that is already parsed (the series' first instance) and one mean
over the model input the worker already holds: no file read, no database round trip.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from pydicom.dataset import Dataset

__all__ = ["InputSummary", "summarise_series"]


@dataclass(frozen=True)
class InputSummary:
    """One model on one series: the values :class:`service.lifecycle.drift.DriftMonitor` compares.

    ``values``: feature name → a number, a string (a category) or None (absent in the header);
    ``scores``: label → probability of the findings the model reported on the series (none when the
    input-domain gate kept no image).
    """

    model: str
    version: str
    values: Mapping[str, float | str | None]
    scores: Mapping[str, float] = field(default_factory=dict)


def _first(ds: Dataset, keyword: str) -> float | None:
    """The first value of a numeric, possibly multi-valued attribute; None when absent or unreadable
    (pydicom converts on access and raises for a wrong VR or length)."""
    try:
        value: Any = ds.get(keyword)
        if value is None or value == "":
            return None
        if isinstance(value, Sequence) and not isinstance(value, str | bytes):
            value = value[0] if len(value) else None
        number = float(value) if value is not None else None
    except Exception:
        return None
    return number if number is not None and np.isfinite(number) else None


def _text(ds: Dataset, keyword: str) -> str | None:
    try:
        value = str(ds.get(keyword, "") or "").strip()
    except Exception:
        return None
    return value[:64] or None


def summarise_series(
    model: str,
    version: str,
    ds: Dataset,
    model_input: np.ndarray,
    input_mean: float,
    input_std: float,
    scores: Mapping[str, float],
) -> InputSummary:
    """The summary of one series from its first dataset and its model input ``[N, C, H, W]``.

    ``input_mean``/``input_std``: the normalisation of the input's first channel, undone so that the mean
    intensity is in the VOI output's ``[0, 1]`` whatever the card's normalisation.
    """
    rows, columns = _first(ds, "Rows"), _first(ds, "Columns")
    spacing = _first(ds, "PixelSpacing")
    if spacing is None:
        spacing = _first(ds, "ImagerPixelSpacing")
    mean = float(model_input[:, 0].mean()) * input_std + input_mean if model_input.size else None
    return InputSummary(
        model=model,
        version=version,
        values={
            "manufacturer": _text(ds, "Manufacturer"),
            "pixel_spacing": spacing,
            "window_center": _first(ds, "WindowCenter"),
            "window_width": _first(ds, "WindowWidth"),
            "image_size": f"{int(rows)}x{int(columns)}" if rows and columns else None,
            "mean_intensity": mean if mean is None or np.isfinite(mean) else None,
        },
        scores=dict(scores),
    )
