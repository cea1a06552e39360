"""What the input-domain gate measures on a model input: intensity, layout and texture statistics.

The gate (:mod:`service.inference.domain`) scores each image's distance from the validated domain on two
vectors measured here, :func:`input_statistics` (28 numbers) and :func:`texture_statistics` (6), besides
the network's own embedding. Training fits each card's reference on exactly these functions
(training/domain.py), so their numbers are part of every card: a change here that moves them moves every
threshold.

Why a module of its own, written for speed: the gate runs on every image of every study, on the hot path,
and with two chest models it was the largest CPU item of a study (~9 ms of ~37 ms under 16 concurrent
clients, bench/RESULTS.md, session 12), more than decoding. The two vectors share most of their work (the
unnormalised image, its half-resolution copy, the Laplacian at both scales), so :func:`gate_statistics`
computes them in one pass over a :class:`_Planes`, each plane once; quantiles and medians take only the
order statistics they need, by a radix select (:func:`_order_statistics`: sorting the rows was 3 of the
gate's 3.7 ms on a 256 x 256 input, session 15), then numpy's own interpolation rule (bit-identical to
``np.percentile`` / ``np.median``, see :func:`_quantiles`); and the 2 x 2 mean is four
strided adds rather than a five-dimensional reduction (8x quicker at 256 x 256; the same numbers to a unit
in the last place of float32, the order of four additions).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import numpy as np

from service.inference.preprocess import PreprocessSpec

__all__ = ["INPUT_FEATURES", "TEXTURE_FEATURES", "gate_statistics", "input_statistics", "texture_statistics"]

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

TEXTURE_FEATURES: tuple[str, ...] = (
    "log_noise_mean",
    "log_noise_median",
    "log_laplacian",
    "log_laplacian_half",
    "log_fine_to_half",
    "log_noise_median_half",
)
"""Names of :func:`texture_statistics`' columns, in order."""

_TINY = 1e-6
"""Added before each logarithm: a flat image has no texture, and log(0) would make its score NaN."""

_CHUNK = 32
"""Images per pass: each feature is per image, and a 1,000-slice series at once made several whole-series
temporaries (64 MiB each at 128 x 128) live together."""


def _laplacian(u: np.ndarray) -> np.ndarray:
    """Mean absolute 4-neighbour Laplacian over the interior of each image of ``u`` ``[N, H, W]``."""
    lap = 4 * u[:, 1:-1, 1:-1] - u[:, :-2, 1:-1] - u[:, 2:, 1:-1] - u[:, 1:-1, :-2] - u[:, 1:-1, 2:]
    mean: np.ndarray = np.abs(lap).mean(axis=(1, 2))
    return mean


def _noise_kernel(u: np.ndarray) -> np.ndarray:
    """``|u * N|`` over the interior, N = [[1,-2,1],[-2,4,-2],[1,-2,1]]: the mask of Immerkaer's (1996) fast
    noise estimate, blind to intensity ramps and to straight edges' first order. N is the outer product of
    [1, -2, 1] with itself, so it is applied as a second difference along rows, then along columns: six
    array operations rather than sixteen (the same numbers but for float32 rounding, ~1e-6 relative)."""
    rows = u[:, :, :-2] - 2 * u[:, :, 1:-1] + u[:, :, 2:]
    k = rows[:, :-2] - 2 * rows[:, 1:-1] + rows[:, 2:]
    out: np.ndarray = np.abs(k, out=k)
    return out


def _half(u: np.ndarray) -> np.ndarray:
    """The 2 x 2 block means of ``u`` ``[N, H, W]`` (an odd last row or column dropped)."""
    h, w = u.shape[1] // 2 * 2, u.shape[2] // 2 * 2
    half: np.ndarray = (
        u[:, 0:h:2, 0:w:2] + u[:, 0:h:2, 1:w:2] + u[:, 1:h:2, 0:w:2] + u[:, 1:h:2, 1:w:2]
    ) * 0.25
    return half


_KEY_SHIFT = 18
"""Bits dropped from a value's ordered key to make its bucket in :func:`_order_statistics`: 16,384 buckets,
measured the quickest (or within 10 % of it) of 1,024 to 262,144 on 64², 128² and 256² model inputs."""


