"""The input-domain gate: a model answers only for images like those it was validated on.

Why: the shipped models are demonstrations trained on one generator. Shown a real radiograph, an image
through another vendor's processing, a knee, or a head phantom made another way, they still return a
probability, often a confident one, and a confident STAT flag on an image the model never could judge floods
a worklist with false alarms (issue 14 measured P = 0.998 on a real normal CR). A result that says "not
analysed: outside the model's validated input domain" is the honest answer there.

How: the card's :class:`service.inference.card.DomainSpec` holds one or more Mahalanobis references,
each a mean and the inverse of a shrunk covariance (Ledoit & Wolf 2004) of a feature vector measured on the
generator's images and never on training data:

- ``source="input"``: :func:`input_statistics` of the preprocessed model input (intensity quantiles,
  saturation, edge and high-frequency energy at two scales, a 4 x 4 layout of block means). Catches
  other processing chains (unsharp masking, tone curves, noise) and other anatomy even where the network's
  features happen to look familiar;
- ``source="texture"``: :func:`texture_statistics`, six numbers of the finest scales alone (a noise level
  after Immerkaer 1996, the 4-neighbour Laplacian at two scales and their ratio). Heavy edge enhancement,
  noise and blur move these far while the 28 numbers of ``"input"``, mostly layout, hardly notice (session 5:
  a Mahalanobis distance over all of them caught unsharp masking at amount 2 in 47 % of films, noise at 10 %
  of the window in none; this score alone catches 97 % of amount 4 and all of that noise);
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

from service.inference.card import DomainScore, ModelCard, decode_floats
from service.inference.postprocess import ModelImage, findings_from_outputs
from service.inference.preprocess import PreprocessSpec
from service.results.schema import Finding

__all__ = [
    "INPUT_FEATURES",
    "DomainVerdict",
    "InputSummary",
    "TEXTURE_FEATURES",
    "SeriesJudgement",
    "assess_domain",
    "domain_scores",
    "input_statistics",
    "judge_series",
    "mahalanobis",
    "summarise_series",
    "texture_statistics",
]

_QUANTILES = (1, 10, 50, 90, 99)
_GRID = 4
INPUT_FEATURES: tuple[str, ...] = (
    *(f"quantile_{q}" for q in _QUANTILES),
    "mean",
    "std",
    "fraction_black",
    "fraction_white",
    "gradient",
    "laplacian",
    "laplacian_half",
    *(f"block_{r}_{c}" for r in range(_GRID) for c in range(_GRID)),
)
"""Names of :func:`input_statistics`' columns, in order (written into the card with the reference)."""


def _laplacian(u: np.ndarray) -> np.ndarray:
    """Mean absolute 4-neighbour Laplacian over the interior of each image of ``u`` ``[N, H, W]``."""
    lap = 4 * u[:, 1:-1, 1:-1] - u[:, :-2, 1:-1] - u[:, 2:, 1:-1] - u[:, 1:-1, :-2] - u[:, 1:-1, 2:]
    mean: np.ndarray = np.abs(lap).mean(axis=(1, 2))
    return mean


TEXTURE_FEATURES: tuple[str, ...] = (
    "log_noise_mean",
    "log_noise_median",
    "log_laplacian",
    "log_laplacian_half",
    "log_fine_to_half",
    "log_noise_median_half",
)
"""Names of :func:`texture_statistics`' columns, in order."""


def _noise_kernel(u: np.ndarray) -> np.ndarray:
    """``|u * N|`` over the interior, N = [[1,-2,1],[-2,4,-2],[1,-2,1]]: the mask of Immerkaer's (1996) fast
    noise estimate, blind to intensity ramps and to straight edges' first order."""
    k = (
        u[:, :-2, :-2] - 2 * u[:, :-2, 1:-1] + u[:, :-2, 2:]
        - 2 * u[:, 1:-1, :-2] + 4 * u[:, 1:-1, 1:-1] - 2 * u[:, 1:-1, 2:]
        + u[:, 2:, :-2] - 2 * u[:, 2:, 1:-1] + u[:, 2:, 2:]
    )  # fmt: skip
    out: np.ndarray = np.abs(k)
    return out


