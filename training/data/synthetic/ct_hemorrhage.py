"""Intracranial hemorrhage on non-contrast head CT: type, place, shape, density, mass effect, per-pixel mask.

Acute blood is 50-90 HU against brain at 20-40 HU (subacute and anaemic blood less: down to ~45 HU). The
types differ by where blood collects, which is what a reader (and the model) must recognise:

- **SDH** (subdural): a crescent along the inner table that crosses sutures, at any place on the convexity
  including frontal and along the falx; from thin rims of 1.5 mm (the commonest miss) to 15 mm;
- **EDH** (epidural): a biconvex lens, limited in extent (sutures hold the dura), 5-20 mm thick;
- **IPH** (intraparenchymal): an irregular blob in the brain with a hypodense rim of oedema;
- **SAH** (subarachnoid): blood filling the sulci (and so following their shape) in a region of cortex;
- **IVH** (intraventricular): blood layering in the dependent (posterior) part of a lateral ventricle.

Large collections push the midline away (mass effect, drawn by :mod:`.ct_anatomy` from ``shift_mm``).
:func:`paint_hemorrhage` returns the painted per-pixel mask with the slice: the mask is what was painted
(coverage > 0.5), the box is the mask's extent, and a slice is positive exactly when its mask is not empty,
so masks, boxes and labels cannot disagree (issue 16's segmentation model learns the mask).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from training.data.synthetic.common import ramp

__all__ = ["HEMORRHAGE_RATE", "HEMORRHAGE_TYPES", "Anatomy", "draw_hemorrhage", "paint_hemorrhage"]

HEMORRHAGE_RATE = 0.5
HEMORRHAGE_TYPES = {"SDH": 0.3, "EDH": 0.12, "IPH": 0.28, "SAH": 0.15, "IVH": 0.15}
MIN_PIXELS = 6
"""A slice whose painted core has fewer pixels is not labelled positive (and its mask is emptied)."""


@dataclass
class Anatomy:
    """One slice's coordinates (mm, origin near the head's centre) and the structures blood can fill."""

    x: np.ndarray
    y: np.ndarray
    phi: np.ndarray
    inner: np.ndarray  # mm inside the inner table of the skull (negative in bone and outside)
    sulcal: np.ndarray  # 0..1 sulcal CSF
    ventricles: np.ndarray  # 0..1 lateral ventricles
    ax: float
    ay: float


def draw_hemorrhage(rng: np.random.Generator, n: int, t_start: float, head_height: float) -> dict[str, Any]:
    """The type, place, size and density of one series' hemorrhage (slices counted base to vertex)."""
    ts = t_start + np.arange(n) * 5.0 / head_height
    names = list(HEMORRHAGE_TYPES)
    kind = names[int(rng.choice(len(names), p=list(HEMORRHAGE_TYPES.values())))]
    window = (0.42, 0.68) if kind == "IVH" else (0.3, 0.82)
    candidates = np.flatnonzero((ts > window[0]) & (ts < window[1]))
    span = int(rng.integers(1, 4)) if kind in ("IVH", "EDH") else int(rng.integers(2, 7))
    centre = float(rng.choice(candidates)) + (0.5 if span % 2 == 0 else 0.0)
    # thin rims (1.5-4 mm) are a quarter of subdurals: at the model's 2 mm pixels they are its hardest cases
    thin, thick_range = rng.random() < 0.25, (rng.uniform(1.5, 4.0), rng.uniform(4.0, 15.0))
    thick = float(thick_range[0] if thin else thick_range[1]) if kind == "SDH" else 0.0
    if kind == "EDH":
        thick = float(rng.uniform(5, 20))
    radii = (float(rng.uniform(6, 20)), float(rng.uniform(6, 20)))
    size_mm = {"SDH": thick, "EDH": thick, "IPH": float(np.sqrt(radii[0] * radii[1]))}.get(kind, 0.0)
    return {
        "kind": kind,
        "hu": float(rng.uniform(45, 85)),
        "centre": centre,
        "half": span / 2,
        "angle": float(rng.uniform(-np.pi, np.pi)),
        "frac": float(rng.uniform(0.1, 0.6)),
        "radii": radii,
        "extent": float(rng.uniform(0.35, 0.7) if kind == "EDH" else rng.uniform(0.5, 1.3)),
        "thick": thick,
        "wobble": rng.uniform(0, 2 * np.pi, 2),
        "side": int(rng.choice((-1, 1))),
        "sah_radius": float(rng.uniform(15, 40)),
        "shift_mm": float(np.clip((size_mm - 8) * 0.5, 0, 8)),
        "size_mm": round(size_mm, 1),
    }