def _order_statistics(rows: np.ndarray, ranks: Sequence[int]) -> np.ndarray:
    """The ``ranks``-th smallest values (0-based) of each float32 row, exactly ``np.sort(rows)[:, ranks]``
    up to the sign of a zero, 3-8x quicker than sorting a 256 x 256 plane (bench/RESULTS.md, session 15).

    A radix select: each value's bits, made an order-preserving integer key (a negative float's lower 31
    bits flipped), are bucketed by their top 14 bits; one ``bincount`` and its running sum say which bucket
    holds each wanted rank and how many values lie below it, and only that bucket's few values are
    partitioned. The values returned are the row's own, so the quantile arithmetic after it is unchanged.
    NaNs do not sort as ``np.sort`` puts them; callers mark rows that hold one (numpy answers NaN there)."""
    wanted = np.asarray(ranks, dtype=np.int64)
    buckets = 1 << (32 - _KEY_SHIFT)
    out = np.empty((len(rows), len(wanted)), rows.dtype)
    for i, row in enumerate(np.ascontiguousarray(rows, dtype=np.float32)):
        bits = row.view(np.int32)
        keys = bits ^ ((bits >> 31) & 0x7FFFFFFF)
        bucket = (keys >> _KEY_SHIFT) + (buckets >> 1)
        counts = np.bincount(bucket, minlength=buckets)
        ends = np.cumsum(counts)
        where = np.searchsorted(ends, wanted, side="right")
        for b in np.unique(where):
            hit = where == b
            local = wanted[hit] - (ends[b] - counts[b])
            out[i, hit] = np.partition(row[bucket == b], local)[local]
    return out


def _quantiles(rows: np.ndarray, percents: Sequence[float]) -> np.ndarray:
    """``np.percentile(rows, percents, axis=1).T`` of float32 rows, in numpy's own arithmetic (its default
    "linear" method, numpy/lib/_function_base_impl.py ``_quantile`` and ``_lerp``): the virtual index
    ``(n - 1) q``, the values at its floor and the next index (:func:`_order_statistics`), and
    ``a + (b - a) g``, or ``b - (b - a)(1 - g)`` from ``g >= 0.5``, with ``g`` a float64 so that the result
    is float64 as numpy's is. A row with a NaN gives NaN, as numpy's does."""
    n = rows.shape[1]
    if n == 0:
        return np.full((len(rows), len(percents)), np.nan)
    virtual = [(q / 100) * (n - 1) for q in percents]
    below = [int(np.floor(v)) for v in virtual]
    ranks = sorted({*below, *(min(k + 1, n - 1) for k in below)})
    values = _order_statistics(rows, ranks)
    column = {rank: values[:, j] for j, rank in enumerate(ranks)}
    columns = []
    for v, k in zip(virtual, below, strict=True):
        gamma = np.float64(v - k)
        a, b = column[k], column[min(k + 1, n - 1)]
        diff = b - a
        columns.append(a + diff * gamma if gamma < 0.5 else b - diff * (1 - gamma))
    out = np.stack(columns, axis=1)
    out[np.isnan(rows).any(axis=1)] = np.nan
    return out


