"""One study through routing → preprocessing → inference → postprocessing, into findings.

Kept apart from :mod:`service.worker` (which claims jobs and saves results). Decoding and preprocessing
run in threads; inference goes through the engine's micro-batcher with the study's priority; the study's
models run concurrently; nothing here blocks the event loop. Datasets the caller already parsed (an HTTP
request's instances) are used as they are: a file is read back only for instances this process does not
hold. Two models on one series decode each image once (pydicom caches the decoded array on the dataset;
a lock per instance keeps the second model from decoding it again at the same time).
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import defaultdict
from collections.abc import Mapping
from typing import Any, Protocol

import numpy as np
from pydicom import dcmread
from pydicom.dataset import Dataset

from service.inference import disclosure
from service.inference.card import ModelCard
from service.inference.domain import assess_domain
from service.inference.postprocess import ModelImage, findings_from_outputs
from service.inference.preprocess import PreprocessError, preprocess_dataset
from service.results.build import Analysis
from service.results.schema import ModelUsed, NotAnalysed
from service.routing import Route, RoutingRules, SeriesInfo, route_series
from service.store.instances import InstanceRecord
from service.store.validate import truncation

__all__ = ["InferenceRunner", "analyse_study", "order_slices"]

logger = logging.getLogger(__name__)


class InferenceRunner(Protocol):
    """The engine surface this module uses (``service.inference.engine.InferenceEngine`` provides it)."""

    async def run(self, model_name: str, images: np.ndarray, priority: int = 2) -> dict[str, np.ndarray]: ...

    def providers_for(self, name: str) -> list[str]: ...


Items = list[tuple[InstanceRecord, Dataset]]


def _read(
    records: list[InstanceRecord], held: Mapping[str, Dataset]
) -> tuple[dict[str, Items], list[tuple[str, str]]]:
    """Datasets by series (``held`` ones as they are, the others read from disk), and ``(series_uid,
    reason)`` for instances that cannot be analysed as stored: unreadable, or truncated (kept by
    ``store.keep_truncated``: the result says so, issue 15)."""
    by_series: dict[str, Items] = defaultdict(list)
    skipped: list[tuple[str, str]] = []
    for rec in records:
        ds = held.get(rec.sop_instance_uid)
        if ds is not None:
            by_series[rec.series_uid].append((rec, ds))
            continue
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


def _series_info(series_uid: str, items: Items) -> SeriesInfo:
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


async def _run_route(
    route: Route,
    card: ModelCard,
    items: Items,
    engine: InferenceRunner,
    priority: int,
    analysis: Analysis,
    locks: Mapping[str, threading.Lock],
) -> None:
    datasets = [ds for _, ds in items]
    order = order_slices(datasets) if card.task == "series_classification" else range(len(items))

    def prepare() -> tuple[list[ModelImage], list[NotAnalysed]]:
        ok: list[ModelImage] = []
        bad: list[NotAnalysed] = []
        for i in order:
            rec, ds = items[i]
            try:
                with locks[rec.sop_instance_uid]:  # another model may be decoding it right now
                    pre = preprocess_dataset(ds, card.preprocessing)
                ok.append(ModelImage(rec.sop_instance_uid, pre))
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
    # The input-domain gate (service/inference/domain.py): images unlike the validated ones get no finding.
    verdict = await asyncio.to_thread(
        assess_domain, card, batch, out, [img.pre.array.shape[0] for img in images]
    )
    for index, reason in verdict.rejected:
        where = "" if index is None else f"instance {images[index].sop_instance_uid}: "
        analysis.not_analysed.append(
            NotAnalysed(series_uid=route.series_uid, model=card.name, reason=f"not analysed: {where}{reason}")
        )
    images, out = [images[i] for i in verdict.kept], verdict.select(out)
    if images:
        findings = await asyncio.to_thread(findings_from_outputs, card, route.series_uid, images, out)
        analysis.findings.extend(findings)
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
    datasets: Mapping[str, Dataset] | None = None,
) -> Analysis:
    """Route every series of a study, run its models and collect findings and not-analysed reasons.

    ``datasets``: instances the caller holds parsed, by SOP Instance UID; the others are read from disk.
    """
    analysis = Analysis()
    held = datasets or {}
    if all(r.sop_instance_uid in held for r in records):
        by_series, unread = _read(records, held)  # nothing to read: no thread hop
    else:
        by_series, unread = await asyncio.to_thread(_read, records, held)
    locks = {r.sop_instance_uid: threading.Lock() for r in records}
    for series_uid, reason in sorted(set(unread)):
        analysis.not_analysed.append(NotAnalysed(series_uid=series_uid, reason=reason))
    work = []
    for series_uid, items in sorted(by_series.items()):
        routes, skipped = route_series(_series_info(series_uid, items), rules, cards, load_errors)
        analysis.not_analysed.extend(skipped)
        work.extend(_run_route(r, cards[r.model], items, engine, priority, analysis, locks) for r in routes)
    with disclosure.collecting() as sent:  # what left for remote backends: audited with the result
        await asyncio.gather(*work)
    analysis.remote_requests.extend(sent)
    analysis.findings.sort(key=lambda f: (f.series_uid, f.model, f.label))
    return analysis
