"""Head CT anatomy in HU: skull, brain with grey/white contrast and sulci, ventricles, skull base."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from training.data.synthetic.common import ramp, upsample
from training.data.synthetic.ct_hemorrhage import draw_hemorrhage, paint_hemorrhage

__all__ = ["CtSeries", "render_ct"]


@dataclass
class CtSeries:
    hu: list[np.ndarray]
    z: list[float]
    labels: list[int]
    boxes: list[tuple[float, float, float, float] | None]
    kind: str
    value: float
    spacing: float


def render_ct(rng: np.random.Generator) -> CtSeries:
    """One axial head CT series in HU, base to vertex, with an optional hemorrhage."""
    n, size = int(rng.integers(24, 33)), 256
    spacing = round(float(rng.uniform(0.85, 0.95)), 3)
    head_height = (n - 1) * 5.0 / rng.uniform(0.85, 0.93)
    t_start = rng.uniform(0.03, 0.08)
    big_ax, big_ay = rng.uniform(66, 76), rng.uniform(86, 96)
    skull_mm, csf_mm = rng.uniform(5, 8), rng.uniform(0.8, 3.0)
    table_hu, diploe_hu = rng.uniform(1200, 1500), rng.uniform(650, 900)
    gray_hu, white_hu = rng.uniform(35, 40), rng.uniform(24, 29)
    vent_w = rng.uniform(4, 8)
    pineal = rng.uniform(120, 400) if rng.random() < 0.4 else 0.0
    coords = (np.arange(size, dtype=np.float32) + 0.5 - size / 2) * spacing
    x = coords[None, :] - rng.uniform(-6, 6)
    y = coords[:, None] - rng.uniform(-8, 8)
    phi = np.arctan2(y, x)
    harm = rng.uniform(-0.03, 0.03, 3)
    shape = 1 + harm[0] * np.cos(2 * phi) + harm[1] * np.cos(3 * phi + 1) + harm[2] * np.sin(phi)
    shape += 0.05 * (y < 0) * (-y / big_ay)  # frontal lobes a little narrower
    # Gray/white mottling and sulci, consistent across slices: a band-passed 3-D noise volume at half size.
    spec = np.fft.rfftn(rng.standard_normal((n, size // 2, size // 2), dtype=np.float32))
    fz = np.fft.fftfreq(n).astype(np.float32)[:, None, None] * 0.35
    fy = np.fft.fftfreq(size // 2).astype(np.float32)[None, :, None]
    fx = np.fft.rfftfreq(size // 2).astype(np.float32)[None, None, :]
    f = np.sqrt(fz * fz + fy * fy + fx * fx)
    mottle = np.fft.irfftn(spec * np.exp(-((f / 0.04) ** 2)), s=(n, size // 2, size // 2), axes=(0, 1, 2))
    sulci = np.fft.irfftn(
        spec * np.exp(-(((f - 0.12) / 0.05) ** 2)), s=(n, size // 2, size // 2), axes=(0, 1, 2)
    )
    mottle /= mottle.std() + 1e-6
    sulci /= sulci.std() + 1e-6

    hem = draw_hemorrhage(rng, n, t_start, head_height) if rng.random() < 0.5 else None
    noise_sd = rng.uniform(4, 6)
    hu_slices, labels, boxes = [], [], []
    for k in range(n):
        t = t_start + k * 5.0 / head_height
        g = float(np.sqrt(np.clip(1 - ((t - 0.42) / 0.6) ** 2, 0.02, 1)))
        ax, ay = big_ax * g, big_ay * g
        mean_r = np.sqrt(ax * ay)
        rho = np.sqrt((x / ax) ** 2 + (y / ay) ** 2) / shape
        depth = (1 - rho) * mean_r  # mm inside the outer skull surface
        hu = np.full((size, size), -1000.0, np.float32)
        hu = np.where(rho < 1 + 5 / mean_r, 20.0, hu)
        u = np.clip(depth / skull_mm, 0, 1)
        bone = diploe_hu + (table_hu - diploe_hu) * np.abs(2 * u - 1) ** 1.5
        hu = np.where(rho < 1, bone, hu)
        inner = depth - skull_mm  # mm inside the inner table
        brain = (
            white_hu + (gray_hu - white_hu) * ramp((4 - inner) / 2) + 2.0 * upsample(mottle[k], size, size)
        )
        sulcal = np.exp(-((upsample(sulci[k], size, size) / 0.3) ** 2)) * ramp((6 - inner) / 2)
        brain = brain * (1 - sulcal) + 8 * sulcal
        brain = np.where(inner < csf_mm, 8.0, brain)
        if 0.36 < t < 0.7:
            gv = np.clip(1 - ((t - 0.53) / 0.16) ** 2, 0, 1) ** 0.5
            for side in (-1, 1):
                xr = x - side * (vent_w + 3) * gv
                yr = y + 8
                rot_x = xr * np.cos(side * 0.2) - yr * np.sin(side * 0.2)
                rot_y = xr * np.sin(side * 0.2) + yr * np.cos(side * 0.2)
                vent = ramp((1 - (rot_x / (vent_w * gv + 0.1)) ** 2 - (rot_y / (26 * gv + 0.1)) ** 2) / 0.25)
                brain = brain * (1 - vent) + 6 * vent
            if pineal and abs(t - 0.44) < 2.5 / head_height:
                calc = ramp((2.5 - np.sqrt(x * x + (y - 14) ** 2)) / 1.0)
                brain = brain * (1 - calc) + pineal * calc
        if t < 0.22:  # petrous ridges and sinus air near the skull base
            for side in (-1, 1):
                px, py = x - side * 0.42 * ax, y - 0.12 * ay
                along, across = px * 0.8 + side * py * 0.6, -side * px * 0.6 + py * 0.8
                ridge = ramp((1 - (along / (0.3 * ax)) ** 2 - (across / 3.5) ** 2) / 0.3)
                brain = brain * (1 - ridge) + 900 * ridge
            sinus = ramp((1 - (x / (0.25 * ax)) ** 2 - ((y + 0.7 * ay) / (0.15 * ay)) ** 2) / 0.3)
            brain = brain * (1 - sinus) - 950 * sinus
        hu = np.where(inner > 0, brain, hu)
        label, box = 0, None
        if hem is not None:
            label, box, hu = paint_hemorrhage(hem, k, hu, x, y, phi, inner, ax, ay)
        hu += rng.standard_normal(hu.shape, dtype=np.float32) * noise_sd
        hu_slices.append(hu)
        labels.append(label)
        boxes.append(box)
    z = [round(-40.0 + 5.0 * k, 2) for k in range(n)]
    kind = "" if hem is None or not any(labels) else hem["kind"]
    return CtSeries(hu_slices, z, labels, boxes, kind, float(hem["hu"]) if hem and kind else 0.0, spacing)
