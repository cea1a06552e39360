"""Chest acquisition and vendor processing: scatter, collimation, exposure, quantum noise, edge enhancement,
tone curves, and the stored 12-bit values with their VOI window.

Why vendor processing belongs in the generator: every CR/DX console applies unsharp masking (often at two
scales) and an S-shaped tone curve before an image reaches PACS, with strengths that differ per vendor and
per site. Issue 14 measured that a model trained without them loses all specificity on an unsharp-masked
film. The generator therefore draws, per film, one of: no processing; single-scale unsharp masking
(kernel 3-15 px at 512 px, gain 0.2-1.2); or two-scale enhancement; and a linear or sigmoid tone curve. The
name goes to ``labels.csv`` (``info_processing``) so the card can report results per processing chain.
Heavier processing than this range stays outside the model's validated domain and is the gate's business.
"""

from __future__ import annotations

import numpy as np

from training.data.synthetic.common import blur, ramp

__all__ = ["cxr_stored"]


def _collimate(att: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Unexposed margins outside the collimator blades are bright (high attenuation), with soft edges."""
    rows, cols = att.shape
    top, bottom = rng.uniform(0, 0.04, 2) * rows
    left, right = rng.uniform(0, 0.07, 2) * cols
    r = np.arange(rows, dtype=np.float32)[:, None]
    c = np.arange(cols, dtype=np.float32)[None, :]
    open_ = (
        ramp((r - top) / 2)
        * ramp((rows - bottom - r) / 2)
        * ramp((c - left) / 2)
        * ramp((cols - right - c) / 2)
    )
    collimated: np.ndarray = att * open_ + (1 - open_) * float(att.max()) * rng.uniform(1.0, 1.1)
    return collimated


def _vendor_processing(
    signal: np.ndarray, rng: np.random.Generator, px_scale: float
) -> tuple[np.ndarray, str]:
    """Edge enhancement as consoles apply it (``out = in + gain * (in - blur(in))``), then a tone curve."""
    lo, hi = np.percentile(signal[::4, ::4], [1.0, 99.5])
    span = max(float(hi - lo), 1.0)
    kind = rng.random()
    names = []
    if kind < 0.3:
        names.append("none")
    elif kind < 0.75:
        sigma, gain = rng.uniform(3, 15) * px_scale, rng.uniform(0.2, 1.2)
        signal = signal + gain * (signal - blur(signal, sigma))
        names.append("unsharp")
    else:
        for sigma, gain in (
            (rng.uniform(2, 5), rng.uniform(0.2, 0.6)),
            (rng.uniform(12, 30), rng.uniform(0.2, 0.6)),
        ):
            signal = signal + gain * (signal - blur(signal, sigma * px_scale))
        names.append("multiscale")
    if rng.random() < 0.6:  # an S-shaped tone curve over the useful range
        k = rng.uniform(3.0, 7.0)
        z = (signal - lo) / span - 0.5 + rng.uniform(-0.08, 0.08)
        curve = 1 / (1 + np.exp(-k * z))
        lo_c, hi_c = 1 / (1 + np.exp(k * 0.5)), 1 / (1 + np.exp(-k * 0.5))
        signal = lo + span * (curve - lo_c) / (hi_c - lo_c)
        names.append("sigmoid")
    else:
        names.append("linear")
    return signal.astype(np.float32), "+".join(names)


def cxr_stored(
    att: np.ndarray, rng: np.random.Generator, monochrome1: bool, ap: bool = False
) -> tuple[np.ndarray, float, float, str]:
    """Attenuation → 12-bit stored values; returns ``(stored, window centre, window width, processing)``."""
    px_scale = min(att.shape) / 512
    scatter = rng.uniform(0.05, 0.25) * (1.5 if ap else 1.0)  # scatter veils contrast, more without a grid
    att = att * (1 - scatter) + scatter * blur(att, 40 * px_scale)
    if rng.random() < 0.4:
        att = _collimate(att, rng)
    gain, offset, gamma = rng.uniform(3000, 4200), rng.uniform(80, 300), rng.uniform(0.85, 1.15)
    signal = offset + gain * np.clip(att, 0, None) ** gamma
    sd = rng.uniform(6, 16) * (1.4 if ap else 1.0)
    signal += rng.standard_normal(att.shape, dtype=np.float32) * (sd * np.sqrt(signal / 1000 + 0.2))
    signal, processing = _vendor_processing(signal, rng, px_scale)
    stored = np.clip(np.rint(signal), 0, 4095)
    lo, hi = np.percentile(stored[::4, ::4], [1.0, 99.5])
    center = (lo + hi) / 2 + rng.uniform(-0.05, 0.05) * (hi - lo)
    width = (hi - lo) * rng.uniform(0.95, 1.25)
    if monochrome1:
        stored, center = 4095 - stored, 4095 - center
    return stored.astype(np.uint16), round(float(center), 1), round(float(width), 1), processing
