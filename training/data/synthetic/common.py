"""Shared pieces of the generator: seeded identifiers, synthetic patients, soft steps, band-passed noise.

Determinism: every patient is drawn from its own generator seeded with ``(seed, kind, patient index)``, and
its UIDs come from :func:`pydicom.uid.generate_uid` with the same entropy, so the output does not depend on
the number of worker processes.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from PIL import Image
from pydicom.uid import generate_uid

__all__ = [
    "CT_LABELS",
    "CXR_LABELS",
    "GENERATOR_VERSIONS",
    "KIND_CT",
    "KIND_CXR",
    "MANUFACTURER",
    "Patient",
    "draw_patient",
    "blur",
    "filtered_noise",
    "ramp",
    "study_date",
    "uid",
    "upsample",
]

KIND_CXR, KIND_CT = 1, 2
GENERATOR_VERSIONS: dict[str, int] = {"cxr": 5, "ct": 6}
"""Per modality, the generator version whose pictures a model of that modality must be trained on: bumped
whenever that modality's pictures change (numbers from one sequence, so a number names one change). A model
card records the version it was trained on (``training.generator_version``); comparing a card with freshly
generated images of another version measures nothing. Version 2 (issue 14): pleural-line pneumothorax,
mimics, vendor processing, CT kernels and partial volume, hemorrhage types with masks. Version 3, chest only:
the pneumothorax's pleural line at least one model pixel wide and its pleural space darker, without
markings, from moderate size up (version 2's sign stayed below what the small CNN learns from ~1,100 films
in ten minutes on two cores, AUC 0.57). Version 4, head CT only: thin subdural rims a quarter of subdurals
instead of half, intraparenchymal clots from 6 mm, subdural, intraparenchymal and subarachnoid blood on at
least two slices (on version 2 pictures the head CT model reached series AUC 0.77 after 24 epochs on two
cores, subdurals 0.68, barely above a one-line HU-range rule). Version 5, chest only: thin apical rims
(30 % of pneumothoraces) with a faint pleural line (amplitude 0.03-0.09, was 0.10-0.18 as for the larger
ones) and a pleural space barely darker than lung, as the commonest miss on real films is (on version 3
pictures the model found rims at AUC 0.99, and pneumothorax overall at 0.995, above issue 14's 0.85-0.95).
Version 6, head CT only: the head turned in-plane by up to 10 degrees (``ct_anatomy.HEAD_YAW_DEG``; on
version 4 pictures the input-domain gate turned away 81 % of head CTs rotated by 10 degrees, on which the
model held). Cards without the field: version 1."""

MANUFACTURER = "pacs-triage synthetic"
CXR_LABELS = ("pneumothorax", "nodule")
CT_LABELS = ("hemorrhage",)
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


def uid(seed: int, kind: int, *parts: object) -> str:
    return str(generate_uid(entropy_srcs=["pacs-triage-synthetic", str(seed), str(kind), *map(str, parts)]))


def ramp(z: np.ndarray) -> np.ndarray:
    """A cheap soft step: 0 below -0.5, 1 above 0.5 (``z`` is a signed distance in edge widths)."""
    return np.clip(z + 0.5, 0.0, 1.0)


@dataclass(frozen=True)
class Patient:
    patient_id: str
    name: str
    sex: str
    birth: dt.date


def draw_patient(rng: np.random.Generator, seed: int, kind: int, index: int) -> Patient:
    sex = "F" if rng.random() < 0.5 else "M"
    birth = dt.date(1935, 1, 1) + dt.timedelta(days=int(rng.integers(0, 70 * 365)))
    name = f"SYNTHETIC^{_FIRST_NAMES[int(rng.integers(len(_FIRST_NAMES)))]}{index:06d}"
    return Patient(f"SYN{seed % 10000:04d}{kind}{index:06d}", name, sex, birth)


@lru_cache(maxsize=16)
def _bandpass(shape: tuple[int, int], f0: float, bw: float) -> np.ndarray:
    fy = np.fft.fftfreq(shape[0]).astype(np.float32)[:, None]
    fx = np.fft.rfftfreq(shape[1]).astype(np.float32)[None, :]
    f = np.sqrt(fy * fy + fx * fx)
    return np.exp(-(((f - f0) / bw) ** 2)).astype(np.float32)


def filtered_noise(
    rng: np.random.Generator, shape: tuple[int, int], bands: Sequence[tuple[float, float]]
) -> list[np.ndarray]:
    """White noise band-passed in Fourier space, one unit-variance field per (centre, width) band."""
    spectrum = np.fft.rfft2(rng.standard_normal(shape, dtype=np.float32))
    fields: list[np.ndarray] = []
    for f0, bw in bands:
        field = np.fft.irfft2(spectrum * _bandpass(shape, f0, bw), s=shape)
        fields.append(field / (field.std() + 1e-6))
    return fields


def upsample(field: np.ndarray, rows: int, cols: int) -> np.ndarray:
    img = Image.fromarray(np.ascontiguousarray(field, dtype=np.float32), mode="F")
    return np.asarray(img.resize((cols, rows), Image.Resampling.BILINEAR), dtype=np.float32)


def study_date(rng: np.random.Generator, previous: dt.date | None) -> tuple[dt.date, str]:
    if previous is None:
        date = dt.date(2024, 1, 2) + dt.timedelta(days=int(rng.integers(0, 365)))
    else:
        date = previous + dt.timedelta(days=int(rng.integers(20, 400)))
    clock = f"{int(rng.integers(7, 20)):02d}{int(rng.integers(0, 60)):02d}{int(rng.integers(0, 60)):02d}"
    return date, clock


def blur(image: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian blur of a 2-D float array (edge-padded, in Fourier space); ``sigma`` in pixels."""
    if sigma <= 0.05:
        return image.astype(np.float32, copy=True)
    rows, cols = image.shape
    if sigma > 8 and rows % 4 == 0 and cols % 4 == 0:  # a wide blur loses nothing at a quarter of the size
        small = image.astype(np.float32).reshape(rows // 4, 4, cols // 4, 4).mean(axis=(1, 3))
        return upsample(blur(small, sigma / 4), rows, cols)
    pad = int(3 * sigma + 1)
    padded = np.pad(image.astype(np.float32), pad, mode="edge")
    fy = np.fft.fftfreq(padded.shape[0]).astype(np.float32)[:, None]
    fx = np.fft.rfftfreq(padded.shape[1]).astype(np.float32)[None, :]
    transfer = np.exp(-2 * (np.pi * sigma) ** 2 * (fy * fy + fx * fx))
    out = np.fft.irfft2(np.fft.rfft2(padded) * transfer, s=padded.shape)
    return out[pad:-pad, pad:-pad].astype(np.float32)
