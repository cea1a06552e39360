"""The population stability index (PSI) of a sliding window against a reference, per feature.

PSI = sum over bins of (w_i - r_i) * ln(w_i / r_i), with r_i and w_i the fractions of the reference and
of the window in bin i: the symmetrised Kullback-Leibler divergence of the two binned distributions
(Siddiqi, *Credit Risk Scorecards*, Wiley 2006, ch. 8; Yurdakul, *Statistical properties of population
stability index*, 2018). The usual reading: below 0.1 stable, 0.1 to 0.25 a moderate shift, above 0.25 a
significant one. Chosen over a Kolmogorov-Smirnov statistic because one index covers categories
(manufacturer, image size) and numbers alike, so one threshold serves every feature.

Bins come from the reference only: a feature whose reference takes at most :data:`BINS` distinct values
(pixel spacing and windows at one site usually do) is binned by value, anything else by the reference's
deciles (equal-frequency bins, the usual PSI practice); an absent value is a bin of its own. Counts are
smoothed by adding one half to every bin (Jeffreys), so a bin empty on one side gives a large but finite
index. Under no change, n_ref * n_win / (n_ref + n_win) * PSI is about chi-square with (bins - 1) degrees
of freedom (Yurdakul 2018): with 10 bins and 300 studies on each side it stays below 0.25 with
probability > 0.9999, which is why the window must be full before an alarm is raised.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Hashable, Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["BINS", "BinnedReference", "histogram", "psi"]

BINS = 10
"""Decile bins for continuous features; also the most distinct values binned by value."""

Value = float | str | None


def _edges(reference: Sequence[Value]) -> np.ndarray | None:
    """Decile edges of a continuous reference; None when it is binned by value (categories, or numbers
    with at most :data:`BINS` distinct values)."""
    present = [v for v in reference if v is not None]
    if any(isinstance(v, str) for v in present) or len(set(present)) <= BINS:
        return None
    return np.unique(np.quantile(np.asarray(present, dtype=np.float64), np.arange(1, BINS) / BINS))


def histogram(edges: np.ndarray | None, values: Sequence[Value]) -> Counter[Hashable]:
    """Counts per bin (see the module docstring); vectorised, since the monitor runs on the event loop."""
    if edges is None:
        return Counter(values)
    numbers = np.asarray([v for v in values if isinstance(v, int | float)], dtype=np.float64)
    counts: Counter[Hashable] = Counter()
    for b, n in enumerate(
        np.bincount(np.searchsorted(edges, numbers, side="right"), minlength=len(edges) + 1)
    ):
        if n:
            counts[b] = int(n)
    if missing := len(values) - len(numbers):  # None, or a stray category: a bin of its own
        counts[None] = missing
    return counts


@dataclass(frozen=True)
class BinnedReference:
    """A reference's bins and counts, computed once: the monitor's reference does not change once full."""

    edges: np.ndarray | None
    counts: Counter[Hashable]
    n: int

    @classmethod
    def of(cls, reference: Sequence[Value]) -> BinnedReference:
        edges = _edges(reference)
        return cls(edges, histogram(edges, reference), len(reference))

    def psi(self, window: Sequence[Value]) -> float:
        """The PSI of ``window`` (non-empty) against this reference."""
        win = histogram(self.edges, window)
        bins = set(self.counts) | set(win)
        n_ref = self.n + 0.5 * len(bins)
        n_win = len(window) + 0.5 * len(bins)
        total = 0.0
        for b in bins:
            r = (self.counts[b] + 0.5) / n_ref
            w = (win[b] + 0.5) / n_win
            total += (w - r) * math.log(w / r)
        return total


def psi(reference: Sequence[Value], window: Sequence[Value]) -> float:
    """The PSI of ``window`` against ``reference`` (both non-empty), on bins fixed by the reference."""
    return BinnedReference.of(reference).psi(window)
