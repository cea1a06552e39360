"""The data :mod:`training.domain` fits and reports on: fresh generator sets and out-of-domain sets.

Seeds 3101-3203 are used nowhere else (training used 0 and 1, the shipped-model test 2026-2034), so no
image here was seen in training, checkpoint selection or the card's test set. Sizes keep the whole run to a
few minutes: chest sets of 300/150/150 patients (about 420/210/210 images), head CT fit and calibration
sets of 160 patients each (about 4,500 slices, 160 series) and a held-out set of 160 series. Why 160 + 160:
with 40 + 40 or 80 + 80 the texture and embedding thresholds, fitted on the pool's out-of-fold series
scores, turned away 5.6 % of held-out series (11 % of those with blood) once the generator turned heads;
with 160 + 160, 0.6 % (session 14). Why a held-out set of 160: the robustness battery judges a
perturbation by specificity within 0.1 of the unperturbed images, and at session 10's CT operating point
(sensitivity >= 0.95, specificity ~0.2) 20 negative series made that two series, so verdicts flipped with a
retrain; ~80 negatives give a binomial SE of ~0.045.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset

from training import ood
from training.data.formats.generic import load_generic
from training.data.records import Record
from training.data.synthetic import generate_ct, generate_cxr

__all__ = [
    "CT_MODELS",
    "BATTERY_SETS",
    "CXR_MODELS",
    "SEEDS",
    "SIZES",
    "build_sets",
    "drift_all",
    "generated",
    "ood_sets",
    "robustness_all",
    "ship_all",
]

log = logging.getLogger(__name__)

CXR_MODELS = ("cxr-pneumothorax", "cxr-nodule")
CT_MODELS = ("ct-hemorrhage",)
SEEDS = {
    "cxr": {"fit": 3101, "calibration": 3102, "held_out": 3103},
    "ct": {"fit": 3201, "calibration": 3202, "held_out": 3203},
}
SIZES = {
    "cxr": {"fit": 300, "calibration": 150, "held_out": 150},
    "ct": {"fit": 160, "calibration": 160, "held_out": 160},
}
OOD_PER_SET = 30
BATTERY_SETS = {
    "cxr": ("battery", 3104, 600),
    "ct": ("held_out", SEEDS["ct"]["held_out"], SIZES["ct"]["held_out"]),
}
"""The robustness battery's images per kind: (folder, seed, patients). Chest radiographs get a set of their
own, four times the held-out set: on 150 patients (~100 positive and ~100 negative films, fewer where the
gate turns many away) a row's change of a rate was the net of a handful of films, and verdicts near the
tolerance flipped between retrains (the nodule detector's image-level specificity on a 10 % pad rested on
~15 normal films). Head CT keeps the 160 held-out series (~70 positive, the battery's unit is the series)."""


def build_sets(kind: str, root: Path, sizes: dict[str, int] | None = None) -> dict[str, list[Record]]:
    """Generate the fit, calibration and held-out sets of ``kind`` ("cxr" or "ct") under ``root``."""
    return {part: generated(kind, part, root, (sizes or SIZES[kind])[part]) for part in SEEDS[kind]}


def generated(kind: str, part: str, root: Path, patients: int, seed: int | None = None) -> list[Record]:
    """One generated set (``seed``: the part's own in :data:`SEEDS` unless given); reused when ``root``
    already holds it (the generator is deterministic by seed)."""
    folder = root / kind / part
    if not (folder / "labels.csv").exists():
        make = generate_cxr if kind == "cxr" else generate_ct
        make(folder, patients, SEEDS[kind][part] if seed is None else seed, workers=2)  # same images
    return load_generic(folder)


def _series(records: Sequence[Record]) -> list[list[Dataset]]:
    """Records grouped by series (slice order), read as datasets."""
    groups: dict[str, list[Record]] = {}
    for record in records:
        groups.setdefault(record.series_uid, []).append(record)
    return [
        [dcmread(r.path) for r in sorted(g, key=lambda r: r.slice_index or 0)]
        for _, g in sorted(groups.items())
    ]


def _as_chest(ds: Dataset) -> Dataset:
    """A real non-chest image from pydicom's test files, labelled as a chest CR (a mislabelled study)."""
    ds.Modality, ds.BodyPartExamined = "CR", "CHEST"
    return ds


def ood_sets(kind: str, held_out: Sequence[Record], n: int = OOD_PER_SET) -> dict[str, list[list[Dataset]]]:
    """Constructed out-of-domain sets for the models of ``kind``: description → list of series."""
    series = _series(held_out)
    if kind == "cxr":
        images = [s[0] for s in series[:n]]
        real = [get_testdata_file(name, download=False) for name in ("CT_small.dcm", "MR_small.dcm")]
        sets = {
            # The detector trains with one console pass of up to amount 2, gamma 0.5-2 and 2 % noise
            # (ship.CONSOLE_PASS), where the battery asks a model to hold; well beyond it the gate must catch.
            "unsharp masking, amount 4, sigma 2% of the width": [ood.unsharp(ds, 4.0) for ds in images],
            "Gaussian noise, sd 10% of the window": [ood.noise(ds, 0.10, i) for i, ds in enumerate(images)],
            "heavy smoothing (Gaussian blur, sigma 4 px)": [ood.blur(ds, 4.0) for ds in images],
            "chest phantom made another way (ellipses, log exposure, 14-bit)": [
                ood.other_chest(images[i % len(images)], seed=i) for i in range(n)
            ],
            "limb radiograph (not a chest)": [ood.limb(images[i % len(images)], seed=i) for i in range(n)],
            "uniform noise image": [ood.noise_image(images[i % len(images)], seed=i) for i in range(n // 3)],
            "real non-chest images (pydicom CT_small, MR_small) labelled CR chest": [
                _as_chest(dcmread(str(p))) for p in real if p
            ],
        }
        return {k: [[ds] for ds in v] for k, v in sets.items()}
    heads = series[: max(3, n // 3)]
    ct_small = get_testdata_file("CT_small.dcm", download=False)
    sets_ct: dict[str, list[list[Dataset]]] = {
        "Shepp-Logan head phantom (Toft 1996) in HU": [
            ood.shepp_logan_head(s, i) for i, s in enumerate(heads)
        ],
        "HU noise series": [[ood.noise_image(ds, i) for ds in s] for i, s in enumerate(heads[:5])],
        "head CT with heavy unsharp masking, amount 3 (an edge-enhancing kernel)": [
            [ood.unsharp(ds, 3.0, 0.01) for ds in s] for s in heads
        ],
    }
    if ct_small:
        sets_ct["real non-head CT (pydicom CT_small, 12 copies as a series)"] = [
            [dcmread(str(ct_small)) for _ in range(12)]
        ]
    return sets_ct


def ship_all(models_dir: Path, work_dir: Path, names: Sequence[str] | None = None) -> dict[str, Any]:
    """Fit and write the domain reference of every shipped model (or ``names``); returns the reports."""
    from training.domain import ship_domain

    reports = {}
    for kind, models in (("cxr", CXR_MODELS), ("ct", CT_MODELS)):
        wanted = [m for m in models if names is None or m in names]
        if not wanted:
            continue
        sets = build_sets(kind, work_dir)
        ood_data = ood_sets(kind, sets["held_out"])
        for name in wanted:
            card = ship_domain(models_dir / name, sets, SEEDS[kind], ood_data)
            assert card.domain is not None
            reports[name] = card.domain.report
            log.info("%s domain: %s", name, card.domain.report)
    return reports


def robustness_all(models_dir: Path, work_dir: Path, names: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the robustness battery on its set (:data:`BATTERY_SETS`) for every shipped model (or ``names``)."""
    from training.robustness import ship_robustness

    reports: dict[str, Any] = {}
    for kind, models in (("cxr", CXR_MODELS), ("ct", CT_MODELS)):
        wanted = [m for m in models if names is None or m in names]
        if wanted:
            part, seed, patients = BATTERY_SETS[kind]
            records = generated(kind, part, work_dir, patients, seed)
            cards = ship_robustness([models_dir / name for name in wanted], records, seed, part)
            reports.update((name, card.robustness) for name, card in zip(wanted, cards, strict=True))
    return reports


def drift_all(models_dir: Path, work_dir: Path, names: Sequence[str] | None = None) -> dict[str, int]:
    """Write the drift reference (training/drift_reference.py) of every shipped model (or ``names``), from
    the calibration and held-out sets (in-domain series never used in training); returns series counts."""
    from training.drift_reference import ship_drift_reference

    counts = {}
    for kind, models in (("cxr", CXR_MODELS), ("ct", CT_MODELS)):
        wanted = [m for m in models if names is None or m in names]
        if not wanted:
            continue
        parts = ("calibration", "held_out")
        records = [r for p in parts for r in generated(kind, p, work_dir, SIZES[kind][p])]
        series = _series(records)
        source = (
            f"held-out generator {'chest radiographs' if kind == 'cxr' else 'head CT series'} (seeds "
            f"{SEEDS[kind]['calibration']} and {SEEDS[kind]['held_out']}); scores follow the generator's "
            "prevalence, not a site's"
        )
        for name in wanted:
            card = ship_drift_reference(models_dir / name, series, source)
            assert card.drift_reference is not None
            counts[name] = card.drift_reference.series
    return counts
