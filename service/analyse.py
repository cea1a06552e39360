"""One study through routing → preprocessing → inference → postprocessing, into findings.

Kept apart from :mod:`service.worker` (which claims jobs and saves results). A model in shadow mode (card
``shadow_of``) runs on every series its primary runs on, at routine priority, into ``analysis.shadow``:
the result stores its findings apart (``shadow_findings``), for comparison only. Decoding and preprocessing
run in threads; inference goes through the engine's micro-batcher with the study's priority; the study's
models run concurrently; nothing here blocks the event loop. Datasets the caller already parsed (an HTTP
request's instances) are used as they are: a file is read back only for instances this process does not
hold, and then slice by slice (:mod:`service.study_inputs`: headers first, pixels one instance at a time).
Models of one series that agree on the VOI settings share each image's decode, modality LUT and window
(:class:`service.study_inputs.SharedUnits`) and only resize it each.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping

import numpy as np
from pydicom.dataset import Dataset

from service.compute import run_compute
from service.dicom.ae import PACKAGE_VERSION
from service.errors import PreprocessError
from service.inference import disclosure
from service.inference.backend import Runner
from service.inference.card import ModelCard
from service.inference.domain import InputSummary, judge_series
from service.inference.heatmap import attach_heatmaps
from service.inference.postprocess import ModelImage
from service.inference.segment import follows, is_segmentation, segment_findings, to_measure
from service.results.build import Analysis
from service.results.schema import Finding, NotAnalysed
from service.routing import Route, RoutingRules, SeriesInfo, route_series, shadows
from service.store.instances import InstanceRecord
from service.study_inputs import Item, SharedUnits, get_value, int_value, read_study

__all__ = ["analyse_study"]

logger = logging.getLogger(__name__)

CODE_VERSION = f"pacs-triage {PACKAGE_VERSION}"
"""What ran the models, for each result's reproducibility record (``ModelUsed.code_version``)."""


def _series_info(series_uid: str, items: list[Item]) -> SeriesInfo:
    rec, ds = items[0].record, items[0].dataset
    descriptions = tuple(str(get_value(ds, k, "") or "") for k in ("StudyDescription", "SeriesDescription"))
    return SeriesInfo(
        series_uid=series_uid,
        modality=rec.modality,
        body_part=rec.body_part,
        descriptions=tuple(d for d in descriptions if d),
        sop_class_uid=rec.sop_class_uid,
        samples_per_pixel=int_value(get_value(ds, "SamplesPerPixel", 1), 1),
        photometric=str(get_value(ds, "PhotometricInterpretation", "") or "").strip().upper(),
        n_instances=len(items),
    )


async def _run_route(
    route: Route,
    card: ModelCard,
    items: list[Item],
    engine: Runner,
    priority: int,
    analysis: Analysis,
    units: SharedUnits,
) -> None:
    def prepare() -> tuple[list[ModelImage], list[NotAnalysed]]:
        """Every image of the series in scan order (:func:`read_study` ordered them): a series
        classifier reads the volume as it was scanned."""
        ok: list[ModelImage] = []
        bad: list[NotAnalysed] = []
        for item in items:
            rec = item.record
            try:
                ok.append(ModelImage(rec.sop_instance_uid, units.preprocess(item, card)))
            except PreprocessError as exc:
                bad.append(
                    NotAnalysed(
                        series_uid=route.series_uid,
                        model=card.name,
                        reason=f"not analysed: instance {rec.sop_instance_uid}: {exc.reason}",
                    )
                )
        return ok, bad

    images, bad = await run_compute(prepare)
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
        unlike the validated ones get no finding; the heat maps of the positive ones
        (service/inference/heatmap.py); and the series' summary for the drift monitor. One thread hop."""
        judged = judge_series(card, route.series_uid, images, batch, out, items[0].dataset)
        rejected = []
        for index, reason in judged.verdict.rejected:
            where = "" if index is None else f"instance {images[index].sop_instance_uid}: "
            rejected.append(
                NotAnalysed(
                    series_uid=route.series_uid, model=card.name, reason=f"not analysed: {where}{reason}"
                )
            )
        kept = [images[i] for i in judged.verdict.kept]
        found = judged.findings
        if found:  # positive findings only get a heat map
            found = attach_heatmaps(card, found, kept, judged.verdict.select(out))
        return rejected, found, judged.summary

    inputs = [img.sop_instance_uid for img in images]
    rejected, found, summary = await run_compute(judge)
    analysis.not_analysed.extend(rejected)
    analysis.findings.extend(found)
    analysis.inputs.append(summary)
    analysis.record_model(card, engine.providers_for(card.name), CODE_VERSION, inputs)


