"""The robustness battery: routine image processing and acquisition changes, measured as rates.

Why: issue 14 measured that processing every CR/DX console applies by default (unsharp masking) took
pneumothorax specificity from 1.00 to 0.00, and one pixel of partial volume at the skull edge did the same
to hemorrhage. A served model must either keep its sensitivity and specificity under such changes, or the
input-domain gate (:mod:`service.inference.domain`) must turn the changed image away. The battery measures
which, per perturbation, on held-out in-domain images, through the serving path (preprocessing, ONNX
Runtime, the gate, the card's threshold):

- ``caught``: the gate rejects at least :data:`CAUGHT` of the perturbed images (or series);
- ``holds``: on the perturbed images the gate lets through, sensitivity and specificity are each within
  :data:`TOLERANCE` of the unperturbed images' (for the detector: lesion sensitivity and image-level
  specificity, i.e. nodule-free films without a box);
- ``neither``: a finding, reported on the card as it is, not hidden.

Perturbations act on stored values (what a console or a scanner would change), geometric ones with their
box mapping so the detector is scored on moved lesions. Strengths are stated in each name.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image
from pydicom.dataset import Dataset

from service.inference.card import ModelCard
from service.inference.domain import assess_domain
from service.inference.postprocess import aggregate_series, decode_detections
from service.inference.preprocess import preprocess_dataset
from training import ood
from training.evaluate import hit

__all__ = [
    "CAUGHT",
    "CT_BATTERY",
    "CXR_BATTERY",
    "TOLERANCE",
    "Case",
    "Perturbation",
    "cases_from_records",
    "run_battery",
    "ship_robustness",
]

TOLERANCE = 0.10
"""Largest change of sensitivity or specificity (absolute) that still counts as "holds"."""
CAUGHT = 0.90
"""Smallest fraction the gate must reject for a perturbation to count as "caught"."""

Box = tuple[float, float, float, float]
Mapper = Callable[[Box], Box]


@dataclass(frozen=True)
class Case:
    """One image or one series of the held-out set: datasets in slice order, label, source-pixel boxes."""

    datasets: list[Dataset]
    label: int
    boxes: list[list[Box]]


@dataclass(frozen=True)
class Perturbation:
    name: str
    apply: Callable[[Dataset, int], tuple[Dataset, Mapper | None]]


def _pixels(ds: Dataset, values: np.ndarray) -> Dataset:
    top = 2 ** int(ds.BitsStored) - 1
    return ood.with_pixels(ds, np.clip(np.rint(values), 0, top).astype(np.uint16))


def _rotate(degrees: float) -> Callable[[Dataset, int], tuple[Dataset, Mapper]]:
    def apply(ds: Dataset, _: int) -> tuple[Dataset, Mapper]:
        x = ds.pixel_array.astype(np.float32)
        border = np.concatenate([x[0], x[-1], x[:, 0], x[:, -1]])
        out = Image.fromarray(x, mode="F").rotate(
            degrees, Image.Resampling.BILINEAR, fillcolor=float(np.median(border))
        )
        cy, cx = (x.shape[0] - 1) / 2, (x.shape[1] - 1) / 2
        t = np.radians(degrees)  # PIL turns counter-clockwise on screen: rows grow downwards

        def mapper(box: Box) -> Box:
            xs, ys = np.array([box[0], box[2], box[0], box[2]]), np.array([box[1], box[1], box[3], box[3]])
            rx = cx + (xs - cx) * np.cos(t) + (ys - cy) * np.sin(t)
            ry = cy - (xs - cx) * np.sin(t) + (ys - cy) * np.cos(t)
            return (float(rx.min()), float(ry.min()), float(rx.max()), float(ry.max()))

        return _pixels(ds, np.asarray(out)), mapper

    return apply


def _crop(frac: float) -> Callable[[Dataset, int], tuple[Dataset, Mapper]]:
    """``frac`` > 0 crops that fraction of each side (zoom in); < 0 pads with the border value (zoom out)."""

    def apply(ds: Dataset, _: int) -> tuple[Dataset, Mapper]:
        x = ds.pixel_array.astype(np.float32)
        m = round(abs(frac) * min(x.shape))
        if frac > 0:
            out, shift = x[m:-m, m:-m], -m
        else:
            out, shift = np.pad(x, m, mode="edge"), m
        return _pixels(ds, out), lambda b: (b[0] + shift, b[1] + shift, b[2] + shift, b[3] + shift)

    return apply


def _flip(ds: Dataset, _: int) -> tuple[Dataset, Mapper]:
    x = ds.pixel_array
    w = x.shape[1]
    return _pixels(ds, x[:, ::-1].astype(np.float64)), lambda b: (w - b[2], b[1], w - b[0], b[3])


def _partial_volume(ds: Dataset, _: int) -> tuple[Dataset, None]:
    """One pixel of partial volume at the inner table: where a 3x3 neighbourhood holds both bone
    (> 300 HU) and brain (< 100 HU), the pixel becomes the neighbourhood's mean, as a real CT's finite
    slice thickness and point spread blend them."""
    x = ds.pixel_array.astype(np.float64)
    hu = x + float(ds.RescaleIntercept)
    pad = np.pad(hu, 1, mode="edge")
    shifts = [
        pad[1 + dy : 1 + dy + hu.shape[0], 1 + dx : 1 + dx + hu.shape[1]]
        for dy in (-1, 0, 1)
        for dx in (-1, 0, 1)
    ]
    stack = np.stack(shifts)
    edge = (stack.max(axis=0) > 300) & (stack.min(axis=0) < 100) & (stack.min(axis=0) > -200)
    return _pixels(ds, np.where(edge, stack.mean(axis=0), hu) - float(ds.RescaleIntercept)), None


def _plain(fn: Callable[[Dataset, int], Dataset]) -> Callable[[Dataset, int], tuple[Dataset, None]]:
    return lambda ds, seed: (fn(ds, seed), None)


def _hu_offset(delta: float) -> Callable[[Dataset, int], tuple[Dataset, None]]:
    return _plain(lambda ds, _: _pixels(ds, ds.pixel_array.astype(np.float64) + delta))


def _hu_noise(sd: float) -> Callable[[Dataset, int], tuple[Dataset, None]]:
    return _plain(
        lambda ds, s: _pixels(
            ds, ds.pixel_array + np.random.default_rng(s).normal(0, sd, ds.pixel_array.shape)
        )
    )


def _unsharp(amount: float, sigma_frac: float) -> Callable[[Dataset, int], tuple[Dataset, None]]:
    return _plain(lambda ds, _: ood.unsharp(ds, amount, sigma_frac))


def _gamma(exponent: float) -> Callable[[Dataset, int], tuple[Dataset, None]]:
    return _plain(lambda ds, _: ood.gamma(ds, exponent))


def _blur(sigma: float) -> Callable[[Dataset, int], tuple[Dataset, None]]:
    return _plain(lambda ds, _: ood.blur(ds, sigma))


def _noise(frac: float) -> Callable[[Dataset, int], tuple[Dataset, None]]:
    return _plain(lambda ds, seed: ood.noise(ds, frac, seed))


CXR_BATTERY: tuple[Perturbation, ...] = (
    *(
        Perturbation(f"unsharp masking, amount {a:g}, sigma 2% of the width", _unsharp(a, 0.02))
        for a in (0.5, 1, 2)
    ),
    *(Perturbation(f"tone curve gamma {g:g}", _gamma(g)) for g in (0.8, 1.25, 0.5, 2.0)),
    *(Perturbation(f"Gaussian blur sigma {s:g} px", _blur(s)) for s in (1.0, 2.0)),
    *(Perturbation(f"noise sd {100 * f:g}% of the window", _noise(f)) for f in (0.02, 0.05)),
    *(Perturbation(f"rotation {d:+g} degrees", _rotate(d)) for d in (10.0, -10.0, 20.0, -20.0)),
    Perturbation("crop 10% of each side (zoom in)", _crop(0.10)),
    Perturbation("pad 10% of each side (zoom out)", _crop(-0.10)),
    Perturbation("horizontal flip (not a valid chest image: heart on the right)", _flip),
)
CT_BATTERY: tuple[Perturbation, ...] = (
    Perturbation("HU calibration offset +5", _hu_offset(5)),
    Perturbation("HU calibration offset -5", _hu_offset(-5)),
    Perturbation("partial volume at the skull edge (1 px)", _partial_volume),
    Perturbation("sharper kernel (unsharp masking, amount 1, sigma 1% of the width)", _unsharp(1.0, 0.01)),
    Perturbation("smoother kernel (Gaussian blur sigma 1 px)", _blur(1.0)),
    Perturbation("noise +5 HU sd", _hu_noise(5.0)),
    *(Perturbation(f"rotation {d:+g} degrees", _rotate(d)) for d in (10.0, -10.0, 20.0, -20.0)),
    Perturbation("crop 10% of each side (zoom in)", _crop(0.10)),
    Perturbation("horizontal flip (valid for a head CT)", _flip),
)


def _scores(card: ModelCard, session: Any, cases: Sequence[Case]) -> tuple[list[bool], list[Any]]:
    """(gate kept?, model result) per case: probability (image or series) or the image's detections."""
    from training.export import ort_predict

    kept: list[bool] = []
    results: list[Any] = []
    for case in cases:
        arrays = [preprocess_dataset(ds, card.preprocessing) for ds in case.datasets]
        inputs = np.concatenate([a.array for a in arrays])
        out = ort_predict(session, inputs)
        verdict = assess_domain(card, inputs, out, [len(a.array) for a in arrays])
        kept.append(len(verdict.kept) == len(case.datasets))
        if card.task == "detection":
            assert card.detection is not None
            boxes = decode_detections(
                out["heatmap"][0], out["size"][0], card.detection.stride, card.labels[0].threshold
            )
            results.append([arrays[0].geometry.to_source(b.xyxy) for b in boxes])
        elif card.task == "series_classification":
            results.append(
                aggregate_series(
                    out["probability"][:, 0], card.aggregation.window if card.aggregation else 3
                )[0]
            )
        else:
            results.append(float(out["probability"][0, 0]))
    return kept, results


