"""Chest radiograph anatomy: body and breasts, lungs with tapering vessel markings and hila, heart and
mediastinum, diaphragm domes, ribs with posterior and anterior arcs, clavicles.

Pictures are float arrays in attenuation-like units (higher = brighter = more attenuating), drawn in
coordinates of the image's short side with the origin at the centre. Vessel markings are strongest at the
hila and fade to almost nothing in the outer third of the lung, as on a real film: that is what makes a thin
apical pneumothorax rim hard (its missing markings are missing against a periphery that has few), and what
makes the visceral pleural line, not a darker band, the sign the model has to learn (:mod:`.chest_findings`).
The two lungs differ a little in air and thickness in every film, so a left-right brightness difference is
not a label.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from training.data.synthetic.chest_findings import add_nodules, draw_pneumothorax, pleural_gap
from training.data.synthetic.chest_mimics import add_devices, add_mimics
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
    breast: float


def draw_chest(rng: np.random.Generator, sex: str = "M") -> Chest:
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
        breast=rng.uniform(0.03, 0.09) if sex == "F" else rng.uniform(0.0, 0.02),
    )


@dataclass
class CxrResult:
    att: np.ndarray
    boxes: list[tuple[float, float, float, float]]
    pneumothorax: int
    ptx_side: str
    ptx_depth: float
    ptx_size: str
    nodule_radii: list[float]
    extras: list[str] = field(default_factory=list)


def render_cxr(chest: Chest, rng: np.random.Generator, rows: int, cols: int, ap: bool) -> CxrResult:
    """Attenuation-like picture of one frontal chest radiograph, with its findings, mimics and devices."""
    s = min(rows, cols) * rng.uniform(0.96, 1.04)
    x = ((np.arange(cols, dtype=np.float32) + 0.5 - cols / 2) / s + rng.uniform(-0.02, 0.02))[None, :]
    y = ((np.arange(rows, dtype=np.float32) + 0.5 - rows / 2) / s + rng.uniform(-0.02, 0.02))[:, None]
    ax = np.abs(x)
    inspiration = rng.uniform(-0.02, 0.02)
    ptx = draw_pneumothorax(rng)
    hcx, hcy, ha, hb = chest.heart
    if ap:
        ha, hb = ha * 1.12, hb * 1.06
    if ptx is not None and ptx.size == "tension":  # the mediastinum pushed away from the tension side
        hcx -= ptx.side * rng.uniform(0.02, 0.04)

    body_t = np.sqrt(np.clip(1 - (x / chest.body_w) ** 2, 0, 1))
    body = ramp((chest.body_w - ax) * s / 3) * (0.45 + 0.55 * body_t)
    spine = 0.06 * ramp((0.04 - ax) * s / 3)
    att = np.repeat(chest.tissue * body + spine, rows, axis=0)
    mediastinum = 0.05 * ramp((0.06 - np.abs(x - 0.01)) * s / 5) * ramp((0.1 - y) * s / 10)
    att += mediastinum
    if chest.breast > 0.005:  # breast shadows: soft lower-zone densities fading upward
        for side in (-1, 1):
            bx, by = side * rng.uniform(0.2, 0.26), chest.dome_y[0] - rng.uniform(0.02, 0.08)
            rr = ((x - bx) / 0.15) ** 2 + ((y - by) / 0.11) ** 2
            att += (
                chest.breast * rng.uniform(0.8, 1.2) * ramp((1 - rr) / 0.5) * ramp((y - by + 0.12) * s / 25)
            )

    def heart_mask(xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
        return ramp((1 - ((xs - hcx) / ha) ** 2 - ((ys - hcy) / hb) ** 2) / 0.25)

    # Vessel markings: ridges of band-passed noise look like branching vessels; a lower band gives mottling.
    vessels, mottle = filtered_noise(rng, (rows // 2, cols // 2), ((0.075, 0.035), (0.025, 0.015)))
    ridges = np.exp(-((vessels / 0.45) ** 2))
    texture = upsample(ridges - ridges.mean() + 0.35 * mottle, rows, cols)
    marking_mean = float(ridges.mean())
    tex_amp = rng.uniform(0.09, 0.13)
    lung_full = np.zeros((rows, cols), np.float32)
    gap_full = np.zeros((rows, cols), np.float32)
    asym = rng.uniform(-0.04, 0.04)  # one lung a little more aerated: left-right brightness is no label

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
        dome_y = chest.dome_y[i] + inspiration
        if ptx is not None and ptx.size == "tension" and side == ptx.side:
            dome_y += rng.uniform(0.02, 0.04)  # a depressed, flattened hemidiaphragm
        dome = dome_y - chest.dome_h * np.clip(1 - ((xs - cx - side * 0.3 * a) / a) ** 2, 0, 1)
        lung = ramp((1 - r2) / 0.07) * ramp((dome - ys) * s / 4)
        lung *= 1 - 0.85 * heart_mask(xs, ys)
        thick = np.sqrt(np.clip(1 - r2, 0, 1))
        hx, hy = cx - side * 0.55 * a, cy + 0.04
        hilum_d = np.sqrt((xs - hx) ** 2 + (ys - hy) ** 2)
        fade = 0.3 + 0.7 * np.exp(-hilum_d / (0.55 * a))  # markings taper towards the periphery
        hilum = 0.05 * ramp((0.045 - hilum_d) * s / 6)
        markings = (texture[r0:r1, c0:c1] + marking_mean) * fade
        air = chest.air * (0.6 + 0.4 * thick) * lung * (1 + side * asym)
        if ptx is not None and side == ptx.side:
            gap, line = pleural_gap(ptx, u, v, side, lung, a, chest.lung_top, s)
            # Beyond the visceral pleural line: no markings; their mean is partly kept (``lucency``), so the
            # gap is only a little darker than lung, less than the two lungs differ in many normal films.
            markings = markings * (1 - gap) + marking_mean * fade * gap * (1 - ptx.lucency)
            air = air * (1 - ptx.collapse * (1 - gap)) + ptx.dark * gap  # collapsed lung denser, gap darker
            att[r0:r1, c0:c1] += ptx.line_amp * line
            gap_full[r0:r1, c0:c1] = gap
        att[r0:r1, c0:c1] += tex_amp * markings * lung + hilum * lung - air
        lung_full[r0:r1, c0:c1] = np.maximum(lung_full[r0:r1, c0:c1], lung)

    _add_ribs(att, chest, x, y, s, lung_full)
    if rng.random() < 0.5:  # gastric bubble under the left hemidiaphragm
        gx = chest.lung_cx + rng.uniform(-0.02, 0.04)
        gy = chest.dome_y[1] + inspiration + rng.uniform(0.05, 0.08)
        att -= 0.12 * ramp((1 - ((x - gx) / 0.06) ** 2 - ((y - gy) / 0.035) ** 2) / 0.2)
    extras = add_mimics(att, lung_full, gap_full, x, y, s, chest.body_w, rng)
    extras += add_devices(att, x, y, s, rng, ap)
    boxes, radii = add_nodules(att, lung_full, gap_full, rng, min(rows, cols) / 512)
    return CxrResult(
        att,
        boxes,
        int(ptx is not None),
        ("R" if ptx.side < 0 else "L") if ptx is not None else "",
        float(ptx.depth) if ptx is not None else 0.0,
        ptx.size if ptx is not None else "",
        radii,
        extras,
    )


def _add_ribs(
    att: np.ndarray, chest: Chest, x: np.ndarray, y: np.ndarray, s: float, lung: np.ndarray
) -> None:
    """Posterior ribs as curved bright bands (a periodic phase in y bent with distance from the spine),
    fainter anterior arcs sloping the other way, and the clavicles."""
    rows = att.shape[0]
    r0 = max(0, int((chest.rib_top - 0.03 + rows / 2 / s) * s))
    r1 = min(rows, int((max(chest.dome_y) + 0.05 + rows / 2 / s) * s))
    ys, d = y[r0:r1], np.abs(x)
    phase = (ys - chest.rib_top + 0.08 * d - chest.rib_curve * d * d) / chest.rib_period
    posterior = ramp((np.cos(2 * np.pi * phase) - 0.3) / 0.4)
    cortex = np.exp(-(((np.cos(2 * np.pi * phase) - 0.3) / 0.1) ** 2))  # brighter rib margins
    anterior_phase = (ys - chest.rib_top + 0.05 - 0.35 * (0.4 - d)) / (chest.rib_period * 1.25)
    anterior = ramp((np.cos(2 * np.pi * anterior_phase) - 0.4) / 0.4) * ramp((d - 0.05) * s / 6)
    envelope = ramp((chest.body_w * 0.93 - d) * s / 6) * ramp((d - 0.025) * s / 4)
    vertical = ramp((ys - chest.rib_top + 0.04) * s / 6) * ramp((max(chest.dome_y) + 0.04 - ys) * s / 10)
    bands = 0.05 * posterior + 0.015 * cortex * posterior + 0.025 * anterior
    att[r0:r1] += bands * envelope * vertical * (0.3 + 0.7 * lung[r0:r1])
    clav_y = chest.rib_top - 0.035 - 0.12 * (d - 0.05)
    att += (
        0.05 * ramp((0.02 - np.abs(y - clav_y)) * s / 3) * ramp((0.3 - d) * s / 8) * ramp((d - 0.04) * s / 4)
    )
