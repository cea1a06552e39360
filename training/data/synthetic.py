"""Seeded synthetic chest radiographs and head CT series, written as real DICOM Part 10 files.

Why a generator: no public images or weights can be downloaded on our machines, yet every model the service
runs must be trained and honestly evaluated. The generator draws simple but anatomically ordered pictures
(lungs, heart, ribs, diaphragm; skull, brain, ventricles) with the findings the demonstration models look for,
and writes them exactly as a modality would: DICOM files with patient and study identifiers plus a
``labels.csv`` in the generic format that :func:`training.data.formats.load_generic` reads. Training therefore
runs through the same loader, the same header reading and the same shared preprocessing
(``service.inference.preprocess``) that real data would.

Determinism: every patient is drawn from its own generator seeded with ``(seed, kind, patient index)``, and
its UIDs come from :func:`pydicom.uid.generate_uid` with the same entropy, so the output does not depend on
the number of worker processes, and the same seed gives byte-identical pixel data and labels.

Findings
--------
* ``pneumothorax`` (chest, ~45 %): along the apex and lateral wall of one lung a region without lung
  texture, slightly more lucent, bounded on its lung side by a thin bright visceral pleural line. Depth runs
  from a thin apical rim (subtle, where texture already fades) to a large collapse (obvious).
* ``nodule`` (chest, ~50 %): one to three round soft-edged opacities inside the lung fields, radius 5-16 px at
  512 px, contrast from subtle to obvious; each has a box.
* ``hemorrhage`` (head CT, ~50 % of series): an intraparenchymal blob or a subdural crescent of 50-90 HU over
  2-6 adjacent 5 mm slices; labelled and boxed per slice.

Pictures are rendered as float arrays (``_render_cxr``: attenuation-like units; ``_render_ct``: HU) and
written by ``_cxr_patient`` / ``_ct_patient``, one patient per job.
"""

from __future__ import annotations

import csv
import datetime as dt
import json
import logging
import multiprocessing
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, ExplicitVRLittleEndian, generate_uid

__all__ = ["CT_LABELS", "CXR_LABELS", "MANUFACTURER", "generate_ct", "generate_cxr"]

logger = logging.getLogger(__name__)

MANUFACTURER = "pacs-triage synthetic"
CXR_LABELS = ("pneumothorax", "nodule")
CT_LABELS = ("hemorrhage",)

_CR_STORAGE = "1.2.840.10008.5.1.4.1.1.1"
_DX_PRESENTATION_STORAGE = "1.2.840.10008.5.1.4.1.1.1.1"
_CT_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
_KIND_CXR, _KIND_CT = 1, 2
_CXR_SHAPES = ((512, 512), (512, 480), (480, 512), (512, 448), (448, 512))
_CXR_COLUMNS = ("file", *CXR_LABELS, "boxes", "patient_id", "study_uid", "series_uid", "modality")
_CXR_INFO = ("info_view", "info_photometric", "info_ptx_side", "info_ptx_depth", "info_nodule_radii")
_CT_COLUMNS = ("file", *CT_LABELS, "boxes", "patient_id", "study_uid", "series_uid", "modality")
_CT_INFO = ("info_slice", "info_hemorrhage_type", "info_hemorrhage_hu")
_FIRST_NAMES = (
    "ALEX",
    "SAM",
    "ROBIN",
    "KIM",
    "JO",
    "CHRIS",
    "PAT",
    "LEE",
    "MORGAN",
    "RILEY",
    "DANA",
    "JESSE",
)


def _uid(seed: int, kind: int, *parts: object) -> str:
    return str(generate_uid(entropy_srcs=["pacs-triage-synthetic", str(seed), str(kind), *map(str, parts)]))


def _ramp(z: np.ndarray) -> np.ndarray:
    """A cheap soft step: 0 below -0.5, 1 above 0.5 (``z`` is a signed distance in edge widths)."""
    return np.clip(z + 0.5, 0.0, 1.0)


