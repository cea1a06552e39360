"""Chest findings: pneumothorax, defined by its visceral pleural line, and pulmonary nodules.

Pneumothorax: air between the visceral and parietal pleura lets the lung fall away from the chest wall. The
radiological sign is a thin white visceral pleural line with **no lung markings beyond it** (Fleischner
glossary, Hansell et al. 2008); a darker band alone is not the sign, and on a real film the band is often
hard to see at full resolution. The models see 128 px, where one pixel is ~3 mm and a real visceral line
is sub-pixel, so here the line is drawn one to one and a half model pixels wide, and the pleural space of a
moderate or larger pneumothorax is darker than the lung it replaces and has no markings (a hyperlucent
rim, as on a real film once the lung has fallen away); thin apical rims (the commonest miss) stay faint,
their line too (version 5: about a third of the larger ones' contrast, so that some rims are missed, as on
real films).
Sizes run from those rims through moderate and large to tension (mediastinal shift and a depressed
hemidiaphragm, drawn by :mod:`.chest_anatomy`). The lungs' normal left-right brightness difference
(``asym`` in :mod:`.chest_anatomy`) keeps brightness alone a weak cue (the shortcut test measures it).

Nodules: round soft-edged opacities of 4-30 mm, most small and faint (lognormal contrast), anywhere in the
lung fields including over ribs and hila; each has a box in source pixels. Calcified granulomas and nipple
shadows (:mod:`.chest_mimics`) look like nodules and are not boxed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from training.data.synthetic.common import ramp

__all__ = ["PTX_SIZES", "Pneumothorax", "add_nodules", "draw_pneumothorax", "pleural_gap"]

PNEUMOTHORAX_RATE = 0.45
PTX_SIZES = {  # name: (probability, depth range as a fraction of the lung radius, angular extent range)
    "rim": (0.3, (0.05, 0.12), (0.5, 0.9)),
    "moderate": (0.4, (0.12, 0.28), (0.8, 1.4)),
    "large": (0.22, (0.28, 0.5), (1.1, 1.6)),
    "tension": (0.08, (0.5, 0.68), (1.4, 1.8)),
}


@dataclass(frozen=True)
class Pneumothorax:
    side: int  # -1: the patient's right (image left), +1: left
    size: str
    depth: float
    theta0: float  # centre of the gap, angle in the lung's own frame (-pi/2: apex, 0: lateral)
    extent: float
    line_amp: float
    line_width: float
    lucency: float  # fraction of the missing markings' mean brightness that is missing too
    dark: float  # extra lucency of the pleural space (air without lung), attenuation units
    collapse: float  # extra density of the collapsed lung, as a fraction of its air


def draw_pneumothorax(rng: np.random.Generator) -> Pneumothorax | None:
    """A pneumothorax for this film (about :data:`PNEUMOTHORAX_RATE` of films) or None."""
    if rng.random() >= PNEUMOTHORAX_RATE:
        return None
    names = list(PTX_SIZES)
    size = names[int(rng.choice(len(names), p=[PTX_SIZES[n][0] for n in names]))]
    _, (d0, d1), (e0, e1) = PTX_SIZES[size]
    large = size in ("large", "tension")
    return Pneumothorax(
        side=int(rng.choice((-1, 1))),
        size=size,
        depth=float(rng.uniform(d0, d1)),
        theta0=float(rng.uniform(-1.75, -1.25) if size == "rim" else rng.uniform(-1.5, -0.7)),
        extent=float(rng.uniform(e0, e1)),
        line_amp=float(rng.uniform(0.1, 0.18) if size != "rim" else rng.uniform(0.03, 0.09)),
        line_width=float(rng.uniform(4.0, 6.0)),
        lucency=float(rng.uniform(0.85, 1.0) if size != "rim" else rng.uniform(0.4, 0.8)),
        collapse=float(rng.uniform(0.12, 0.3) if large else rng.uniform(0.02, 0.08)),
        dark=float(
            rng.uniform(0.09, 0.14)
            if large
            else rng.uniform(0.05, 0.09)
            if size == "moderate"
            else rng.uniform(0.005, 0.02)
        ),
    )


def pleural_gap(
    ptx: Pneumothorax,
    u: np.ndarray,
    v: np.ndarray,
    side: int,
    lung: np.ndarray,
    a: float,
    lung_top: float,
    s: float,
) -> tuple[np.ndarray, np.ndarray]:
    """The pleural space (0..1, where markings are absent) and the visceral pleural line, in one lung's crop.

    ``u``, ``v`` are the lung's own elliptical coordinates (1 at its outline); the visceral pleura sits at
    radius ``1 - depth * taper`` where ``taper`` falls from 1 at ``theta0`` to 0 at ``theta0 +- extent``.
    """
    rr = np.sqrt(u * u + v * v)
    theta = np.arctan2(v, u * side)
    taper = np.clip(np.cos((theta - ptx.theta0) / ptx.extent * (np.pi / 2)), 0, 1)
    taper *= np.abs(theta - ptx.theta0) < ptx.extent
    rp = 1 - ptx.depth * taper**0.5
    edge = 1.0 / (np.sqrt(a * lung_top) * s)  # about one pixel, in units of the lung radius
    gap = ramp((rr - rp) / edge) * lung
    line = np.exp(-(((rr - rp) / (ptx.line_width * edge)) ** 2)) * lung * np.clip(taper * 6, 0, 1)
    return gap.astype(np.float32), line.astype(np.float32)


def add_nodules(
    att: np.ndarray, lung: np.ndarray, gap: np.ndarray, rng: np.random.Generator, px_scale: float
) -> tuple[list[tuple[float, float, float, float]], list[float]]:
    """Zero to three round opacities inside the lung fields; boxes in source pixels."""
    rows, cols = att.shape
    count = 0 if rng.random() < 0.5 else int(rng.choice((1, 1, 1, 2, 2, 3)))
    boxes: list[tuple[float, float, float, float]] = []
    radii: list[float] = []
    for _ in range(count):
        radius = float(np.clip(rng.lognormal(np.log(8.0), 0.35), 4.0, 18.0)) * px_scale
        amp = float(np.clip(rng.lognormal(np.log(0.07), 0.4), 0.03, 0.18))
        for _attempt in range(40):
            cy, cx = rng.uniform(0, rows), rng.uniform(0, cols)
            iy, ix = int(cy), int(cx)
            if (
                lung[iy, ix] > 0.7
                and gap[iy, ix] < 0.1
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
