"""Chest radiograph anatomy: body, lungs with vessel markings, heart, diaphragm, ribs and clavicles.

Pictures are float arrays in attenuation-like units (higher = brighter = more attenuating), in coordinates of
the image's short side with the origin at the centre.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from training.data.synthetic.chest_findings import add_nodules
from training.data.synthetic.common import filtered_noise, ramp, upsample

__all__ = ["Chest", "CxrResult", "draw_chest", "render_cxr"]


@dataclass(frozen=True)
class Chest:
    """A patient's chest in units of the image's short side (x: columns, y: rows, origin at the centre)."""

    body_w: float
    lung_cx: float
    lung_cy: float
    lung_a: tuple[float, float]
    lung_top: float
    lung_bottom: float
    dome_y: tuple[float, float]
    dome_h: float
    heart: tuple[float, float, float, float]
    tissue: float
    air: float
    rib_top: float
    rib_period: float
    rib_curve: float


def draw_chest(rng: np.random.Generator) -> Chest:
    a = rng.uniform(0.135, 0.16)
    return Chest(
        body_w=rng.uniform(0.41, 0.47),
        lung_cx=rng.uniform(0.175, 0.2),
        lung_cy=rng.uniform(-0.04, 0.01),
        lung_a=(a, a * rng.uniform(0.9, 0.98)),
        lung_top=rng.uniform(0.27, 0.31),
        lung_bottom=rng.uniform(0.33, 0.38),
        dome_y=(rng.uniform(0.22, 0.27), rng.uniform(0.24, 0.29)),
        dome_h=rng.uniform(0.04, 0.07),
        heart=(
            rng.uniform(0.04, 0.07),
            rng.uniform(0.13, 0.17),
            rng.uniform(0.14, 0.18),
            rng.uniform(0.1, 0.13),
        ),
        tissue=rng.uniform(0.55, 0.68),
        air=rng.uniform(0.28, 0.36),
        rib_top=rng.uniform(-0.36, -0.32),
        rib_period=rng.uniform(0.058, 0.068),
        rib_curve=rng.uniform(1.1, 1.5),
    )


@dataclass
class CxrResult:
    att: np.ndarray
    boxes: list[tuple[float, float, float, float]]
    pneumothorax: int
    ptx_side: str
    ptx_depth: float
    nodule_radii: list[float]


def render_cxr(chest: Chest, rng: np.random.Generator, rows: int, cols: int, ap: bool) -> CxrResult:
    """Attenuation-like picture of one frontal chest radiograph (higher = brighter = more attenuating)."""
    s = min(rows, cols) * rng.uniform(0.96, 1.04)
    x = ((np.arange(cols, dtype=np.float32) + 0.5 - cols / 2) / s + rng.uniform(-0.02, 0.02))[None, :]
    y = ((np.arange(rows, dtype=np.float32) + 0.5 - rows / 2) / s + rng.uniform(-0.02, 0.02))[:, None]
    ax = np.abs(x)
    inspiration = rng.uniform(-0.02, 0.02)
    hcx, hcy, ha, hb = chest.heart
    if ap:
        ha, hb = ha * 1.12, hb * 1.06

    body_t = np.sqrt(np.clip(1 - (x / chest.body_w) ** 2, 0, 1))
    body = ramp((chest.body_w - ax) * s / 3) * (0.45 + 0.55 * body_t)
    spine = 0.06 * ramp((0.04 - ax) * s / 3)
    att = np.repeat(chest.tissue * body + spine, rows, axis=0)

    def heart_mask(xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
        return ramp((1 - ((xs - hcx) / ha) ** 2 - ((ys - hcy) / hb) ** 2) / 0.25)

    # Lung texture: ridges of band-passed noise look like branching vessels; a lower band gives mottling.
    vessels, mottle = filtered_noise(rng, (rows // 2, cols // 2), ((0.075, 0.035), (0.025, 0.015)))
    texture = upsample(np.exp(-((vessels / 0.45) ** 2)) + 0.35 * mottle, rows, cols)
    tex_amp = rng.uniform(0.06, 0.09)
    lung_full = np.zeros((rows, cols), np.float32)
    ptx_full = np.zeros((rows, cols), np.float32)

    has_ptx = rng.random() < 0.45
    ptx_side = int(rng.choice((-1, 1)))
    depth_kind = rng.random()
    depth = rng.uniform(0.1, 0.18) if depth_kind < 0.35 else rng.uniform(0.18, 0.35)
    if depth_kind > 0.75:
        depth = rng.uniform(0.35, 0.6)
    theta0, extent = rng.uniform(-1.5, -0.7), rng.uniform(0.9, 1.5)
    line_amp, ptx_dark = rng.uniform(0.04, 0.08), rng.uniform(0.02, 0.05)

    for i, side in enumerate((-1, 1)):
        cx, a = side * chest.lung_cx, chest.lung_a[i]
        cy = chest.lung_cy + inspiration
        r0 = max(0, int((cy - chest.lung_top - rng.uniform(0, 0.01) + rows / 2 / s - 0.02) * s))
        r1 = min(rows, int((cy + chest.lung_bottom + rows / 2 / s + 0.02) * s))
        c0 = max(0, int((cx - a - 0.02 + cols / 2 / s) * s))
        c1 = min(cols, int((cx + a + 0.02 + cols / 2 / s) * s))
        xs, ys = x[:, c0:c1], y[r0:r1]
        u = (xs - cx) / a
        v = np.where(ys < cy, (ys - cy) / chest.lung_top, (ys - cy) / chest.lung_bottom)
        r2 = u * u + v * v
        dome = (
            chest.dome_y[i]
            + inspiration
            - chest.dome_h * np.clip(1 - ((xs - cx - side * 0.3 * a) / a) ** 2, 0, 1)
        )
        lung = ramp((1 - r2) / 0.07) * ramp((dome - ys) * s / 4)
        lung *= 1 - 0.85 * heart_mask(xs, ys)
        thick = np.sqrt(np.clip(1 - r2, 0, 1))
        hx, hy = cx - side * 0.55 * a, cy + 0.04
        fade = 0.3 + 0.7 * np.exp(-np.sqrt((xs - hx) ** 2 + (ys - hy) ** 2) / (0.6 * a))
        tex = texture[r0:r1, c0:c1] * fade
        air = chest.air * (0.6 + 0.4 * thick) * lung
        if has_ptx and side == ptx_side:
            rr = np.sqrt(r2)
            theta = np.arctan2(v, u * side)
            taper = np.clip(np.cos((theta - theta0) / extent * (np.pi / 2)), 0, 1)
            taper *= np.abs(theta - theta0) < extent
            rp = 1 - depth * taper**0.5
            edge = 1.0 / (np.sqrt(a * chest.lung_top) * s)
            ptx = ramp((rr - rp) / edge) * lung
            line = (
                np.exp(-(((rr - rp) / (rng.uniform(1.2, 2.0) * edge)) ** 2)) * lung * np.clip(taper * 6, 0, 1)
            )
            tex = tex * (1 - ptx)
            air = air + ptx_dark * ptx - 0.25 * depth * chest.air * (lung - ptx)
            att[r0:r1, c0:c1] += line_amp * line
            ptx_full[r0:r1, c0:c1] = ptx
        att[r0:r1, c0:c1] += tex_amp * tex * lung - air
        lung_full[r0:r1, c0:c1] = lung

    # The heart shadow is where the lungs are not (above); ribs are seen mainly against lung.
    _add_ribs(att, chest, x, y, s, lung_full)
    if rng.random() < 0.15:  # a skin fold: a line without loss of texture, crossing the lung edge
        fx = rng.choice((-1, 1)) * rng.uniform(0.2, 0.34)
        curve = fx + rng.uniform(-1, 1) * (y - rng.uniform(-0.1, 0.1)) ** 2
        att += (
            rng.uniform(0.015, 0.035)
            * np.exp(-(((x - curve) * s / 1.5) ** 2))
            * ramp((0.3 - np.abs(y)) * s / 20)
        )
    if rng.random() < 0.5:  # gastric bubble under the left hemidiaphragm
        gx, gy = (
            chest.lung_cx + rng.uniform(-0.02, 0.04),
            chest.dome_y[1] + inspiration + rng.uniform(0.05, 0.08),
        )
        att -= 0.12 * ramp((1 - ((x - gx) / 0.06) ** 2 - ((y - gy) / 0.035) ** 2) / 0.2)

    boxes, radii = add_nodules(att, lung_full, ptx_full, rng, min(rows, cols) / 512)
    return CxrResult(
        att,
        boxes,
        int(has_ptx),
        ("R" if ptx_side < 0 else "L") if has_ptx else "",
        float(depth) if has_ptx else 0.0,
        radii,
    )


def _add_ribs(
    att: np.ndarray, chest: Chest, x: np.ndarray, y: np.ndarray, s: float, lung: np.ndarray
) -> None:
    """Posterior ribs as curved bright bands (a periodic phase in y bent with distance from the spine)."""
    rows = att.shape[0]
    r0 = max(0, int((chest.rib_top - 0.03 + rows / 2 / s) * s))
    r1 = min(rows, int((max(chest.dome_y) + 0.05 + rows / 2 / s) * s))
    ys, d = y[r0:r1], np.abs(x)
    phase = (ys - chest.rib_top + 0.08 * d - chest.rib_curve * d * d) / chest.rib_period
    posterior = ramp((np.cos(2 * np.pi * phase) - 0.3) / 0.4)
    anterior_phase = (ys - chest.rib_top + 0.05 - 0.35 * (0.4 - d)) / (chest.rib_period * 1.25)
    anterior = ramp((np.cos(2 * np.pi * anterior_phase) - 0.4) / 0.4) * ramp((d - 0.05) * s / 6)
    envelope = ramp((chest.body_w * 0.93 - d) * s / 6) * ramp((d - 0.025) * s / 4)
    vertical = ramp((ys - chest.rib_top + 0.04) * s / 6) * ramp((max(chest.dome_y) + 0.04 - ys) * s / 10)
    att[r0:r1] += (0.05 * posterior + 0.025 * anterior) * envelope * vertical * (0.3 + 0.7 * lung[r0:r1])
    clav_y = chest.rib_top - 0.035 - 0.12 * (d - 0.05)
    att += (
        0.05 * ramp((0.02 - np.abs(y - clav_y)) * s / 3) * ramp((0.3 - d) * s / 8) * ramp((d - 0.04) * s / 4)
    )