@dataclass(frozen=True)
class _Patient:
    patient_id: str
    name: str
    sex: str
    birth: dt.date


def _draw_patient(rng: np.random.Generator, seed: int, kind: int, index: int) -> _Patient:
    sex = "F" if rng.random() < 0.5 else "M"
    birth = dt.date(1935, 1, 1) + dt.timedelta(days=int(rng.integers(0, 70 * 365)))
    name = f"SYNTHETIC^{_FIRST_NAMES[int(rng.integers(len(_FIRST_NAMES)))]}{index:06d}"
    return _Patient(f"SYN{seed % 10000:04d}{kind}{index:06d}", name, sex, birth)


# --------------------------------------------------------------------------------------------- chest


@lru_cache(maxsize=16)
def _bandpass(shape: tuple[int, int], f0: float, bw: float) -> np.ndarray:
    fy = np.fft.fftfreq(shape[0]).astype(np.float32)[:, None]
    fx = np.fft.rfftfreq(shape[1]).astype(np.float32)[None, :]
    f = np.sqrt(fy * fy + fx * fx)
    return np.exp(-(((f - f0) / bw) ** 2)).astype(np.float32)


def _filtered_noise(rng: np.random.Generator, shape: tuple[int, int], bands: Sequence[tuple[float, float]]):
    """White noise band-passed in Fourier space, one unit-variance field per (centre, width) band."""
    spectrum = np.fft.rfft2(rng.standard_normal(shape, dtype=np.float32))
    fields = []
    for f0, bw in bands:
        field = np.fft.irfft2(spectrum * _bandpass(shape, f0, bw), s=shape)
        fields.append(field / (field.std() + 1e-6))
    return fields


def _upsample(field: np.ndarray, rows: int, cols: int) -> np.ndarray:
    img = Image.fromarray(np.ascontiguousarray(field, dtype=np.float32), mode="F")
    return np.asarray(img.resize((cols, rows), Image.Resampling.BILINEAR), dtype=np.float32)


@dataclass(frozen=True)
class _Chest:
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


