"""The input-domain gate: a model answers only for images like those it was validated on.

Why: the shipped models are demonstrations trained on one generator. Shown a real radiograph, an image
through another vendor's processing, a knee, or a head phantom made another way, they still return a
probability, often a confident one, and a confident STAT flag on an image the model never could judge floods
a worklist with false alarms (issue 14 measured P = 0.998 on a real normal CR). A result that says "not
analysed: outside the model's validated input domain" is the honest answer there.

How: the card's :class:`service.inference.card.DomainSpec` holds one or more Mahalanobis references,
each a mean and the inverse of a shrunk covariance (Ledoit & Wolf 2004) of a feature vector measured on the
generator's images and never on training data:

- ``source="input"``: :func:`~service.inference.domain_features.input_statistics` of the preprocessed
  model input (intensity quantiles, saturation, edge and high-frequency energy at two scales, a 4 x 4
  layout of block means). Catches other processing chains (unsharp masking, tone curves, noise) and other
  anatomy even where the network's features happen to look familiar;
- ``source="texture"``: :func:`~service.inference.domain_features.texture_statistics`, six numbers of the
  finest scales alone (a noise level after Immerkaer 1996, the 4-neighbour Laplacian at two scales and
  their ratio). Heavy edge enhancement, noise and blur move these far while the 28 numbers of ``"input"``,
  mostly layout, hardly notice (session 5: a Mahalanobis distance over all of them caught unsharp masking
  at amount 2 in 47 % of films, noise at 10 % of the window in none; this score alone catches 97 % of
  amount 4 and all of that noise);
- ``source="output"``: an extra graph output of the model, the penultimate-layer embedding (global average
  of the last feature map), which sees what the network sees.

Each score's threshold is a high quantile of the scores of held-out in-domain images (the card's report
says which and how many it rejects). An image (``unit="image"``) or a series (``unit="series"``: the
median over its slices, since single slices at the skull base or vertex are unusual in any head CT) is
outside when any of its scores is above its threshold. The gate runs after inference because the embedding
comes from the same run: it costs one matrix-vector product per score and image, no second model.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from pydicom.dataset import Dataset

from service.inference.card import ModelCard, decode_floats
from service.inference.domain_features import gate_statistics
from service.inference.postprocess import ModelImage, findings_from_outputs
from service.results.schema import Finding

__all__ = [
    "DomainVerdict",
    "InputSummary",
    "SeriesJudgement",
    "assess_domain",
    "domain_scores",
    "judge_series",
    "mahalanobis",
    "summarise_series",
]


@functools.lru_cache(maxsize=32)
def _reference(mean: str, precision: str, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """Decoded once per card (the strings are the cache key; Python caches their hash)."""
    return decode_floats(mean).astype(np.float64), decode_floats(precision).astype(np.float64).reshape(
        dim, dim
    )


def mahalanobis(features: np.ndarray, mean: np.ndarray, precision: np.ndarray) -> np.ndarray:
    """``sqrt((x - mean)^T precision (x - mean))`` for each row of ``features`` ``[N, dim]``."""
    z = np.asarray(features, dtype=np.float64) - mean
    distances: np.ndarray = np.sqrt(np.maximum(np.einsum("ni,ij,nj->n", z, precision, z), 0.0))
    return distances


def domain_scores(
    card: ModelCard, inputs: np.ndarray, outputs: dict[str, np.ndarray]
) -> dict[str, np.ndarray]:
    """Every domain score of ``card`` for each row of the model input ``inputs`` ``[N, 1, H, W]``.

    The input and texture statistics come from one pass (:func:`gate_statistics`). Non-finite features
    (a NaN embedding) score infinity: outside.
    """
    assert card.domain is not None, "a card without a domain reference has no scores"
    measured = gate_statistics(
        inputs, card.preprocessing, [s.source for s in card.domain.scores if s.source != "output"]
    )
    out = {}
    for score in card.domain.scores:
        mean, precision = _reference(score.mean, score.precision, score.dim)
        features = (
            measured[score.source]
            if score.source != "output"
            else np.asarray(outputs[str(score.output)], dtype=np.float64).reshape(len(inputs), -1)
        )
        values = mahalanobis(np.nan_to_num(features, nan=0.0, posinf=0.0, neginf=0.0), mean, precision)
        values[~np.isfinite(features).all(axis=1)] = np.inf
        out[score.name] = values
    return out


@dataclass(frozen=True)
class DomainVerdict:
    """Which instances of a routed series stay, and why the others do not.

    ``kept``: instance indices to report findings for; ``rejected``: ``(instance index, reason)``, the index
    ``None`` when the whole series is judged (``unit="series"``); ``rows``: model-input rows per instance.
    """

    kept: tuple[int, ...]
    rejected: tuple[tuple[int | None, str], ...]
    rows: tuple[int, ...]

    def select(self, outputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The rows of ``outputs`` that belong to the kept instances, in order."""
        starts = np.concatenate([[0], np.cumsum(self.rows)]).astype(int)
        index = np.concatenate([np.arange(starts[i], starts[i + 1]) for i in self.kept] or [np.zeros(0, int)])
        return {name: value[index] for name, value in outputs.items()}