def _shape(hem: dict[str, Any], a: Anatomy, zf: float) -> np.ndarray:
    """Coverage 0..1 of this slice by the hemorrhage, before its density is applied."""
    kind = hem["kind"]
    if kind == "IPH":
        px = np.cos(hem["angle"]) * hem["frac"] * a.ax * 0.75
        py = np.sin(hem["angle"]) * hem["frac"] * a.ay * 0.75
        rx, ry = hem["radii"][0] * zf, hem["radii"][1] * zf
        ang = np.arctan2(a.y - py, a.x - px)
        wobble = 0.12 * np.cos(3 * ang + hem["wobble"][0]) + 0.08 * np.cos(5 * ang + hem["wobble"][1])
        f = 1 - ((a.x - px) / max(rx, 0.5)) ** 2 - ((a.y - py) / max(ry, 0.5)) ** 2 + wobble
        return ramp(f / 0.3) * (a.inner > 1)
    if kind in ("SDH", "EDH"):
        d = np.angle(np.exp(1j * (a.phi - hem["angle"])))
        profile = np.clip(np.cos(d / hem["extent"] * np.pi / 2), 0, 1) * (np.abs(d) < hem["extent"])
        if kind == "EDH":
            profile = np.sqrt(profile)  # a lens: thick in the middle, ending abruptly
        thick = hem["thick"] * zf * profile
        lens: np.ndarray = ramp((thick - a.inner) / 0.8) * ramp(a.inner / 0.8)
        return lens
    if kind == "SAH":
        cx = np.cos(hem["angle"]) * a.ax * 0.8
        cy = np.sin(hem["angle"]) * a.ay * 0.8
        near = ramp((hem["sah_radius"] * zf - np.sqrt((a.x - cx) ** 2 + (a.y - cy) ** 2)) / 3)
        sulci: np.ndarray = np.clip(a.sulcal * 1.6 - 0.3, 0, 1) * near * (a.inner > 0)
        return sulci
    # IVH: the dependent (posterior, larger y) part of one lateral ventricle
    side_mask = ramp(a.x * hem["side"] / 1.5)
    inside = a.ventricles > 0.5
    level = float(np.quantile(np.broadcast_to(a.y, inside.shape)[inside], 0.55)) if inside.any() else np.inf
    ventricle: np.ndarray = np.clip(a.ventricles * 1.4 - 0.2, 0, 1) * side_mask * ramp((a.y - level) / 1.0)
    return ventricle


def paint_hemorrhage(
    hem: dict[str, Any], k: int, hu: np.ndarray, anatomy: Anatomy
) -> tuple[int, tuple[float, float, float, float] | None, np.ndarray, np.ndarray]:
    """Paint slice ``k``; return ``(label, box, hu, mask)`` with ``mask`` a uint8 per-pixel mask."""
    empty = np.zeros(hu.shape, np.uint8)
    dz = (k - hem["centre"]) / (hem["half"] + 0.5)
    if abs(dz) >= 1:
        return 0, None, hu, empty
    zf = float(np.sqrt(1 - dz * dz))
    cover = _shape(hem, anatomy, zf)
    if hem["kind"] == "IPH":  # hypodense oedema around the clot
        halo = np.clip(
            _shape({**hem, "radii": tuple(r * 1.5 for r in hem["radii"])}, anatomy, zf) - cover, 0, 1
        )
        hu = hu - 6.0 * halo
    value = hu + (hem["hu"] - hu) * (0.7 + 0.3 * zf)
    hu = hu * (1 - cover) + value * cover
    mask = (cover > 0.5).astype(np.uint8)
    if int(mask.sum()) < MIN_PIXELS:
        return 0, None, hu, empty
    rows, cols = np.nonzero(mask)
    box = (float(cols.min()), float(rows.min()), float(cols.max() + 1), float(rows.max() + 1))
    return 1, box, hu, mask
