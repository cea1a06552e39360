"""One study through routing → preprocessing → inference → postprocessing, into findings.

Kept apart from :mod:`service.worker` (which claims jobs and saves results). A model in shadow mode (card
``shadow_of``) runs on every series its primary runs on, at routine priority, into ``analysis.shadow``:
the result stores its findings apart (``shadow_findings``), for comparison only. Decoding and preprocessing
run in threads; inference goes through the engine's micro-batcher with the study's priority; the study's
models run concurrently; nothing here blocks the event loop. Datasets the caller already parsed (an HTTP
request's instances) are used as they are: a file is read back only for instances this process does not
hold. Models of one series that agree on the VOI settings share each image's decode, modality LUT and
window (:class:`SharedUnits`) and only resize it each.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import Counter, defaultdict
from collections.abc import Mapping
from typing import Any, Protocol

import numpy as np
from pydicom import dcmread
from pydicom.dataset import Dataset

from service.dicom.ae import PACKAGE_VERSION
from service.inference import disclosure
from service.inference.card import ModelCard
from service.inference.domain import assess_domain
from service.inference.postprocess import ModelImage, findings_from_outputs
from service.inference.preprocess import Preprocessed, PreprocessError, model_input, unit_frames
from service.lifecycle.drift_inputs import InputSummary, summarise_series
from service.results.build import Analysis
from service.results.schema import Finding, ModelUsed, NotAnalysed
from service.routing import Route, RoutingRules, SeriesInfo, route_series, shadows
from service.store.instances import InstanceRecord
from service.store.validate import truncation

__all__ = ["InferenceRunner", "analyse_study", "order_slices"]

logger = logging.getLogger(__name__)

CODE_VERSION = f"pacs-triage {PACKAGE_VERSION}"
"""What ran the models, for each result's reproducibility record (``ModelUsed.code_version``)."""


class InferenceRunner(Protocol):
    """The engine surface this module uses (``service.inference.engine.InferenceEngine`` provides it)."""

    async def run(self, model_name: str, images: np.ndarray, priority: int = 2) -> dict[str, np.ndarray]: ...

    def providers_for(self, name: str) -> list[str]: ...


Items = list[tuple[InstanceRecord, Dataset]]


class SharedUnits:
    """The VOI output of each instance (:func:`service.inference.preprocess.unit_frames`), computed once for
    all the models of its series that agree on it, kept only until the last of them has taken it.

    Why: both chest models read the same radiograph with the same VOI settings; decoding, the modality LUT
    and the window were done once per model, about half of the preprocessing of a 1024 x 1024 image. A
    series read by one model caches nothing (a CT series' units would otherwise be held for nothing). The
    lock per instance keeps a second model from computing the same units at the same time.
    """

    def __init__(self, uses: Counter[tuple[str, tuple[object, ...]]]) -> None:
        self._uses = uses
        self._held: dict[tuple[str, tuple[object, ...]], np.ndarray | PreprocessError] = {}
        self._locks: defaultdict[str, threading.Lock] = defaultdict(threading.Lock)
        self._guard = threading.Lock()

    def preprocess(self, sop_instance_uid: str, ds: Dataset, card: ModelCard) -> Preprocessed:
        """The model input of ``card`` for one instance; raises PreprocessError as the pipeline does."""
        spec = card.preprocessing
        key = (sop_instance_uid, spec.unit_key)
        with self._guard:
            lock = self._locks[sop_instance_uid]
        with lock:
            units = self._held.pop(key, None)
            if units is None:
                try:
                    units = unit_frames(ds, spec)
                except PreprocessError as exc:
                    units = exc
            self._uses[key] -= 1
            if self._uses[key] > 0:
                self._held[key] = units
        if isinstance(units, PreprocessError):
            raise units
        return model_input(units, spec)


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


def _drift_summary(card: ModelCard, ds: Dataset, batch: np.ndarray, found: list[Finding]) -> InputSummary:
    """What the drift monitor keeps of this series (:mod:`service.lifecycle.drift_inputs`)."""
    spec = card.preprocessing
    mean = spec.channel_mean[0] if spec.channel_mean else spec.mean
    std = spec.channel_std[0] if spec.channel_std else spec.std
    scores = {f.label: f.probability for f in found}
    return summarise_series(card.name, card.version, ds, batch, mean, std, scores)


