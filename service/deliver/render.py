"""A stored :class:`StudyResult` → the DICOM objects we send back: the TID 1500 SR, the SEG of measured
findings, the preview, and optionally the KOS of the key images and the GSPS of the boxes.

Part of delivery, not of :mod:`service.results` (which stays pure: schema and object builders): this
module reads the source images, writes files and feeds the outbox.

The objects go into the result's study as new series, written durably under ``outputs_dir`` like received
instances, and recorded together with their deliveries (:class:`service.store.outbox.Outbox`). Each new SR
names the study's previous SR in PredecessorDocumentsSequence, so a PACS viewer shows the re-run as a new
version of the same report rather than a second opinion.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from service.results.gsps import build_gsps
from service.results.kos import build_kos
from service.results.preview import build_preview, key_image
from service.results.schema import StudyResult
from service.results.seg import build_seg, series_segments
from service.results.sr import SRReference, build_sr
from service.store.files import instance_relpath, write_durably
from service.store.outbox import NewOutput, OutputRef

__all__ = ["RenderRequest", "render_objects"]

logger = logging.getLogger(__name__)

SR_SERIES_NUMBER = 9901
PREVIEW_SERIES_NUMBER = 9902
KOS_SERIES_NUMBER = 9903
GSPS_SERIES_NUMBER = 9904
SEG_SERIES_NUMBER = 9905


@dataclass(frozen=True)
class RenderRequest:
    result: StudyResult
    sources: dict[str, Path]
    """Stored files of the instances the result references, by SOP Instance UID."""
    predecessor: OutputRef | None
    send_sr: bool
    send_preview: bool
    send_kos: bool = False
    """Also a Key Object Selection of the positive findings' key images (:mod:`service.results.kos`)."""
    send_gsps: bool = False
    """Also a presentation state drawing the positive findings' boxes (:mod:`service.results.gsps`)."""
    send_seg: bool = True
    """A DICOM SEG per segmented series of positive findings (:mod:`service.results.seg`); the SR's TID 1411
    groups reference it, so with ``send_seg`` off the SR carries no volumetric groups."""


def _write(outputs_dir: Path, ds: Dataset, kind: str) -> NewOutput:
    buf = BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    rel = instance_relpath(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)
    write_durably(outputs_dir, rel, buf.getvalue())
    return NewOutput(
        sop_instance_uid=str(ds.SOPInstanceUID),
        series_uid=str(ds.SeriesInstanceUID),
        sop_class_uid=str(ds.SOPClassUID),
        kind=kind,
        relpath=rel.as_posix(),
    )


def render_objects(req: RenderRequest, outputs_dir: Path) -> list[NewOutput]:
    """Build and durably write the result's objects (blocking: run it in a thread)."""
    result = req.result
    if not result.findings:
        return []  # nothing was analysed: the REST result says why; no SR with nothing to report
    datasets = {uid: dcmread(path) for uid, path in req.sources.items()}
    outputs: list[NewOutput] = []
    segmentations: dict[str, Dataset] = {}
    if req.send_seg:  # before the SR, which references the segments
        for group in series_segments(result):
            try:
                seg = build_seg(
                    result,
                    group,
                    datasets,
                    sop_instance_uid=generate_uid(),
                    series_instance_uid=generate_uid(),
                    series_number=SEG_SERIES_NUMBER,
                )
            except ValueError as exc:  # a segmented slice is gone (retention): the SR and the rest still go
                logger.warning("result %s: no segmentation: %s", result.result_id, exc)
                continue
            except Exception:  # highdicom refused the sources: the SR and the rest still go, said loudly
                logger.exception("result %s: the segmentation could not be built", result.result_id)
                continue
            segmentations[group.series_uid] = seg
            outputs.append(_write(outputs_dir, seg, "seg"))
    if req.send_sr:
        predecessor = (
            SRReference(
                study_uid=req.predecessor.study_uid,
                series_uid=req.predecessor.series_uid,
                sop_instance_uid=req.predecessor.sop_instance_uid,
                sop_class_uid=req.predecessor.sop_class_uid,
                result_id=req.predecessor.result_id,
            )
            if req.predecessor
            else None
        )
        sr = build_sr(
            result,
            list(datasets.values()),
            sop_instance_uid=generate_uid(),
            series_instance_uid=generate_uid(),
            series_number=SR_SERIES_NUMBER,
            predecessor=predecessor,
            segmentations=segmentations,
        )
        if sr is not None:
            outputs.append(_write(outputs_dir, sr, "sr"))
    key = key_image(result)
    if req.send_preview and key is not None and key[0] in datasets:
        preview = build_preview(
            result,
            datasets[key[0]],
            frame=key[1],
            sop_instance_uid=generate_uid(),
            series_instance_uid=generate_uid(),
            series_number=PREVIEW_SERIES_NUMBER,
        )
        outputs.append(_write(outputs_dir, preview, "preview"))
    if req.send_kos:
        kos = build_kos(
            result,
            datasets,
            sop_instance_uid=generate_uid(),
            series_instance_uid=generate_uid(),
            series_number=KOS_SERIES_NUMBER,
        )
        if kos is not None:
            outputs.append(_write(outputs_dir, kos, "kos"))
    if req.send_gsps:
        try:
            gsps = build_gsps(
                result,
                datasets,
                sop_instance_uid=generate_uid(),
                series_instance_uid=generate_uid(),
                series_number=GSPS_SERIES_NUMBER,
            )
        except ValueError as exc:  # an image with a box is gone (retention): the SR and the rest still go
            logger.warning("result %s: no presentation state: %s", result.result_id, exc)
            gsps = None
        if gsps is not None:
            outputs.append(_write(outputs_dir, gsps, "gsps"))
    return outputs
