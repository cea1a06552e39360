"""Chest findings: pulmonary nodules (and, drawn with the lung, pneumothorax)."""

from __future__ import annotations

import numpy as np

from training.data.synthetic.common import ramp

__all__ = ["add_nodules"]


def add_nodules(
    att: np.ndarray, lung: np.ndarray, ptx: np.ndarray, rng: np.random.Generator, px_scale: float
) -> tuple[list[tuple[float, float, float, float]], list[float]]:
    """Zero to three round opacities inside the lung fields; boxes in source pixels."""
    rows, cols = att.shape
    count = 0 if rng.random() < 0.5 else int(rng.choice((1, 1, 1, 2, 2, 3)))
    boxes: list[tuple[float, float, float, float]] = []
    radii: list[float] = []
    for _ in range(count):
        radius = rng.uniform(5.0, 16.0) * px_scale
        subtle = rng.random() < 0.2
        amp = rng.uniform(0.035, 0.055) if subtle else rng.uniform(0.06, 0.16)
        for _attempt in range(40):
            cy, cx = rng.uniform(0, rows), rng.uniform(0, cols)
            iy, ix = int(cy), int(cx)
            if (
                lung[iy, ix] > 0.8
                and ptx[iy, ix] < 0.1
                and all(
                    (cx - (b[0] + b[2]) / 2) ** 2 + (cy - (b[1] + b[3]) / 2) ** 2 > (3 * radius) ** 2
                    for b in boxes
                )
            ):
                break
        else:
            continue
        m = int(radius * 1.6 + 3)
        y0, y1, x0, x1 = max(0, iy - m), min(rows, iy + m), max(0, ix - m), min(cols, ix + m)
        yy = np.arange(y0, y1, dtype=np.float32)[:, None] + 0.5 - cy
        xx = np.arange(x0, x1, dtype=np.float32)[None, :] + 0.5 - cx
        r = np.sqrt(xx * xx + yy * yy)
        edge = 0.25 * radius + 0.8
        profile = ramp((radius - r) / edge) * (0.55 + 0.45 * np.sqrt(np.clip(1 - (r / radius) ** 2, 0, 1)))
        att[y0:y1, x0:x1] += amp * profile
        boxes.append(
            (
                max(0.0, cx - radius),
                max(0.0, cy - radius),
                min(float(cols), cx + radius),
                min(float(rows), cy + radius),
            )
        )
        radii.append(round(radius, 1))
    return boxes, radii