def _reason(scores: dict[str, float], card: ModelCard) -> str | None:
    """The reason for the score furthest above its threshold, or None when all are within."""
    assert card.domain is not None
    worst = max(card.domain.scores, key=lambda s: scores[s.name] / s.threshold)
    value = scores[worst.name]
    if value <= worst.threshold:
        return None
    return (
        f"outside the model's validated input domain ({worst.name} score {value:.3g} > threshold "
        f"{worst.threshold:.3g})"
    )


def assess_domain(
    card: ModelCard, inputs: np.ndarray, outputs: dict[str, np.ndarray], rows: Sequence[int]
) -> DomainVerdict:
    """Judge the instances of one routed series (``rows[i]`` model-input rows for instance ``i``, in the
    order of ``inputs``). A card without a domain keeps everything."""
    rows = tuple(int(r) for r in rows)
    if card.domain is None:
        return DomainVerdict(kept=tuple(range(len(rows))), rejected=(), rows=rows)
    missing = [s.output for s in card.domain.scores if s.output is not None and s.output not in outputs]
    if missing:  # e.g. a remote server with an older model file: the gate cannot judge, so no finding
        why = f"the input-domain gate cannot judge: the model returned no {missing[0]!r} output"
        judged: tuple[int | None, ...] = (None,) if card.domain.unit == "series" else tuple(range(len(rows)))
        return DomainVerdict(kept=(), rejected=tuple((i, why) for i in judged), rows=rows)
    per_row = domain_scores(card, inputs, outputs)
    if card.domain.unit == "series":
        reason = _reason({name: float(np.median(v)) for name, v in per_row.items()}, card)
        if reason is None:
            return DomainVerdict(kept=tuple(range(len(rows))), rejected=(), rows=rows)
        return DomainVerdict(kept=(), rejected=((None, reason),), rows=rows)
    kept: list[int] = []
    rejected: list[tuple[int | None, str]] = []
    start = 0
    for i, n in enumerate(rows):
        reason = _reason({name: float(np.median(v[start : start + n])) for name, v in per_row.items()}, card)
        start += n
        if reason is None:
            kept.append(i)
        else:
            rejected.append((i, reason))
    return DomainVerdict(kept=tuple(kept), rejected=tuple(rejected), rows=rows)


# --- One routed series judged: the gate, its findings, and what the drift monitor learns from it ---------
#
# The drift monitor (service/lifecycle/drift.py) watches the same input domain over time, per model: a
# handful of header values, the mean of the model input and the scores of each series. They are defined here,
# beside the gate, because training computes the card's drift reference with these very functions
# (training/drift_reference.py) on held-out images: one definition for the reference and the window.
# Manufacturer (0008,0070), pixel spacing (PixelSpacing, else ImagerPixelSpacing: PS3.3 10.7.1.3), the first
# VOI window (WindowCenter / WindowWidth, PS3.3 C.11.2), the image size (Rows x Columns) and the mean of the
# VOI output show a new scanner, processing chain or protocol in the inputs; the score distribution shows
# what it does to the model. None of them identifies a patient. Cost per series: six attributes of a
# dataset already parsed and one mean over the model input already in memory.


@dataclass(frozen=True)
class InputSummary:
    """One model on one series: the values :class:`service.lifecycle.drift.DriftMonitor` compares.

    ``values``: feature name -> a number, a string (a category) or None (absent in the header);
    ``scores``: label -> probability of the findings the model reported on the series (none when the
    input-domain gate kept no image).
    """

    model: str
    version: str
    values: Mapping[str, float | str | None]
    scores: Mapping[str, float] = field(default_factory=dict)

    def features(self) -> dict[str, float | str | None]:
        """Every compared value by name: the input values, then ``score:<label>`` per reported label."""
        out: dict[str, float | str | None] = dict(self.values)
        out.update({f"score:{label}": p for label, p in self.scores.items()})
        return out


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


@dataclass(frozen=True)
class SeriesJudgement:
    """The gate's verdict on one routed series, the findings of the images it kept, and the drift summary."""

    verdict: DomainVerdict
    findings: list[Finding]
    summary: InputSummary


def judge_series(
    card: ModelCard,
    series_uid: str,
    images: Sequence[ModelImage],
    batch: np.ndarray,
    outputs: dict[str, np.ndarray],
    first: Dataset,
) -> SeriesJudgement:
    """Gate, findings and drift summary of one series: ``images`` in model order, ``batch`` their stacked
    inputs, ``outputs`` the model's answer for ``batch``, ``first`` the series' first dataset in that order.
    The service (service/analyse.py) and the card's drift reference (training) both call this."""
    verdict = assess_domain(card, batch, outputs, [img.pre.array.shape[0] for img in images])
    kept = [images[i] for i in verdict.kept]
    found = findings_from_outputs(card, series_uid, kept, verdict.select(outputs)) if kept else []
    spec = card.preprocessing
    mean = spec.channel_mean[0] if spec.channel_mean else spec.mean
    std = spec.channel_std[0] if spec.channel_std else spec.std
    scores = {f.label: f.probability for f in found}
    summary = summarise_series(card.name, card.version, first, batch, mean, std, scores)
    return SeriesJudgement(verdict, found, summary)
