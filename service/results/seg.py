"""A :class:`StudyResult`'s masks → DICOM Segmentation (PS3.3 A.51), one per segmented series, via highdicom.

Why a SEG: it is the standard object a PACS viewer overlays on the CT (the bleed outlined on each slice) and
that the SR's TID 1411 volumetric groups reference (:mod:`service.results.sr_volumes`), so the volume in
the report points at the very voxels it was measured on. ``highdicom.seg.Segmentation`` builds and checks
the IOD; this module decides what goes in:

- the source images are every slice of the series the model segmented (Derivation Image / Referenced
  Series, same study, same Frame of Reference), BINARY segmentation, empty frames omitted;
- one segment per :class:`~service.results.schema.Segment`: category SCT 49755003 "Morphologically
  abnormal structure" (CID 7150), type the finding's own code (SCT 1386000 "Intracranial hemorrhage"),
  algorithm type AUTOMATIC with the model's name, version and sha256 (Segment Description, PS3.3 C.8.20.2);
- "not for diagnostic use" in SeriesDescription and ContentDescription, Manufacturer ``pacs-triage``.

A SEG is built only for **positive** findings whose mask is not empty: a negative study never gets one.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.coding import Code

from service.results.kos import header_of
from service.results.quantify import decode_mask
from service.results.schema import Finding, Segment, StudyResult
from service.results.sr import MANUFACTURER

__all__ = ["ABNORMAL_STRUCTURE", "SEG_SERIES_DESCRIPTION", "SeriesSegments", "build_seg", "series_segments"]

SEG_SERIES_DESCRIPTION = "AI segmentation - not for diagnostic use"
ABNORMAL_STRUCTURE = Code("49755003", "SCT", "Morphologically abnormal structure")
"""Segmented Property Category (CID 7150) of a lesion."""


@dataclass(frozen=True)
class SeriesSegments:
    """The segments of one source series that go into one SEG, with the findings they measure."""

    series_uid: str
    pairs: list[tuple[Finding, Segment]]

    @property
    def instances(self) -> list[str]:
        return self.pairs[0][1].instances


def series_segments(result: StudyResult) -> list[SeriesSegments]:
    """Positive findings' non-empty segments grouped by source series (empty for a negative study)."""
    groups: dict[str, list[tuple[Finding, Segment]]] = {}
    for finding in result.findings:
        if not finding.positive:
            continue
        for segment in finding.segments:
            if segment.frames:
                groups.setdefault(finding.series_uid, []).append((finding, segment))
    return [SeriesSegments(uid, pairs) for uid, pairs in sorted(groups.items())]


def _volume(segment: Segment, order: list[str]) -> np.ndarray:
    """The segment's mask as ``[len(order), rows, columns]`` in the order of ``order``."""
    index = {uid: i for i, uid in enumerate(order)}
    volume = np.zeros((len(order), segment.rows, segment.columns), dtype=bool)
    for frame in segment.frames:
        if frame.sop_instance_uid not in index:
            raise ValueError(f"mask frame of {frame.sop_instance_uid} is not among the segmented instances")
        volume[index[frame.sop_instance_uid]] = decode_mask(frame.mask, segment.rows, segment.columns) > 0
    return volume


def _description(segment: Segment) -> hd.seg.SegmentDescription:
    return hd.seg.SegmentDescription(
        segment_number=segment.number,
        segment_label=f"{segment.label} ({segment.model})"[:64],
        segmented_property_category=ABNORMAL_STRUCTURE,
        segmented_property_type=Code(segment.code.value, segment.code.scheme, segment.code.meaning),
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=hd.AlgorithmIdentificationSequence(
            name=segment.model,
            family=hd.sr.CodedConcept("123109", "DCM", "Artificial Intelligence"),
            version=segment.model_version,
            parameters={"threshold": f"{segment.threshold:.6g}", "sha256": segment.model_sha256},
        ),
    )


def build_seg(
    result: StudyResult,
    group: SeriesSegments,
    sources: Mapping[str, Dataset],
    *,
    sop_instance_uid: str,
    series_instance_uid: str,
    series_number: int,
    instance_number: int = 1,
) -> hd.seg.Segmentation:
    """The BINARY SEG of ``group`` over its source slices (``sources`` by SOP Instance UID, no pixels).

    Raises
    ------
    ValueError
        A segmented instance is missing from ``sources``, is in another study, or two segments of the
        series share a number or disagree on the segmented instances.
    """
    missing = [uid for uid in group.instances if uid not in sources]
    if missing:
        raise ValueError(f"segmented instances missing from sources: {', '.join(missing[:3])}")
    # Type 2 patient/study attributes present (empty where the modality left them out): highdicom copies
    # them from the first source and raised AttributeError on a CT without PatientSex, and the SR and the
    # preview of the same result were then not sent either
    images = [header_of(sources[uid]) for uid in group.instances]
    if any(str(ds.StudyInstanceUID) != result.study_uid for ds in images):
        raise ValueError(f"segmented instances are not all in study {result.study_uid}")
    numbers = [segment.number for _, segment in group.pairs]
    if len(set(numbers)) != len(numbers):
        raise ValueError(f"segment numbers repeat in series {group.series_uid}: {numbers}")
    if any(segment.instances != group.instances for _, segment in group.pairs):
        raise ValueError(f"segments of series {group.series_uid} cover different instances")
    pixels = np.zeros((len(images), images[0].Rows, images[0].Columns, len(group.pairs)), dtype=bool)
    for k, (_, segment) in enumerate(sorted(group.pairs, key=lambda p: p[1].number)):
        pixels[..., k] = _volume(segment, group.instances)
    models = list(dict.fromkeys(f"{s.model} {s.model_version}" for _, s in group.pairs))
    return hd.seg.Segmentation(
        source_images=images,
        pixel_array=pixels,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[_description(s) for _, s in sorted(group.pairs, key=lambda p: p[1].number)],
        series_instance_uid=series_instance_uid,
        series_number=series_number,
        sop_instance_uid=sop_instance_uid,
        instance_number=instance_number,
        manufacturer=MANUFACTURER,
        manufacturer_model_name=", ".join(s.model for _, s in group.pairs)[:64],
        software_versions=models[0][:64],
        device_serial_number=MANUFACTURER,
        content_description=SEG_SERIES_DESCRIPTION[:64],
        content_label="AI_SEGMENTATION",
        series_description=SEG_SERIES_DESCRIPTION,
    )