def _metrics(
    card: ModelCard, cases: Sequence[Case], results: Sequence[Any], mask: Sequence[bool]
) -> dict[str, Any]:
    chosen = [(c, r) for c, r, m in zip(cases, results, mask, strict=True) if m]
    if card.task == "detection":
        lesions = [any(hit(d, t) for d in r) for c, r in chosen for t in c.boxes[0]]
        clean = [not r for c, r in chosen if not c.boxes[0]]
        hits, negatives = lesions, clean
    else:
        threshold = card.labels[0].threshold
        hits = [r >= threshold for c, r in chosen if c.label == 1]
        negatives = [r < threshold for c, r in chosen if c.label == 0]
    return {
        "sensitivity": float(np.mean(hits)) if hits else None,
        "specificity": float(np.mean(negatives)) if negatives else None,
        "n": len(chosen),
        # the denominators (lesions or positive cases; negative cases): what a rate's standard error rests on
        "n_sensitivity": len(hits),
        "n_specificity": len(negatives),
    }


def _verdict(base: dict[str, Any], got: dict[str, Any], rejected: float) -> str:
    if rejected >= CAUGHT:
        return "caught"
    for key in ("sensitivity", "specificity"):
        if base[key] is None or got[key] is None:
            continue
        if abs(got[key] - base[key]) > TOLERANCE:
            return "neither"
    return "holds"


