"""The robustness battery: routine image processing and acquisition changes, measured as rates.

Why: issue 14 measured that processing every CR/DX console applies by default (unsharp masking) took
pneumothorax specificity from 1.00 to 0.00, and one pixel of partial volume at the skull edge did the same
to hemorrhage. A served model must either keep its sensitivity and specificity under such changes, or the
input-domain gate (:mod:`service.inference.domain`) must turn the changed image away. The battery measures
which, per perturbation, on held-out in-domain images, through the serving path (preprocessing, ONNX
Runtime, the gate, the card's threshold):

- ``caught``: the gate rejects at least :data:`CAUGHT` of the perturbed images (or series);
- ``holds``: on the images the gate analyses, sensitivity and specificity after the perturbation are each
  within :data:`TOLERANCE` of the same images' before it (for the detector: lesion sensitivity and
  image-level specificity, i.e. nodule-free films without a box). Paired on the same images, because the
  gate does not turn images away at random: after a 2 px blur it let through the 11 % of films that were
  the softest to begin with, whose specificity unperturbed was already 1.0 against 0.87 for all films
  (session 13), so comparing with every film measured the gate's choice, not the blur;
- ``neither``: a finding, reported on the card as it is, not hidden.

Perturbations act on stored values (what a console or a scanner would change), geometric ones with their
box mapping so the detector is scored on moved lesions. Strengths are stated in each name.
"""

from __future__ import annotations

import functools
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
    "run_batteries",
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


_CHUNK = 32
"""Single-image cases run through ONNX Runtime and the gate this many at a time: one session run and one
pass of the gate's statistics per chunk (per image the cost was about the same as one at a time on this
2-core CPU, session 13; the chunk keeps the number of calls down where a batch is cheaper)."""


def _scores(card: ModelCard, session: Any, cases: Sequence[Case]) -> tuple[list[bool], list[Any]]:
    """(gate kept?, model result) per case: probability (image or series) or the image's detections."""
    from training.export import ort_predict

    series = card.task == "series_classification"
    kept: list[bool] = []
    results: list[Any] = []
    size = 1 if series else _CHUNK
    for start in range(0, len(cases), size):
        chunk = cases[start : start + size]
        arrays = [preprocess_dataset(ds, card.preprocessing) for case in chunk for ds in case.datasets]
        inputs = np.concatenate([a.array for a in arrays])
        out = ort_predict(session, inputs)
        verdict = assess_domain(card, inputs, out, [len(a.array) for a in arrays])
        if series:  # one case: its series, kept whole or not at all
            (case,) = chunk
            kept.append(len(verdict.kept) == len(case.datasets))
            probability = out["probability"][:, 0]
            window = card.aggregation.window if card.aggregation else 3
            results.append(aggregate_series(probability, window)[0])
            continue
        assert len(inputs) == len(chunk), "an image case is one single-frame dataset"
        kept.extend(i in verdict.kept for i in range(len(chunk)))
        for i, array in enumerate(arrays):
            if card.task == "detection":
                assert card.detection is not None
                boxes = decode_detections(
                    out["heatmap"][i], out["size"][i], card.detection.stride, card.labels[0].threshold
                )
                results.append([array.geometry.to_source(b.xyxy) for b in boxes])
            else:
                results.append(float(out["probability"][i, 0]))
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
    return run_batteries([(card, session, cases)], battery)[0]


def _applied_once(perturbation: Perturbation) -> Callable[[Dataset, int], tuple[Dataset, Mapper | None]]:
    """``perturbation.apply`` remembered per dataset, for the models that share it."""
    applied: dict[int, tuple[int, tuple[Dataset, Mapper | None]]] = {}

    def apply(ds: Dataset, index: int) -> tuple[Dataset, Mapper | None]:
        if id(ds) not in applied:
            applied[id(ds)] = (index, perturbation.apply(ds, index))
        seen, result = applied[id(ds)]
        assert seen == index, "a shared image must be the same case of every model (its seed)"
        return result

    return apply


