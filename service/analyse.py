"""One study through routing → preprocessing → inference → postprocessing, into findings.

Kept apart from :mod:`service.worker` (which claims jobs and writes results) so the per-task logic, one
function per card ``task``, reads top to bottom. Decoding and preprocessing run in threads; inference goes
through the engine's micro-batcher with the study's priority; nothing here blocks the event loop.
"""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
from pydicom import dcmread
from pydicom.dataset import Dataset

from service.inference.card import ModelCard
from service.inference.postprocess import aggregate_series, decode_detections
from service.inference.preprocess import Preprocessed, PreprocessError, preprocess_dataset
from service.results.schema import Code, Detection, Finding, ModelUsed, NotAnalysed
from service.routing import Route, RoutingRules, SeriesInfo, route_series
from service.store.repository import InstanceRecord
from service.store.validate import truncation

__all__ = ["Analysis", "InferenceRunner", "analyse_study", "order_slices"]

logger = logging.getLogger(__name__)


class InferenceRunner(Protocol):
    """The engine surface this module uses (``service.inference.engine.InferenceEngine`` provides it)."""

    async def run(self, model_name: str, images: np.ndarray, priority: int = 2) -> dict[str, np.ndarray]: ...

    def providers_for(self, name: str) -> list[str]: ...


@dataclass
class Analysis:
    findings: list[Finding] = field(default_factory=list)
    not_analysed: list[NotAnalysed] = field(default_factory=list)
    models: dict[str, ModelUsed] = field(default_factory=dict)


@dataclass(frozen=True)
class _Image:
    """One decoded, preprocessed instance of a routed series."""

    sop_instance_uid: str
    ds: Dataset
    pre: Preprocessed


def _read(
    records: list[InstanceRecord],
) -> tuple[dict[str, list[tuple[InstanceRecord, Dataset]]], list[tuple[str, str]]]:
    """Datasets by series, and ``(series_uid, reason)`` for instances that cannot be analysed as stored:
    unreadable, or truncated (kept by ``store.keep_truncated``: the result says so, issue 15)."""
    by_series: dict[str, list[tuple[InstanceRecord, Dataset]]] = defaultdict(list)
    skipped: list[tuple[str, str]] = []
    for rec in records:
        try:
            ds = dcmread(rec.path)
            cut = truncation(ds, rec.path.stat().st_size)
        except Exception:  # a file we stored must read back; if not, say so in the result
            logger.exception("stored instance %s cannot be read back", rec.sop_instance_uid)
            skipped.append((rec.series_uid, "not analysed: a stored instance cannot be read back"))
            continue
        if cut is not None:
            reason = f"not analysed: instance {rec.sop_instance_uid} is truncated ({cut})"
            skipped.append((rec.series_uid, reason))
            continue
        by_series[rec.series_uid].append((rec, ds))
    return by_series, skipped


def _get(ds: Dataset, keyword: str, default: Any = None) -> Any:
    """``ds.get`` that treats a value pydicom cannot convert as absent: pydicom converts on first access
    and raises (BytesLengthException, OSError for a garbled sequence, ValueError) for a wrong VR or
    length; such an exception here failed the whole study's job (tests/reliability/test_fuzz_dicom.py).
    Preprocessing then says precisely what is wrong with the instance."""
    try:
        return ds.get(keyword, default)
    except Exception:
        return default


def _int(value: Any, default: int) -> int:
    try:
        return int(value or default)
    except (TypeError, ValueError, OverflowError):
        return default


def _series_info(series_uid: str, items: list[tuple[InstanceRecord, Dataset]]) -> SeriesInfo:
    rec, ds = items[0]
    descriptions = tuple(str(_get(ds, k, "") or "") for k in ("StudyDescription", "SeriesDescription"))
    return SeriesInfo(
        series_uid=series_uid,
        modality=rec.modality,
        body_part=rec.body_part,
        descriptions=tuple(d for d in descriptions if d),
        sop_class_uid=rec.sop_class_uid,
        samples_per_pixel=_int(_get(ds, "SamplesPerPixel", 1), 1),
        photometric=str(_get(ds, "PhotometricInterpretation", "") or "").strip().upper(),
        n_instances=len(items),
    )