def run_battery(
    card: ModelCard, session: Any, cases: Sequence[Case], battery: Sequence[Perturbation]
) -> dict[str, Any]:
    """The battery's table for one model: baseline and, per perturbation, rejection, metrics, verdict."""
    kept, results = _scores(card, session, cases)
    base = _metrics(card, cases, results, kept)
    rows = {}
    for perturbation in battery:
        moved = []
        for i, case in enumerate(cases):
            applied = [perturbation.apply(ds, i) for ds in case.datasets]
            mapper = applied[0][1]
            boxes = [[mapper(b) for b in bx] if mapper else bx for bx in case.boxes]
            moved.append(Case([a[0] for a in applied], case.label, boxes))
        p_kept, p_results = _scores(card, session, moved)
        rejected = 1.0 - float(np.mean(p_kept))
        got = _metrics(card, moved, p_results, p_kept)
        rows[perturbation.name] = {"rejected": rejected, **got, "verdict": _verdict(base, got, rejected)}
    return {
        "rule": (
            f"caught: the gate rejects >= {CAUGHT:.0%}; holds: on what the gate lets through, sensitivity "
            f"and specificity within {TOLERANCE:g} of the unperturbed images; otherwise neither"
        ),
        "unit": "series" if card.task == "series_classification" else "image",
        "baseline": {"rejected": 1.0 - float(np.mean(kept)), **base},
        "perturbations": rows,
    }


def cases_from_records(records: Sequence[Any], label: str, series: bool) -> list[Case]:
    """Held-out records as battery cases: one per image, or one per series (slice order) for CT."""
    from pydicom import dcmread

    groups: dict[str, list[Any]] = {}
    for record in records:
        groups.setdefault(record.series_uid if series else record.sop_uid, []).append(record)
    cases = []
    for _, group in sorted(groups.items()):
        group.sort(key=lambda r: r.slice_index or 0)
        boxes = [[(b.x0, b.y0, b.x1, b.y1) for b in r.boxes if b.label == label] for r in group]
        positive = int(any(r.labels.get(label, 0) == 1 for r in group))
        cases.append(Case([dcmread(r.path) for r in group], positive, boxes))
    return cases


def ship_robustness(model_dir: Any, records: Sequence[Any], seed: int) -> ModelCard:
    """Run the battery for ``model_dir``'s model on ``records`` and write it into card.json and card.md."""
    from training.export import ort_session, write_card_md

    card = ModelCard.read(model_dir / "card.json")
    series = card.task == "series_classification"
    battery = CT_BATTERY if series else CXR_BATTERY
    report = run_battery(
        card,
        ort_session(model_dir / card.file),
        cases_from_records(records, card.labels[0].name, series),
        battery,
    )
    report["data"] = f"held-out generator images, seed {seed} (the domain reference's held-out set)"
    final = card.model_copy(update={"robustness": report})
    final.write(model_dir / "card.json")
    write_card_md(final, model_dir, sorted(model_dir.glob("*.png")))
    return final