async def _run_route(
    route: Route,
    card: ModelCard,
    items: Items,
    engine: InferenceRunner,
    priority: int,
    analysis: Analysis,
    units: SharedUnits,
) -> None:
    datasets = [ds for _, ds in items]
    order = order_slices(datasets) if card.task == "series_classification" else range(len(items))

    def prepare() -> tuple[list[ModelImage], list[NotAnalysed]]:
        ok: list[ModelImage] = []
        bad: list[NotAnalysed] = []
        for i in order:
            rec, ds = items[i]
            try:
                ok.append(ModelImage(rec.sop_instance_uid, units.preprocess(rec.sop_instance_uid, ds, card)))
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

    def judge() -> tuple[list[NotAnalysed], list[Finding], InputSummary]:
        """The input-domain gate (service/inference/domain.py), then findings for what it keeps: images
        unlike the validated ones get no finding; and the series' summary for the drift monitor. One
        thread hop for all three."""
        verdict = assess_domain(card, batch, out, [img.pre.array.shape[0] for img in images])
        rejected = []
        for index, reason in verdict.rejected:
            where = "" if index is None else f"instance {images[index].sop_instance_uid}: "
            rejected.append(
                NotAnalysed(
                    series_uid=route.series_uid, model=card.name, reason=f"not analysed: {where}{reason}"
                )
            )
        kept = [images[i] for i in verdict.kept]
        found = findings_from_outputs(card, route.series_uid, kept, verdict.select(out)) if kept else []
        return rejected, found, _drift_summary(card, items[order[0]][1], batch, found)

    inputs = [img.sop_instance_uid for img in images]
    rejected, found, summary = await asyncio.to_thread(judge)
    analysis.not_analysed.extend(rejected)
    analysis.findings.extend(found)
    analysis.inputs.append(summary)
    providers = engine.providers_for(card.name)
    earlier = analysis.models.get(card.name)  # the same model on another series of the study
    analysis.models[card.name] = ModelUsed(
        name=card.name,
        version=card.version,
        sha256=card.sha256,
        provider=providers[0] if providers else "unknown",
        card_version=card.card_version,
        preprocessing_version=card.preprocessing.version,
        code_version=CODE_VERSION,
        input_instances=(earlier.input_instances if earlier else []) + inputs,
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
    for series_uid, reason in sorted(set(unread)):
        analysis.not_analysed.append(NotAnalysed(series_uid=series_uid, reason=reason))
    shadow_of = shadows(cards, rules)
    if shadow_of:
        analysis.shadow = Analysis()
    planned: list[tuple[Route, Items, int, Analysis]] = []
    for series_uid, items in sorted(by_series.items()):
        routes, skipped = route_series(_series_info(series_uid, items), rules, cards, load_errors)
        analysis.not_analysed.extend(skipped)
        planned.extend((r, items, priority, analysis) for r in routes)
        if analysis.shadow is not None:  # shadow mode: beside each primary, at routine priority
            planned.extend(
                (Route(r.series_uid, s), items, 2, analysis.shadow)
                for r in routes
                for s in shadow_of.get(r.model, [])
            )
    uses: Counter[tuple[str, tuple[object, ...]]] = Counter()
    for route, items, _, _ in planned:
        key = cards[route.model].preprocessing.unit_key
        uses.update((rec.sop_instance_uid, key) for rec, _ in items)
    units = SharedUnits(uses)
    work = [_run_route(r, cards[r.model], items, engine, p, into, units) for r, items, p, into in planned]
    with disclosure.collecting() as sent:  # what left for remote backends (shadow runs too): audited
        await asyncio.gather(*work)
    analysis.remote_requests.extend(sent)
    analysis.findings.sort(key=lambda f: (f.series_uid, f.model, f.label))
    if analysis.shadow is not None:
        analysis.shadow.findings.sort(key=lambda f: (f.series_uid, f.model, f.label))
    return analysis