def _median(rows: np.ndarray) -> np.ndarray:
    """``np.median(rows, axis=1)`` of float32 rows: the middle value, or numpy's mean of the two middle
    values (in the rows' dtype, as ``np.median`` takes it); NaN where a row has one."""
    n = rows.shape[1]
    if n == 0:
        return np.full(len(rows), np.nan, rows.dtype)
    if n % 2:
        middle = _order_statistics(rows, [n // 2])[:, 0]
    else:
        middle = np.mean(_order_statistics(rows, [n // 2 - 1, n // 2]), axis=1)
    median: np.ndarray = np.where(np.isnan(rows).any(axis=1), np.nan, middle).astype(rows.dtype)
    return median


class _Planes:
    """One chunk of model inputs, unnormalised, and the planes both feature vectors use, each made once."""

    def __init__(self, images: np.ndarray, spec: PreprocessSpec) -> None:
        # The normalisation undone (``x * std + mean``): the features are in the VOI output's [0, 1] whatever
        # the card's mean and std, and the padding of a non-square image is 0.
        self.u: np.ndarray = images[:, 0].astype(np.float32) * spec.std + spec.mean

    @functools.cached_property
    def half(self) -> np.ndarray:
        return _half(self.u)

    @functools.cached_property
    def laplacian(self) -> np.ndarray:
        return _laplacian(self.u)

    @functools.cached_property
    def laplacian_half(self) -> np.ndarray:
        return _laplacian(self.half)

    def input_statistics(self) -> np.ndarray:
        u = self.u
        n, h, w = u.shape
        flat = u.reshape(n, -1)
        gradient = np.abs(np.diff(u, axis=1)).mean(axis=(1, 2)) + np.abs(np.diff(u, axis=2)).mean(axis=(1, 2))
        gh, gw = h // _GRID, w // _GRID
        blocks = u[:, : gh * _GRID, : gw * _GRID].reshape(n, _GRID, gh, _GRID, gw).mean(axis=(2, 4))
        columns = [
            _quantiles(flat, _QUANTILES),
            flat.mean(axis=1, keepdims=True),
            flat.std(axis=1, keepdims=True),
            (flat <= 0.005).mean(axis=1, keepdims=True),
            (flat >= 0.995).mean(axis=1, keepdims=True),
            gradient[:, None],
            self.laplacian[:, None],
            self.laplacian_half[:, None],
            blocks.reshape(n, -1),
        ]
        return np.concatenate(columns, axis=1).astype(np.float64)

    def texture_statistics(self) -> np.ndarray:
        n = len(self.u)
        k = _noise_kernel(self.u).reshape(n, -1)
        k_half = _noise_kernel(self.half).reshape(n, -1)
        lap, lap_half = self.laplacian + _TINY, self.laplacian_half + _TINY
        columns = [
            np.log(k.mean(axis=1) + _TINY),
            np.log(_median(k) + _TINY),
            np.log(lap),
            np.log(lap_half),
            np.log(lap / lap_half),
            np.log(_median(k_half) + _TINY),
        ]
        return np.stack(columns, axis=1).astype(np.float64)


_SOURCES = {
    "input": (_Planes.input_statistics, len(INPUT_FEATURES)),
    "texture": (_Planes.texture_statistics, len(TEXTURE_FEATURES)),
}


def gate_statistics(
    images: np.ndarray, spec: PreprocessSpec, sources: Sequence[str]
) -> dict[str, np.ndarray]:
    """The feature vectors named in ``sources`` (``"input"``, ``"texture"``) of preprocessed model inputs
    ``[N, 1, H, W]``, each float64 ``[N, features]``, from one pass of :data:`_CHUNK` images at a time
    (the same numbers as one pass over all: nothing is reduced across images)."""
    out = {name: np.empty((len(images), _SOURCES[name][1]), np.float64) for name in sources}
    for start in range(0, len(images), _CHUNK):
        planes = _Planes(images[start : start + _CHUNK], spec)
        for name in sources:
            out[name][start : start + len(planes.u)] = _SOURCES[name][0](planes)
    return out


def input_statistics(images: np.ndarray, spec: PreprocessSpec) -> np.ndarray:
    """Intensity quantiles, mean, spread and saturation, edge and Laplacian energy at two scales and a
    4 x 4 layout of block means of preprocessed model inputs ``[N, 1, H, W]``: float64
    ``[N, len(INPUT_FEATURES)]``."""
    return gate_statistics(images, spec, ("input",))["input"]


def texture_statistics(images: np.ndarray, spec: PreprocessSpec) -> np.ndarray:
    """The finest-scale features of preprocessed model inputs ``[N, 1, H, W]``; float64
    ``[N, len(TEXTURE_FEATURES)]``, in the VOI output's ``[0, 1]`` like :func:`input_statistics`.

    Logarithms, because sharpening and noise multiply these amplitudes: a Mahalanobis distance then weighs
    "twice as much" alike at every exposure.
    """
    return gate_statistics(images, spec, ("texture",))["texture"]