def order_slices(datasets: list[Dataset]) -> list[int]:
    """Indices of ``datasets`` in scan order: position along the slice normal, else InstanceNumber.

    The normal is the cross product of the ImageOrientationPatient row and column cosines (PS3.3
    C.7.6.2.1.1); projecting ImagePositionPatient on it orders slices whatever the patient orientation.
    """
    try:
        iop = np.asarray([float(v) for v in datasets[0].ImageOrientationPatient], dtype=np.float64)
        normal = np.cross(iop[:3], iop[3:])
        keys = [float(np.dot(normal, [float(v) for v in ds.ImagePositionPatient])) for ds in datasets]
        return sorted(range(len(datasets)), key=lambda i: keys[i])
    except Exception:  # missing or garbled geometry (pydicom raises many types on access): InstanceNumber
        return sorted(range(len(datasets)), key=lambda i: _int(_get(datasets[i], "InstanceNumber", 0), 0))


def _output(outputs: dict[str, np.ndarray], card: ModelCard, preferred: str) -> np.ndarray:
    return outputs[preferred] if preferred in outputs else outputs[card.outputs[0]]


def _finding(
    card: ModelCard, label_index: int, series_uid: str, probability: float, **kwargs: object
) -> Finding:
    label = card.labels[label_index]
    positive = probability >= label.threshold
    return Finding(
        model=card.name,
        model_version=card.version,
        model_sha256=card.sha256,
        label=label.name,
        code=Code(scheme=label.code.scheme, value=label.code.value, meaning=label.code.meaning),
        probability=float(np.clip(probability, 0.0, 1.0)),
        threshold=label.threshold,
        positive=positive,
        urgent=positive and label.urgency in ("stat", "urgent"),
        urgency=label.urgency,
        series_uid=series_uid,
        **kwargs,  # type: ignore[arg-type]
    )


def _rows(images: list[_Image]) -> list[tuple[int, int]]:
    """For each row of the stacked model input: (index into ``images``, 1-based frame number).

    Multi-frame instances contribute one row per frame, so a finding or box can name its frame.
    """
    return [(i, f + 1) for i, img in enumerate(images) for f in range(img.pre.array.shape[0])]


def _classify(
    card: ModelCard, series_uid: str, images: list[_Image], out: dict[str, np.ndarray]
) -> list[Finding]:
    """Per label: the highest probability over the series' images, keyed to that image and frame."""
    index = _rows(images)
    probs = np.asarray(_output(out, card, "probability"), dtype=np.float64).reshape(len(index), -1)
    findings = []
    for li in range(len(card.labels)):
        best = int(np.argmax(probs[:, li]))
        img, frame = index[best]
        findings.append(
            _finding(
                card,
                li,
                series_uid,
                float(probs[best, li]),
                key_instance_uid=images[img].sop_instance_uid,
                key_frame=frame,
            )
        )
    return findings


def _detect(
    card: ModelCard, series_uid: str, images: list[_Image], out: dict[str, np.ndarray]
) -> list[Finding]:
    """One finding for the (single) label: boxes from every frame, mapped back to source pixels.

    The finding's probability is the best box score, or the heatmap peak when no box passed the
    threshold, so a negative still carries a number a reader can compare with the threshold.
    """
    spec = card.detection
    assert spec is not None, "a detection card has a detection spec"
    heat, size = out[spec.heatmap_output], out[spec.size_output]
    threshold = card.labels[0].threshold
    index = _rows(images)
    detections: list[Detection] = []
    best_score, best_row = 0.0, 0
    for row, (img, frame) in enumerate(index):
        peak = float(np.max(heat[row]))
        if peak > best_score:
            best_score, best_row = peak, row
        for box in decode_detections(
            heat[row], size[row], spec.stride, threshold, spec.nms_iou, spec.max_detections
        ):
            x0, y0, x1, y1 = images[img].pre.geometry.to_source(box.xyxy)
            detections.append(
                Detection(
                    sop_instance_uid=images[img].sop_instance_uid,
                    frame=frame,
                    x0=x0,
                    y0=y0,
                    x1=x1,
                    y1=y1,
                    score=float(np.clip(box.score, 0, 1)),
                )
            )
    detections.sort(key=lambda d: d.score, reverse=True)
    key_img, key_frame = index[best_row]
    if detections:
        key = detections[0]
        return [
            _finding(
                card,
                0,
                series_uid,
                key.score,
                key_instance_uid=key.sop_instance_uid,
                key_frame=key.frame,
                detections=detections,
            )
        ]
    return [
        _finding(
            card,
            0,
            series_uid,
            best_score,
            key_instance_uid=images[key_img].sop_instance_uid,
            key_frame=key_frame,
        )
    ]


