"""What looks like a finding and is not: pneumothorax and nodule mimics, and support devices.

A model that learned "a line near the chest wall" or "a spot without markings" instead of the pleural line
would flag these; drawing them in negatives (and, at the same rates, in positives, so they carry no label)
is what makes the evaluation test the sign rather than its neighbours. From the radiology teaching on
pneumothorax pitfalls (e.g. skin folds, bullae and the medial scapular border; Gupta et al., Radiographics
2012 on its mimics) and on nodule mimics (nipple shadows, calcified granulomas):

- **skin fold**: a density *edge* (not a thin line) that runs past the lung outline, markings on both sides;
- **bulla**: a round lucency without markings behind a thin curved wall, convex towards the chest wall;
- **scapular edge**: the medial border of the scapula over the upper lateral lung, continuing above it;
- **nipple shadows**: small soft round densities in the lower zones, often on both sides;
- **calcified granulomas**: tiny, very dense dots;
- **devices**: central venous catheters, endotracheal and nasogastric tubes, ECG electrodes with their
  leads (more often on AP portable films).

Each returns the names of what it drew (``labels.csv`` column ``info_extras``), for subgroup analysis.
"""

from __future__ import annotations

import numpy as np

from training.data.synthetic.common import blur, ramp

__all__ = ["add_devices", "add_mimics"]


def add_mimics(
    att: np.ndarray,
    lung: np.ndarray,
    gap: np.ndarray,
    x: np.ndarray,
    y: np.ndarray,
    s: float,
    body_w: float,
    rng: np.random.Generator,
) -> list[str]:
    """Draw the mimics this film has into ``att``; return their names."""
    drawn: list[str] = []
    if rng.random() < 0.2:  # skin fold: a soft-tissue step ending at a sharp edge, crossing the lung edge
        side = rng.choice((-1, 1))
        y0 = rng.uniform(-0.1, 0.1)
        curve = side * rng.uniform(0.2, 0.34) + rng.uniform(-1, 1) * (y - y0) ** 2
        inside = (curve - x) * side  # > 0 on the medial side of the fold
        step = ramp(inside * s / 1.2) * np.exp(-np.clip(inside, 0, None) * s / rng.uniform(10, 30))
        att += rng.uniform(0.015, 0.04) * step * ramp((0.32 - np.abs(y - y0)) * s / 20)
        drawn.append("skin_fold")
    if rng.random() < 0.1 and _add_bulla(att, lung, gap, x, y, s, rng):
        drawn.append("bulla")
    if rng.random() < 0.35:  # medial scapular border over the upper lateral lung
        side = rng.choice((-1, 1))
        top, bottom = rng.uniform(-0.42, -0.36), rng.uniform(-0.1, 0.02)
        border = side * (body_w * rng.uniform(0.62, 0.75)) + rng.uniform(-0.15, 0.05) * side * (y - top)
        lateral = (x - border) * side
        span = ramp((y - top) * s / 4) * ramp((bottom - y) * s / 12)
        amp = rng.uniform(0.015, 0.035)
        att += amp * (ramp(lateral * s / 1.5) * 0.6 + np.exp(-((lateral * s / 1.5) ** 2))) * span
        drawn.append("scapula")
    if rng.random() < 0.15:  # nipple shadows, one or both sides
        ny = rng.uniform(0.1, 0.2)
        for side in (-1, 1) if rng.random() < 0.6 else (rng.choice((-1, 1)),):
            r = rng.uniform(0.011, 0.018)
            d = np.sqrt((x - side * rng.uniform(0.19, 0.26)) ** 2 + (y - ny - rng.uniform(-0.01, 0.01)) ** 2)
            att += rng.uniform(0.03, 0.06) * ramp((r - d) * s / 2.5)
        drawn.append("nipple")
    if rng.random() < 0.15:  # calcified granulomas: tiny dense dots inside the lung
        rows, cols = att.shape
        for _ in range(int(rng.integers(1, 4))):
            iy, ix = int(rng.uniform(0, rows)), int(rng.uniform(0, cols))
            if lung[iy, ix] > 0.7:
                d = np.sqrt((x - x[0, ix]) ** 2 + (y - y[iy, 0]) ** 2)
                att += rng.uniform(0.12, 0.25) * ramp((rng.uniform(0.003, 0.007) - d) * s / 1.2)
        drawn.append("granuloma")
    return drawn


