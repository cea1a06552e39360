"""Chest acquisition: exposure, quantum noise and the stored 12-bit values with their VOI window."""

from __future__ import annotations

import numpy as np

__all__ = ["cxr_stored"]


def cxr_stored(
    att: np.ndarray, rng: np.random.Generator, monochrome1: bool
) -> tuple[np.ndarray, float, float]:
    """Attenuation → 12-bit stored values with exposure, quantum noise and a VOI window."""
    gain, offset, gamma = rng.uniform(3000, 4200), rng.uniform(80, 300), rng.uniform(0.85, 1.15)
    signal = offset + gain * np.clip(att, 0, None) ** gamma
    sd = rng.uniform(6, 16)
    signal += rng.standard_normal(att.shape, dtype=np.float32) * (sd * np.sqrt(signal / 1000 + 0.2))
    stored = np.clip(np.rint(signal), 0, 4095)
    lo, hi = np.percentile(stored[::4, ::4], [1.0, 99.5])
    center = (lo + hi) / 2 + rng.uniform(-0.05, 0.05) * (hi - lo)
    width = (hi - lo) * rng.uniform(0.95, 1.25)
    if monochrome1:
        stored, center = 4095 - stored, 4095 - center
    return stored.astype(np.uint16), round(float(center), 1), round(float(width), 1)