def _half(u: np.ndarray) -> np.ndarray:
    n, h, w = u.shape
    half: np.ndarray = u[:, : h // 2 * 2, : w // 2 * 2].reshape(n, h // 2, 2, w // 2, 2).mean(axis=(2, 4))
    return half


def _sorted_median(rows: np.ndarray) -> np.ndarray:
    """``np.median(rows, axis=1)``, the same numbers, in half the time: numpy's selection (``partition``)
    was 45 % of the gate's CPU, and its SIMD sort of a row is quicker than selecting in it, after which
    the selection is cheap. The same holds for the quantiles in :func:`input_statistics` (0.97 → 0.33 ms
    for a 256 x 256 input). A quantile or median is a function of the values, not of their order, so the
    features, and the cards' references fitted on them, are unchanged
    (tests/service/inference/test_domain.py)."""
    median: np.ndarray = np.median(np.sort(rows, axis=1), axis=1)
    return median


_TINY = 1e-6
"""Added before each logarithm: a flat image has no texture, and log(0) would make its score NaN."""


_CHUNK = 32
"""Images per pass of :func:`input_statistics`: each feature is per image, and a 1,000-slice series at once
made several whole-series temporaries (64 MiB each at 128 x 128) live together."""


def input_statistics(images: np.ndarray, spec: PreprocessSpec) -> np.ndarray:
    """Features of preprocessed model inputs ``[N, 1, H, W]``; float64 ``[N, len(INPUT_FEATURES)]``.

    The normalisation is undone first (``x * std + mean``), so the features are in the VOI output's
    ``[0, 1]`` whatever the card's mean and std: the padding of a non-square image is 0. Computed
    :data:`_CHUNK` images at a time (the same numbers: nothing is reduced across images).
    """
    if len(images) > _CHUNK:
        parts = [input_statistics(images[i : i + _CHUNK], spec) for i in range(0, len(images), _CHUNK)]
        return np.concatenate(parts, axis=0)
    u = images[:, 0].astype(np.float32) * spec.std + spec.mean
    n, h, w = u.shape
    flat = u.reshape(n, -1)
    quantiles = np.percentile(np.sort(flat, axis=1), _QUANTILES, axis=1).T  # sorted first: see _sorted_median
    gradient = np.abs(np.diff(u, axis=1)).mean(axis=(1, 2)) + np.abs(np.diff(u, axis=2)).mean(axis=(1, 2))
    half = _half(u)
    gh, gw = h // _GRID, w // _GRID
    blocks = u[:, : gh * _GRID, : gw * _GRID].reshape(n, _GRID, gh, _GRID, gw).mean(axis=(2, 4))
    columns = [
        quantiles,
        flat.mean(axis=1, keepdims=True),
        flat.std(axis=1, keepdims=True),
        (flat <= 0.005).mean(axis=1, keepdims=True),
        (flat >= 0.995).mean(axis=1, keepdims=True),
        gradient[:, None],
        _laplacian(u)[:, None],
        _laplacian(half)[:, None],
        blocks.reshape(n, -1),
    ]
    return np.concatenate(columns, axis=1).astype(np.float64)


def texture_statistics(images: np.ndarray, spec: PreprocessSpec) -> np.ndarray:
    """The finest-scale features of preprocessed model inputs ``[N, 1, H, W]``; float64
    ``[N, len(TEXTURE_FEATURES)]``, in the VOI output's ``[0, 1]`` like :func:`input_statistics`.

    Logarithms, because sharpening and noise multiply these amplitudes: a Mahalanobis distance then weighs
    "twice as much" alike at every exposure.
    """
    if len(images) > _CHUNK:
        parts = [texture_statistics(images[i : i + _CHUNK], spec) for i in range(0, len(images), _CHUNK)]
        return np.concatenate(parts, axis=0)
    u = images[:, 0].astype(np.float32) * spec.std + spec.mean
    half = _half(u)
    k, k_half = _noise_kernel(u), _noise_kernel(half)
    lap, lap_half = _laplacian(u) + _TINY, _laplacian(half) + _TINY
    columns = [
        np.log(k.mean(axis=(1, 2)) + _TINY),
        np.log(_sorted_median(k.reshape(len(u), -1)) + _TINY),
        np.log(lap),
        np.log(lap_half),
        np.log(lap / lap_half),
        np.log(_sorted_median(k_half.reshape(len(u), -1)) + _TINY),
    ]
    return np.stack(columns, axis=1).astype(np.float64)


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


def _features(
    score: DomainScore, inputs: np.ndarray, outputs: dict[str, np.ndarray], spec: PreprocessSpec
) -> np.ndarray:
    if score.source == "input":
        return input_statistics(inputs, spec)
    if score.source == "texture":
        return texture_statistics(inputs, spec)
    return np.asarray(outputs[str(score.output)], dtype=np.float64).reshape(len(inputs), -1)


def domain_scores(
    card: ModelCard, inputs: np.ndarray, outputs: dict[str, np.ndarray]
) -> dict[str, np.ndarray]:
    """Every domain score of ``card`` for each row of the model input ``inputs`` ``[N, 1, H, W]``.

    Non-finite features (a NaN embedding) score infinity: outside.
    """
    assert card.domain is not None, "a card without a domain reference has no scores"
    out = {}
    for score in card.domain.scores:
        mean, precision = _reference(score.mean, score.precision, score.dim)
        features = _features(score, inputs, outputs, card.preprocessing)
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