def _add_bulla(
    att: np.ndarray,
    lung: np.ndarray,
    gap: np.ndarray,
    x: np.ndarray,
    y: np.ndarray,
    s: float,
    rng: np.random.Generator,
) -> bool:
    rows, cols = att.shape
    for _attempt in range(30):
        iy, ix = int(rng.uniform(0, rows * 0.55)), int(rng.uniform(0, cols))
        if lung[iy, ix] > 0.9 and gap[iy, ix] < 0.05:
            break
    else:
        return False
    radius = rng.uniform(0.025, 0.06)
    m = int(radius * s * 1.5 + 4)
    y0, y1, x0, x1 = max(0, iy - m), min(rows, iy + m), max(0, ix - m), min(cols, ix + m)
    d = np.sqrt((x[:, x0:x1] - x[0, ix]) ** 2 + (y[y0:y1] - y[iy, 0]) ** 2)
    inside = ramp((radius - d) * s / 1.5)
    crop = att[y0:y1, x0:x1]
    smooth = blur(crop, 6.0)  # no markings inside: the crop's local mean, a little more lucent
    wall = np.exp(-(((d - radius) * s / 1.2) ** 2))
    att[y0:y1, x0:x1] = crop * (1 - inside) + (smooth - rng.uniform(0.0, 0.02)) * inside
    att[y0:y1, x0:x1] += rng.uniform(0.02, 0.045) * wall
    return True


def _polyline(shape: tuple[int, int], xs: np.ndarray, ys: np.ndarray, width: float) -> np.ndarray:
    """A soft line through points given in pixels (dense points rasterised, then blurred)."""
    line = np.zeros(shape, np.float32)
    ok = (xs >= 0) & (xs < shape[1] - 1) & (ys >= 0) & (ys < shape[0] - 1)
    line[np.rint(ys[ok]).astype(int), np.rint(xs[ok]).astype(int)] = 1.0
    out = blur(line, width)
    return out / max(float(out.max()), 1e-6)


def add_devices(
    att: np.ndarray, x: np.ndarray, y: np.ndarray, s: float, rng: np.random.Generator, ap: bool
) -> list[str]:
    """Catheters, tubes and ECG electrodes (AP portable films have them far more often)."""
    rows, cols = att.shape
    rate = 0.4 if ap else 0.05
    drawn: list[str] = []
    cx, cy = cols / 2 - x[0, cols // 2] * s, rows / 2 - y[rows // 2, 0] * s  # pixel of the origin

    def px(u: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return cx + u * s, cy + v * s

    t = np.linspace(0, 1, 3 * max(rows, cols))
    if rng.random() < rate:  # central venous catheter: from the shoulder over the SVC
        side = rng.choice((-1, 1))
        u = side * (0.32 * (1 - t) ** 2 + 0.12 * 2 * t * (1 - t)) + 0.02 * t**2
        v = -0.36 * (1 - t) ** 2 - 0.3 * 2 * t * (1 - t) + rng.uniform(-0.14, -0.06) * t**2
        att += rng.uniform(0.08, 0.15) * _polyline(att.shape, *px(u, v), 0.9)
        drawn.append("cvc")
    if rng.random() < rate * 0.6:  # endotracheal tube: two parallel walls in the midline
        end = rng.uniform(-0.28, -0.18)
        v = -0.55 + (end + 0.55) * t
        for off in (-0.008, 0.008):
            att += 0.07 * _polyline(att.shape, *px(np.full_like(t, off + 0.005), v), 0.8)
        drawn.append("ett")
    if rng.random() < rate * 0.6:  # nasogastric tube: down the midline to below the left hemidiaphragm
        u = 0.01 + 0.1 * np.clip((t - 0.7) / 0.3, 0, 1) ** 2
        v = -0.55 + 0.9 * t
        att += rng.uniform(0.05, 0.1) * _polyline(att.shape, *px(u, v), 0.9)
        drawn.append("ngt")
    if rng.random() < rate * 1.2:  # ECG electrodes: dense rings with a lead each
        for _ in range(int(rng.integers(2, 5))):
            ex, ey = rng.uniform(-0.4, 0.4), rng.uniform(-0.4, 0.1)
            d = np.sqrt((x - ex) ** 2 + (y - ey) ** 2)
            att += 0.2 * ramp((0.012 - d) * s / 1.5) * ramp((d - 0.006) * s / 1.5)
            lead_u = ex + rng.uniform(-0.2, 0.2) * t + rng.uniform(-0.05, 0.05) * np.sin(3 * t)
            att += 0.06 * _polyline(att.shape, *px(lead_u, ey - 0.5 * t), 0.7)
        drawn.append("ecg")
    return drawn
