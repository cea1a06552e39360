"""Segmentation models on the series their classifier flags: a mask, its volume and diameter, per finding.

Why only there: a segmentation adds something only to a positive finding (how big is the bleed, where is
it); on the ~90 % of head CTs that are negative it would double the inference cost for nothing, and a SEG
must never be sent for a negative study. So :func:`segment_findings` runs after the study's other models,
and a segmentation card whose ``segmentation.after`` names a classifier runs only on the series where that
classifier's finding of the same label is positive. The hot path of a negative study is unchanged.

Per flagged series: every slice in scan order is preprocessed with the card's spec, the probabilities go
through the engine (same micro-batcher and priority as the classifier), each slice's map is taken back to
the source pixels (:func:`service.inference.postprocess.source_mask`), and
:mod:`service.results.quantify` measures the 3-D mask with the voxel size from the headers. The result is a
:class:`~service.results.schema.Segment` on the classifier's finding; anything that prevents it (a
multi-frame instance, no pixel spacing, the engine failing) is a "not analysed: " reason, never silence.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

import numpy as np
from pydicom.dataset import Dataset

from service.compute import run_compute
from service.dicom.ae import PACKAGE_VERSION
from service.errors import PreprocessError, SegmentationError
from service.inference.card import ModelCard
from service.inference.postprocess import source_mask
from service.inference.preprocess import Preprocessed
from service.results.build import Analysis
from service.results.quantify import encode_mask, measure, voxel_size
from service.results.schema import Finding, Lesion, MaskFrame, NotAnalysed, Segment

__all__ = [
    "Preprocess",
    "follows",
    "is_segmentation",
    "segment_findings",
    "segment_series",
    "to_measure",
]

logger = logging.getLogger(__name__)


class _Runner(Protocol):
    async def run(self, model_name: str, images: np.ndarray, priority: int = 2) -> dict[str, np.ndarray]: ...

    def providers_for(self, name: str) -> list[str]: ...


Preprocess = Callable[[str, ModelCard], Preprocessed]
"""The model input of a card for one instance, by SOP Instance UID (the analysis's shared pipeline:
:class:`service.study_inputs.SharedUnits`, which reads a header-only instance's pixels when needed)."""


def is_segmentation(card: ModelCard) -> bool:
    return card.task == "segmentation"


def follows(card: ModelCard, routed: set[str]) -> bool:
    """Whether a segmentation card measures a series routed to ``routed``: routed itself (a site rule names
    it) or following one of them (its card's ``segmentation.after``): it needs no routing rule of its own,
    it goes wherever its classifier goes."""
    if not is_segmentation(card):
        return False
    return card.name in routed or (card.segmentation is not None and card.segmentation.after in routed)


def _prepare(
    card: ModelCard, slices: Sequence[tuple[str, Dataset]], preprocess: Preprocess
) -> list[Preprocessed]:
    pre = []
    for uid, _ in slices:
        try:
            item = preprocess(uid, card)
        except PreprocessError as exc:
            raise SegmentationError(f"instance {uid}: {exc.reason}") from exc
        if item.array.shape[0] != 1:
            raise SegmentationError(f"instance {uid} has {item.array.shape[0]} frames; slices must be single")
        pre.append(item)
    return pre


def _measure(
    card: ModelCard,
    finding: Finding,
    slices: Sequence[tuple[str, Dataset]],
    pre: list[Preprocessed],
    prob: Any,
) -> Segment:
    threshold = card.labels[0].threshold
    masks = np.stack([source_mask(p[0], q.geometry, threshold) for p, q in zip(prob, pre, strict=True)])
    try:
        voxel = voxel_size([ds for _, ds in slices])
    except ValueError as exc:
        raise SegmentationError(f"the bleed cannot be measured: {exc}") from exc
    size = measure(masks, voxel)
    uids = [uid for uid, _ in slices]
    return Segment(
        model=card.name,
        model_version=card.version,
        model_sha256=card.sha256,
        label=finding.label,
        code=finding.code,
        threshold=threshold,
        volume_ml=round(size.volume_ml, 4),
        max_axial_diameter_mm=round(size.max_axial_diameter_mm, 2),
        lesions=[
            Lesion(
                volume_ml=round(les.volume_ml, 4),
                max_axial_diameter_mm=round(les.max_axial_diameter_mm, 2),
                widest_instance_uid=uids[les.widest_slice],
            )
            for les in size.lesions
        ],
        voxel_mm=(voxel.row_mm, voxel.column_mm, voxel.slice_mm),
        slice_spacing_source=voxel.slice_source,
        rows=int(masks.shape[1]),
        columns=int(masks.shape[2]),
        instances=uids,
        frames=[
            MaskFrame(sop_instance_uid=uid, mask=encode_mask(m))
            for uid, m in zip(uids, masks, strict=True)
            if m.any()
        ],
    )


async def segment_series(
    card: ModelCard,
    finding: Finding,
    slices: Sequence[tuple[str, Dataset]],
    engine: _Runner,
    priority: int,
    preprocess: Preprocess,
) -> Segment:
    """The segment of ``finding`` on its series (``slices``: ``(SOP Instance UID, dataset)``, scan order)."""
    pre = await run_compute(_prepare, card, slices, preprocess)
    batch = np.concatenate([p.array for p in pre], axis=0)
    try:
        out = await engine.run(card.name, batch, priority)
    except Exception as exc:  # reported per series; the classifier's finding stands without a mask
        logger.exception("segmentation model %s failed", card.name)
        raise SegmentationError(f"segmentation failed ({type(exc).__name__})") from exc
    output = card.segmentation.output if card.segmentation else card.outputs[0]
    return await run_compute(_measure, card, finding, slices, pre, out[output])


async def segment_findings(
    analysis: Analysis,
    cards: Sequence[ModelCard],
    series: Mapping[str, Sequence[tuple[str, Dataset]]],
    engine: _Runner,
    priority: int,
    preprocess: Preprocess,
) -> None:
    """Attach a segment to each positive finding a segmentation card measures (``series``: the routed
    series' slices in scan order). Runs the series concurrently; edits ``analysis`` in place."""

    async def one(index: int, card: ModelCard) -> None:
        finding = analysis.findings[index]
        try:
            segment = await segment_series(
                card, finding, series[finding.series_uid], engine, priority, preprocess
            )
        except SegmentationError as exc:
            analysis.not_analysed.append(
                NotAnalysed(series_uid=finding.series_uid, model=card.name, reason=f"not analysed: {exc}")
            )
            return
        number = len(analysis.findings[index].segments) + 1
        segments = [*analysis.findings[index].segments, segment.model_copy(update={"number": number})]
        analysis.findings[index] = analysis.findings[index].model_copy(update={"segments": segments})
        code_version = f"pacs-triage {PACKAGE_VERSION}"
        analysis.record_model(card, engine.providers_for(card.name), code_version, segment.instances)

    await asyncio.gather(*(one(index, card) for index, card in to_measure(analysis.findings, cards, series)))


def to_measure(
    findings: Sequence[Finding], cards: Sequence[ModelCard], series: Mapping[str, object]
) -> list[tuple[int, ModelCard]]:
    """``(index of the finding, segmentation card)`` for each positive finding a card measures on a series
    in ``series``: what :func:`segment_findings` will run (empty for a negative study)."""
    wanted = []
    for card in cards:
        after = card.segmentation.after if card.segmentation else None
        label = card.labels[0].name
        for index, finding in enumerate(findings):
            ours = finding.positive and finding.label == label and (after is None or finding.model == after)
            if ours and finding.series_uid in series:
                wanted.append((index, card))
    return wanted