def _draw_chest(rng: np.random.Generator) -> _Chest:
    a = rng.uniform(0.135, 0.16)
    return _Chest(
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
class _CxrResult:
    att: np.ndarray
    boxes: list[tuple[float, float, float, float]]
    pneumothorax: int
    ptx_side: str
    ptx_depth: float
    nodule_radii: list[float]


def _render_cxr(chest: _Chest, rng: np.random.Generator, rows: int, cols: int, ap: bool) -> _CxrResult:
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
    body = _ramp((chest.body_w - ax) * s / 3) * (0.45 + 0.55 * body_t)
    spine = 0.06 * _ramp((0.04 - ax) * s / 3)
    att = np.repeat(chest.tissue * body + spine, rows, axis=0)

    def heart_mask(xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
        return _ramp((1 - ((xs - hcx) / ha) ** 2 - ((ys - hcy) / hb) ** 2) / 0.25)

    # Lung texture: ridges of band-passed noise look like branching vessels; a lower band gives mottling.
    vessels, mottle = _filtered_noise(rng, (rows // 2, cols // 2), ((0.075, 0.035), (0.025, 0.015)))
    texture = _upsample(np.exp(-((vessels / 0.45) ** 2)) + 0.35 * mottle, rows, cols)
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
        lung = _ramp((1 - r2) / 0.07) * _ramp((dome - ys) * s / 4)
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
            ptx = _ramp((rr - rp) / edge) * lung
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
            * _ramp((0.3 - np.abs(y)) * s / 20)
        )
    if rng.random() < 0.5:  # gastric bubble under the left hemidiaphragm
        gx, gy = (
            chest.lung_cx + rng.uniform(-0.02, 0.04),
            chest.dome_y[1] + inspiration + rng.uniform(0.05, 0.08),
        )
        att -= 0.12 * _ramp((1 - ((x - gx) / 0.06) ** 2 - ((y - gy) / 0.035) ** 2) / 0.2)

    boxes, radii = _add_nodules(att, lung_full, ptx_full, rng, min(rows, cols) / 512)
    return _CxrResult(
        att,
        boxes,
        int(has_ptx),
        ("R" if ptx_side < 0 else "L") if has_ptx else "",
        float(depth) if has_ptx else 0.0,
        radii,
    )


def _add_ribs(
    att: np.ndarray, chest: _Chest, x: np.ndarray, y: np.ndarray, s: float, lung: np.ndarray
) -> None:
    """Posterior ribs as curved bright bands (a periodic phase in y bent with distance from the spine)."""
    rows = att.shape[0]
    r0 = max(0, int((chest.rib_top - 0.03 + rows / 2 / s) * s))
    r1 = min(rows, int((max(chest.dome_y) + 0.05 + rows / 2 / s) * s))
    ys, d = y[r0:r1], np.abs(x)
    phase = (ys - chest.rib_top + 0.08 * d - chest.rib_curve * d * d) / chest.rib_period
    posterior = _ramp((np.cos(2 * np.pi * phase) - 0.3) / 0.4)
    anterior_phase = (ys - chest.rib_top + 0.05 - 0.35 * (0.4 - d)) / (chest.rib_period * 1.25)
    anterior = _ramp((np.cos(2 * np.pi * anterior_phase) - 0.4) / 0.4) * _ramp((d - 0.05) * s / 6)
    envelope = _ramp((chest.body_w * 0.93 - d) * s / 6) * _ramp((d - 0.025) * s / 4)
    vertical = _ramp((ys - chest.rib_top + 0.04) * s / 6) * _ramp((max(chest.dome_y) + 0.04 - ys) * s / 10)
    att[r0:r1] += (0.05 * posterior + 0.025 * anterior) * envelope * vertical * (0.3 + 0.7 * lung[r0:r1])
    clav_y = chest.rib_top - 0.035 - 0.12 * (d - 0.05)
    att += (
        0.05
        * _ramp((0.02 - np.abs(y - clav_y)) * s / 3)
        * _ramp((0.3 - d) * s / 8)
        * _ramp((d - 0.04) * s / 4)
    )


def _add_nodules(
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
        profile = _ramp((radius - r) / edge) * (0.55 + 0.45 * np.sqrt(np.clip(1 - (r / radius) ** 2, 0, 1)))
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


def _cxr_stored(
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


# --------------------------------------------------------------------------------------------- head CT


@dataclass
class _CtSeries:
    hu: list[np.ndarray]
    z: list[float]
    labels: list[int]
    boxes: list[tuple[float, float, float, float] | None]
    kind: str
    value: float
    spacing: float


def _render_ct(rng: np.random.Generator) -> _CtSeries:
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

    hem = _draw_hemorrhage(rng, n, t_start, head_height) if rng.random() < 0.5 else None
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
            white_hu + (gray_hu - white_hu) * _ramp((4 - inner) / 2) + 2.0 * _upsample(mottle[k], size, size)
        )
        sulcal = np.exp(-((_upsample(sulci[k], size, size) / 0.3) ** 2)) * _ramp((6 - inner) / 2)
        brain = brain * (1 - sulcal) + 8 * sulcal
        brain = np.where(inner < csf_mm, 8.0, brain)
        if 0.36 < t < 0.7:
            gv = np.clip(1 - ((t - 0.53) / 0.16) ** 2, 0, 1) ** 0.5
            for side in (-1, 1):
                xr = x - side * (vent_w + 3) * gv
                yr = y + 8
                rot_x = xr * np.cos(side * 0.2) - yr * np.sin(side * 0.2)
                rot_y = xr * np.sin(side * 0.2) + yr * np.cos(side * 0.2)
                vent = _ramp((1 - (rot_x / (vent_w * gv + 0.1)) ** 2 - (rot_y / (26 * gv + 0.1)) ** 2) / 0.25)
                brain = brain * (1 - vent) + 6 * vent
            if pineal and abs(t - 0.44) < 2.5 / head_height:
                calc = _ramp((2.5 - np.sqrt(x * x + (y - 14) ** 2)) / 1.0)
                brain = brain * (1 - calc) + pineal * calc
        if t < 0.22:  # petrous ridges and sinus air near the skull base
            for side in (-1, 1):
                px, py = x - side * 0.42 * ax, y - 0.12 * ay
                along, across = px * 0.8 + side * py * 0.6, -side * px * 0.6 + py * 0.8
                ridge = _ramp((1 - (along / (0.3 * ax)) ** 2 - (across / 3.5) ** 2) / 0.3)
                brain = brain * (1 - ridge) + 900 * ridge
            sinus = _ramp((1 - (x / (0.25 * ax)) ** 2 - ((y + 0.7 * ay) / (0.15 * ay)) ** 2) / 0.3)
            brain = brain * (1 - sinus) - 950 * sinus
        hu = np.where(inner > 0, brain, hu)
        label, box = 0, None
        if hem is not None:
            label, box, hu = _paint_hemorrhage(hem, k, hu, x, y, phi, inner, ax, ay)
        hu += rng.standard_normal(hu.shape, dtype=np.float32) * noise_sd
        hu_slices.append(hu)
        labels.append(label)
        boxes.append(box)
    z = [round(-40.0 + 5.0 * k, 2) for k in range(n)]
    kind = "" if hem is None or not any(labels) else hem["kind"]
    return _CtSeries(hu_slices, z, labels, boxes, kind, float(hem["hu"]) if hem and kind else 0.0, spacing)


def _draw_hemorrhage(rng: np.random.Generator, n: int, t_start: float, head_height: float) -> dict[str, Any]:
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


def _paint_hemorrhage(
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
        mask = _ramp(f / 0.3) * (inner > 1)
    else:
        d = np.angle(np.exp(1j * (phi - hem["angle"])))
        thick = (
            hem["thick"]
            * zf
            * np.clip(np.cos(d / hem["extent"] * np.pi / 2), 0, 1)
            * (np.abs(d) < hem["extent"])
        )
        mask = _ramp((thick - inner) / 1.0) * _ramp(inner / 1.0)
    value = hu + (hem["hu"] - hu) * (0.6 + 0.4 * zf)
    hu = hu * (1 - mask) + value * mask
    core = mask > 0.5
    if core.sum() < 8:
        return 0, None, hu
    rows, cols = np.nonzero(core)
    return 1, (float(cols.min()), float(rows.min()), float(cols.max() + 1), float(rows.max() + 1)), hu


# --------------------------------------------------------------------------------------------- DICOM


def _file_meta(sop_class: str, sop_uid: str) -> FileMetaDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    meta.ImplementationVersionName = "PACS_TRIAGE_SYN"
    return meta


def _common(ds: Dataset, patient: _Patient, date: dt.date, clock: str, accession: str) -> None:
    """Patient, General Study, General Equipment and SOP Common attributes shared by every IOD here."""
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.PatientName = patient.name
    ds.PatientID = patient.patient_id
    ds.PatientBirthDate = patient.birth.strftime("%Y%m%d")
    ds.PatientSex = patient.sex
    ds.PatientAge = f"{min(999, (date - patient.birth).days // 365):03d}Y"
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = ds.AcquisitionDate = date.strftime("%Y%m%d")
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = ds.AcquisitionTime = clock
    ds.InstanceCreationDate, ds.InstanceCreationTime = ds.StudyDate, clock
    ds.AccessionNumber = accession
    ds.ReferringPhysicianName = ""
    ds.StudyID = "1"
    ds.Manufacturer = MANUFACTURER
    ds.ManufacturerModelName = "synthetic generator"
    ds.InstitutionName = "pacs-triage synthetic"
    ds.SoftwareVersions = "1"
    ds.SeriesNumber = 1
    ds.AcquisitionNumber = 1
    ds.SamplesPerPixel = 1
    ds.BitsAllocated = 16
    ds.PixelRepresentation = 0
    ds.BurnedInAnnotation = "NO"
    ds.LossyImageCompression = "00"


def _save(ds: Dataset, pixels: np.ndarray, path: Path) -> None:
    ds.Rows, ds.Columns = pixels.shape
    ds.PixelData = np.ascontiguousarray(pixels, dtype="<u2").tobytes()
    ds["PixelData"].VR = "OW"
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)


def _study_date(rng: np.random.Generator, previous: dt.date | None) -> tuple[dt.date, str]:
    if previous is None:
        date = dt.date(2024, 1, 2) + dt.timedelta(days=int(rng.integers(0, 365)))
    else:
        date = previous + dt.timedelta(days=int(rng.integers(20, 400)))
    clock = f"{int(rng.integers(7, 20)):02d}{int(rng.integers(0, 60)):02d}{int(rng.integers(0, 60)):02d}"
    return date, clock


def _cxr_patient(job: tuple[Path, int, int]) -> list[dict[str, str]]:
    """Render and write every study of one chest patient; returns its labels.csv rows."""
    out_dir, seed, index = job
    rng = np.random.default_rng([seed, _KIND_CXR, index])
    patient = _draw_patient(rng, seed, _KIND_CXR, index)
    chest = _draw_chest(rng)
    n_studies = 1 if rng.random() < 0.6 else 2
    rows_out, date = [], None
    for study in range(n_studies):
        srng = np.random.default_rng([seed, _KIND_CXR, index, study + 1])
        date, clock = _study_date(srng, date)
        rows, cols = _CXR_SHAPES[int(srng.integers(len(_CXR_SHAPES)))]
        ap = srng.random() < 0.25
        dx = srng.random() < 0.5
        mono1 = srng.random() < 0.4
        result = _render_cxr(chest, srng, rows, cols, ap)
        stored, center, width = _cxr_stored(result.att, srng, mono1)
        study_uid, series_uid = (
            _uid(seed, _KIND_CXR, index, study, "study"),
            _uid(seed, _KIND_CXR, index, study, "series"),
        )
        sop_uid = _uid(seed, _KIND_CXR, index, study, "sop")
        sop_class = _DX_PRESENTATION_STORAGE if dx else _CR_STORAGE
        ds = Dataset()
        ds.file_meta = _file_meta(sop_class, sop_uid)
        _common(ds, patient, date, clock, f"A{seed % 10000:04d}{index:07d}{study}")
        ds.SOPClassUID, ds.SOPInstanceUID = sop_class, sop_uid
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
        ds.Modality = "DX" if dx else "CR"
        ds.BodyPartExamined = "CHEST"
        ds.ViewPosition = "AP" if ap else "PA"
        ds.PatientOrientation = ["L", "F"]  # columns run to the patient's left, rows to the feet
        ds.StudyDescription = "XR CHEST 1 VIEW"
        ds.SeriesDescription = f"CHEST {ds.ViewPosition}"
        ds.InstanceNumber = 1
        ds.ImageType = ["ORIGINAL", "PRIMARY"]
        ds.KVP = "120" if not ap else "90"
        ds.ImagerPixelSpacing = [round(0.7 * 512 / max(rows, cols), 4)] * 2
        ds.PhotometricInterpretation = "MONOCHROME1" if mono1 else "MONOCHROME2"
        ds.BitsStored, ds.HighBit = 12, 11
        ds.WindowCenter, ds.WindowWidth = center, width
        ds.VOILUTFunction = "LINEAR"
        if dx:  # DX Series, DX Anatomy Imaged, DX Image, DX Detector, Acquisition Context (PS3.3 A.26)
            ds.PresentationIntentType = "FOR PRESENTATION"
            ds.ImageLaterality = "U"
            region = Dataset()
            region.CodeValue, region.CodingSchemeDesignator, region.CodeMeaning = "43799004", "SCT", "Chest"
            ds.AnatomicRegionSequence = DicomSequence([region])
            ds.PixelIntensityRelationship = "LIN"
            ds.PixelIntensityRelationshipSign = 1 if mono1 else -1
            ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = 0, 1, "US"
            ds.PresentationLUTShape = "INVERSE" if mono1 else "IDENTITY"
            ds.DetectorType = "SCINTILLATOR"
            ds.AcquisitionContextSequence = DicomSequence([])
        path = out_dir / "cxr" / f"{patient.patient_id}_{study + 1}.dcm"
        _save(ds, stored, path)
        rows_out.append(
            {
                "file": path.relative_to(out_dir).as_posix(),
                "pneumothorax": str(result.pneumothorax),
                "nodule": str(int(bool(result.boxes))),
                "boxes": _boxes_json(result.boxes, "nodule"),
                "patient_id": patient.patient_id,
                "study_uid": study_uid,
                "series_uid": series_uid,
                "modality": ds.Modality,
                "info_view": ds.ViewPosition,
                "info_photometric": ds.PhotometricInterpretation,
                "info_ptx_side": result.ptx_side,
                "info_ptx_depth": f"{result.ptx_depth:.3f}" if result.pneumothorax else "",
                "info_nodule_radii": " ".join(str(r) for r in result.nodule_radii),
            }
        )
    return rows_out


def _ct_patient(job: tuple[Path, int, int]) -> list[dict[str, str]]:
    """Render and write one head CT series; returns one labels.csv row per slice."""
    out_dir, seed, index = job
    rng = np.random.default_rng([seed, _KIND_CT, index])
    patient = _draw_patient(rng, seed, _KIND_CT, index)
    date, clock = _study_date(rng, None)
    series = _render_ct(rng)
    study_uid, series_uid = _uid(seed, _KIND_CT, index, "study"), _uid(seed, _KIND_CT, index, "series")
    frame_uid = _uid(seed, _KIND_CT, index, "frame")
    descending = rng.random() < 0.3  # some scanners number slices from the vertex down
    n = len(series.hu)
    size = series.hu[0].shape[0]
    rows_out = []
    for k, hu in enumerate(series.hu):
        sop_uid = _uid(seed, _KIND_CT, index, "sop", k)
        ds = Dataset()
        ds.file_meta = _file_meta(_CT_STORAGE, sop_uid)
        _common(ds, patient, date, clock, f"H{seed % 10000:04d}{index:07d}")
        ds.SOPClassUID, ds.SOPInstanceUID = _CT_STORAGE, sop_uid
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study_uid, series_uid, frame_uid
        ds.PositionReferenceIndicator = ""
        ds.Modality = "CT"
        ds.BodyPartExamined = "HEAD"
        ds.PatientPosition = "HFS"
        ds.StudyDescription = "CT HEAD WO CONTRAST"
        ds.SeriesDescription = "HEAD AXIAL 5MM"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.InstanceNumber = n - k if descending else k + 1
        ds.KVP = "120"
        ds.ConvolutionKernel = "SOFT"
        ds.SliceThickness = 5
        half = size / 2 * series.spacing
        ds.ImagePositionPatient = [round(-half, 3), round(-half, 3), series.z[k]]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.SliceLocation = series.z[k]
        ds.PixelSpacing = [series.spacing, series.spacing]
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsStored, ds.HighBit = 12, 11
        ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = -1024, 1, "HU"
        ds.WindowCenter, ds.WindowWidth = 40, 80
        ds.WindowCenterWidthExplanation = "BRAIN"
        path = out_dir / "ct" / patient.patient_id / f"IM{int(ds.InstanceNumber):04d}.dcm"
        _save(ds, np.clip(np.rint(hu + 1024), 0, 4095).astype(np.uint16), path)
        box = series.boxes[k]
        rows_out.append(
            {
                "file": path.relative_to(out_dir).as_posix(),
                "hemorrhage": str(series.labels[k]),
                "boxes": _boxes_json([box] if box else [], "hemorrhage"),
                "patient_id": patient.patient_id,
                "study_uid": study_uid,
                "series_uid": series_uid,
                "modality": "CT",
                "info_slice": str(k),
                "info_hemorrhage_type": series.kind,
                "info_hemorrhage_hu": f"{series.value:.1f}" if series.kind else "",
            }
        )
    return rows_out


def _boxes_json(boxes: Sequence[tuple[float, float, float, float]], label: str) -> str:
    items = [
        {
            "x0": round(b[0], 2),
            "y0": round(b[1], 2),
            "x1": round(b[2], 2),
            "y1": round(b[3], 2),
            "label": label,
        }
        for b in boxes
    ]
    return json.dumps(items, separators=(",", ":"))


def _generate(
    out_dir: Path,
    n_patients: int,
    seed: int,
    workers: int,
    job: Callable[[tuple[Path, int, int]], list[dict[str, str]]],
    columns: Sequence[str],
) -> Path:
    if n_patients < 1:
        raise ValueError(f"n_patients must be at least 1, got {n_patients}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    jobs = [(out_dir, seed, i) for i in range(n_patients)]
    start = time.perf_counter()
    if workers > 1:
        # spawn, not fork: the caller may already hold torch threads, which do not survive a fork.
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            results = list(pool.map(job, jobs, chunksize=max(1, n_patients // (workers * 8))))
    else:
        results = [job(j) for j in jobs]
    rows = [row for patient_rows in results for row in patient_rows]
    labels_csv = out_dir / "labels.csv"
    with labels_csv.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(columns), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    elapsed = time.perf_counter() - start
    logger.info(
        "wrote %d images for %d patients in %.1f s (%d workers)", len(rows), n_patients, elapsed, workers
    )
    return labels_csv


def generate_cxr(out_dir: Path, n_patients: int, seed: int, workers: int = 1) -> Path:
    """Write synthetic frontal chest radiographs (CR and DX) and their labels; return ``labels.csv``.

    Parameters
    ----------
    out_dir
        Folder to write into (created); images go to ``out_dir/cxr/<PatientID>_<study>.dcm``.
    n_patients
        Patients to draw; each has one or two studies of one image, so about 1.4 images per patient.
        Several studies per patient share the anatomy, which is what makes a patient-level split matter.
    seed
        Everything (pixels, labels, UIDs) is a function of ``seed`` and the patient index only.
    workers
        Processes to render with; the output is identical for any value.

    Returns
    -------
    Path
        ``out_dir/labels.csv`` in the generic format: ``file``, ``pneumothorax``, ``nodule``, ``boxes``
        (JSON, label ``nodule``, source pixels), and informational columns (``patient_id``, ``study_uid``,
        ``series_uid``, ``modality``, ``info_*``).
    """
    return _generate(out_dir, n_patients, seed, workers, _cxr_patient, (*_CXR_COLUMNS, *_CXR_INFO))


def generate_ct(out_dir: Path, n_patients: int, seed: int, workers: int = 1) -> Path:
    """Write synthetic non-contrast head CT series (24-32 slices of 5 mm) and per-slice labels.

    One series per patient, under ``out_dir/ct/<PatientID>/IM<InstanceNumber>.dcm``. Roughly a third of the
    series number their instances from the vertex down, so slice order must come from ImagePositionPatient
    (as :func:`training.data.formats.load_generic` does), not from file names.

    Returns
    -------
    Path
        ``out_dir/labels.csv``: one row per slice with ``hemorrhage`` (0/1 for that slice), ``boxes`` (label
        ``hemorrhage``), informational columns. The series label is the maximum over its slices.
    """
    return _generate(out_dir, n_patients, seed, workers, _ct_patient, (*_CT_COLUMNS, *_CT_INFO))