def run_batteries(
    models: Sequence[tuple[ModelCard, Any, Sequence[Case]]], battery: Sequence[Perturbation]
) -> list[dict[str, Any]]:
    """:func:`run_battery` for several models whose cases share their datasets (the two chest models on the
    same films): each perturbation is applied once per image, not once per model."""
    before = [_scores(card, session, cases) for card, session, cases in models]
    rows: list[dict[str, Any]] = [{} for _ in models]
    for perturbation in battery:
        apply = _applied_once(perturbation)
        for (card, session, cases), (kept, results), table in zip(models, before, rows, strict=True):
            moved = []
            for i, case in enumerate(cases):
                done = [apply(ds, i) for ds in case.datasets]
                mapper = done[0][1]
                boxes = [[mapper(b) for b in bx] if mapper else bx for bx in case.boxes]
                moved.append(Case([d[0] for d in done], case.label, boxes))
            p_kept, p_results = _scores(card, session, moved)
            rejected = 1.0 - float(np.mean(p_kept))
            # the images the gate analyses both before and after the perturbation: the pair that isolates
            # what the perturbation does to the model from which images the gate picks
            both = [k and pk for k, pk in zip(kept, p_kept, strict=True)]
            got = _metrics(card, moved, p_results, both)
            was = _metrics(card, cases, results, both)
            table[perturbation.name] = {
                "rejected": rejected,
                **got,
                "unperturbed": {k: was[k] for k in ("sensitivity", "specificity")},
                "verdict": _verdict(was, got, rejected),
            }
    rule = (
        f"caught: the gate rejects >= {CAUGHT:.0%}; holds: on the images the gate analyses, sensitivity "
        f"and specificity after the perturbation within {TOLERANCE:g} of the same images' before it; "
        "otherwise neither"
    )
    return [
        {
            "rule": rule,
            "unit": "series" if card.task == "series_classification" else "image",
            "baseline": {"rejected": 1.0 - float(np.mean(kept)), **_metrics(card, cases, results, kept)},
            "perturbations": table,
        }
        for (card, _, cases), (kept, results), table in zip(models, before, rows, strict=True)
    ]


def cases_from_records(
    records: Sequence[Any], label: str, series: bool, read: Callable[[Any], Dataset] | None = None
) -> list[Case]:
    """Held-out records as battery cases: one per image, or one per series (slice order) for CT.
    ``read``: path -> dataset (default: read each file; pass a shared one to share datasets)."""
    from pydicom import dcmread

    groups: dict[str, list[Any]] = {}
    for record in records:
        groups.setdefault(record.series_uid if series else record.sop_uid, []).append(record)
    cases = []
    for _, group in sorted(groups.items()):
        group.sort(key=lambda r: r.slice_index or 0)
        boxes = [[(b.x0, b.y0, b.x1, b.y1) for b in r.boxes if b.label == label] for r in group]
        positive = int(any(r.labels.get(label, 0) == 1 for r in group))
        cases.append(Case([(read or dcmread)(r.path) for r in group], positive, boxes))
    return cases


def ship_robustness(
    model_dirs: Sequence[Any], records: Sequence[Any], seed: int, part: str = "held_out"
) -> list[ModelCard]:
    """Run the battery for the models in ``model_dirs`` (one kind: their cases share the images) on
    ``records`` and write it into each card.json and card.md."""
    from pydicom import dcmread

    from training.export import ort_session, write_card_md

    cards = [ModelCard.read(d / "card.json") for d in model_dirs]
    series = {c.task == "series_classification" for c in cards}
    assert len(series) == 1, "one kind of model per battery: the cases of all must be the same images"
    battery = CT_BATTERY if series.pop() else CXR_BATTERY
    read = functools.cache(dcmread)  # one Dataset per file, shared by every model's cases
    models = [
        (
            card,
            ort_session(d / card.file),
            cases_from_records(records, card.labels[0].name, card.task == "series_classification", read),
        )
        for d, card in zip(model_dirs, cards, strict=True)
    ]
    what = "the domain reference's held-out set" if part == "held_out" else "a set of its own"
    written = []
    for d, card, report in zip(model_dirs, cards, run_batteries(models, battery), strict=True):
        report["data"] = f"held-out generator images, seed {seed} ({what})"
        final = card.model_copy(update={"robustness": report})
        final.write(d / "card.json")
        write_card_md(final, d, sorted(d.glob("*.png")))
        written.append(final)
    return written