def _series_classify(
    card: ModelCard, series_uid: str, images: list[_Image], out: dict[str, np.ndarray]
) -> list[Finding]:
    """Slice probabilities (images are already in scan order) → series probability and key slice."""
    index = _rows(images)
    probs = np.asarray(_output(out, card, "probability"), dtype=np.float64).reshape(len(index), -1)
    window = card.aggregation.window if card.aggregation else 3
    findings = []
    for li in range(len(card.labels)):
        prob, key = aggregate_series(probs[:, li], window)
        img, frame = index[key]
        findings.append(
            _finding(
                card, li, series_uid, prob, key_instance_uid=images[img].sop_instance_uid, key_frame=frame
            )
        )
    return findings


_TASKS = {"classification": _classify, "detection": _detect, "series_classification": _series_classify}


async def _run_route(
    route: Route,
    card: ModelCard,
    items: list[tuple[InstanceRecord, Dataset]],
    engine: InferenceRunner,
    priority: int,
    analysis: Analysis,
) -> None:
    datasets = [ds for _, ds in items]
    order = order_slices(datasets) if card.task == "series_classification" else range(len(items))

    def prepare() -> tuple[list[_Image], list[NotAnalysed]]:
        ok: list[_Image] = []
        bad: list[NotAnalysed] = []
        for i in order:
            rec, ds = items[i]
            try:
                ok.append(_Image(rec.sop_instance_uid, ds, preprocess_dataset(ds, card.preprocessing)))
            except PreprocessError as exc:
                bad.append(
                    NotAnalysed(
                        series_uid=route.series_uid,
                        model=card.name,
                        reason=f"not analysed: instance {rec.sop_instance_uid}: {exc.reason}",
                    )
                )
        return ok, bad

    images, bad = await asyncio.to_thread(prepare)
    analysis.not_analysed.extend(bad)
    if not images:
        return
    batch = np.concatenate([img.pre.array for img in images], axis=0)
    try:
        out = await engine.run(card.name, batch, priority)
    except Exception as exc:  # engine failures are reported per route; the rest of the study still runs
        logger.exception("inference failed for model %s", card.name)
        analysis.not_analysed.append(
            NotAnalysed(
                series_uid=route.series_uid,
                model=card.name,
                reason=f"not analysed: inference failed ({type(exc).__name__})",
            )
        )
        return
    analysis.findings.extend(_TASKS[card.task](card, route.series_uid, images, out))
    providers = engine.providers_for(card.name)
    analysis.models[card.name] = ModelUsed(
        name=card.name,
        version=card.version,
        sha256=card.sha256,
        provider=providers[0] if providers else "unknown",
    )


async def analyse_study(
    records: list[InstanceRecord],
    *,
    rules: RoutingRules,
    cards: dict[str, ModelCard],
    load_errors: dict[str, str],
    engine: InferenceRunner,
    priority: int,
) -> Analysis:
    """Route every series of a study, run its models and collect findings and not-analysed reasons."""
    analysis = Analysis()
    by_series, unread = await asyncio.to_thread(_read, records)
    for series_uid, reason in sorted(set(unread)):
        analysis.not_analysed.append(NotAnalysed(series_uid=series_uid, reason=reason))
    work = []
    for series_uid, items in sorted(by_series.items()):
        routes, skipped = route_series(_series_info(series_uid, items), rules, cards, load_errors)
        analysis.not_analysed.extend(skipped)
        work.extend(_run_route(r, cards[r.model], items, engine, priority, analysis) for r in routes)
    await asyncio.gather(*work)
    analysis.findings.sort(key=lambda f: (f.series_uid, f.model, f.label))
    return analysis