async def _segment(
    analysis: Analysis,
    cards: Mapping[str, ModelCard],
    measured: Mapping[str, list[Item]],
    engine: Runner,
    priority: int,
    units: SharedUnits,
) -> None:
    """Segmentation models on the series their classifier flagged (:mod:`service.inference.segment`)."""
    by_uid = {item.record.sop_instance_uid: item for items in measured.values() for item in items}
    await segment_findings(
        analysis,
        _segmenters(cards),
        {uid: [(i.record.sop_instance_uid, i.dataset) for i in items] for uid, items in measured.items()},
        engine,
        priority,
        lambda uid, card: units.preprocess(by_uid[uid], card),
    )


def _segmenters(cards: Mapping[str, ModelCard]) -> list[ModelCard]:
    return [c for c in cards.values() if is_segmentation(c)]


Flagged = Callable[[Analysis], Awaitable[None]]
"""Called with the findings before the segmentation measures the positive ones (a copy: the segmentation
goes on meanwhile), so that the flag does not wait for the measurements."""


async def analyse_study(
    records: list[InstanceRecord],
    *,
    rules: RoutingRules,
    cards: dict[str, ModelCard],
    load_errors: dict[str, str],
    engine: Runner,
    priority: int,
    datasets: Mapping[str, Dataset] | None = None,
    flagged: Flagged | None = None,
) -> Analysis:
    """Route every series of a study, run its models and collect findings and not-analysed reasons.

    ``datasets``: instances the caller holds parsed, by SOP Instance UID; the others are read from disk.
    ``flagged``: when a segmentation model is to measure a positive finding, it is called with the
    findings so far, concurrently with the segmentation (the worker stores them as a measurements-pending
    result: a 32-slice head CT's bleed is on the worklist ~250 ms sooner on two CPU cores, where the
    segmentation takes longer than the classifier; bench/RESULTS.md, session 24).
    """
    analysis = Analysis()
    held = datasets or {}
    if all(r.sop_instance_uid in held for r in records):
        by_series, unread = read_study(records, held)  # nothing to read: no thread hop
    else:
        by_series, unread = await run_compute(read_study, records, held)
    for series_uid, reason in sorted(set(unread)):
        analysis.not_analysed.append(NotAnalysed(series_uid=series_uid, reason=reason))
    shadow_of = shadows(cards, rules)
    if shadow_of:
        analysis.shadow = Analysis()
    planned: list[tuple[Route, list[Item], int, Analysis]] = []
    measured: dict[str, list[Item]] = {}  # series a segmentation model measures if a classifier flags them
    for series_uid, items in sorted(by_series.items()):
        routes, skipped = route_series(_series_info(series_uid, items), rules, cards, load_errors)
        analysis.not_analysed.extend(skipped)
        if any(follows(c, {r.model for r in routes}) for c in cards.values()):
            measured[series_uid] = items  # in scan order
        routes = [r for r in routes if not is_segmentation(cards[r.model])]  # they run after, on flags only
        planned.extend((r, items, priority, analysis) for r in routes)
        if analysis.shadow is not None:  # shadow mode: beside each primary, at routine priority
            planned.extend(
                (Route(r.series_uid, s), items, 2, analysis.shadow)
                for r in routes
                for s in shadow_of.get(r.model, [])
            )
    units = SharedUnits.plan([(cards[route.model], items) for route, items, _, _ in planned])
    work = [_run_route(r, cards[r.model], items, engine, p, into, units) for r, items, p, into in planned]
    with disclosure.collecting() as sent:  # what left for remote backends (shadow runs too): audited
        await asyncio.gather(*work)
        if measured and to_measure(analysis.findings, _segmenters(cards), measured):
            segmenting = _segment(analysis, cards, measured, engine, priority, units)
            if flagged is None:
                await segmenting
            else:
                flagging = asyncio.ensure_future(flagged(analysis.before_measuring()))
                try:
                    await segmenting
                finally:  # the flag is saved (or refused) before a failure of the job is recorded
                    await flagging
    analysis.remote_requests.extend(sent)
    analysis.findings.sort(key=lambda f: (f.series_uid, f.model, f.label))
    if analysis.shadow is not None:
        analysis.shadow.findings.sort(key=lambda f: (f.series_uid, f.model, f.label))
    return analysis
