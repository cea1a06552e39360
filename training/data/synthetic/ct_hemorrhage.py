"""Intracranial hemorrhage on head CT: where it sits, its shape, its HU, and its per-pixel mask."""

from __future__ import annotations

from typing import Any

import numpy as np

from training.data.synthetic.common import ramp

__all__ = ["draw_hemorrhage", "paint_hemorrhage"]


def draw_hemorrhage(rng: np.random.Generator, n: int, t_start: float, head_height: float) -> dict[str, Any]:
    ts = t_start + np.arange(n) * 5.0 / head_height
    candidates = np.flatnonzero((ts > 0.3) & (ts < 0.8))
    span = int(rng.integers(2, 7))
    centre = float(rng.choice(candidates)) + (0.5 if span % 2 == 0 else 0.0)
    return {
        "kind": "IPH" if rng.random() < 0.55 else "SDH",
        "hu": rng.uniform(50, 90),
        "centre": centre,
        "half": span / 2,
        "angle": rng.uniform(-np.pi, np.pi),
        "frac": rng.uniform(0.1, 0.6),
        "radii": (rng.uniform(5, 20), rng.uniform(5, 20)),
        "extent": rng.uniform(0.5, 1.1),
        "thick": rng.uniform(3, 12),
        "wobble": rng.uniform(0, 2 * np.pi, 2),
    }


def paint_hemorrhage(
    hem: dict[str, Any],
    k: int,
    hu: np.ndarray,
    x: np.ndarray,
    y: np.ndarray,
    phi: np.ndarray,
    inner: np.ndarray,
    ax: float,
    ay: float,
) -> tuple[int, tuple[float, float, float, float] | None, np.ndarray]:
    dz = (k - hem["centre"]) / (hem["half"] + 0.5)
    if abs(dz) >= 1:
        return 0, None, hu
    zf = float(np.sqrt(1 - dz * dz))
    if hem["kind"] == "IPH":
        px = np.cos(hem["angle"]) * hem["frac"] * ax * 0.75
        py = np.sin(hem["angle"]) * hem["frac"] * ay * 0.75
        rx, ry = hem["radii"][0] * zf, hem["radii"][1] * zf
        ang = np.arctan2(y - py, x - px)
        wobble = 0.12 * np.cos(3 * ang + hem["wobble"][0]) + 0.08 * np.cos(5 * ang + hem["wobble"][1])
        f = 1 - ((x - px) / rx) ** 2 - ((y - py) / ry) ** 2 + wobble
        mask = ramp(f / 0.3) * (inner > 1)
    else:
        d = np.angle(np.exp(1j * (phi - hem["angle"])))
        thick = (
            hem["thick"]
            * zf
            * np.clip(np.cos(d / hem["extent"] * np.pi / 2), 0, 1)
            * (np.abs(d) < hem["extent"])
        )
        mask = ramp((thick - inner) / 1.0) * ramp(inner / 1.0)
    value = hu + (hem["hu"] - hu) * (0.6 + 0.4 * zf)
    hu = hu * (1 - mask) + value * mask
    core = mask > 0.5
    if core.sum() < 8:
        return 0, None, hu
    rows, cols = np.nonzero(core)
    return 1, (float(cols.min()), float(rows.min()), float(cols.max() + 1), float(rows.max() + 1)), hu
