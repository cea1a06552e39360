"""TID 1411 volumetric ROI measurement groups: a segment's volume and diameter, referencing its DICOM SEG.

Why a separate group per segment (PS3.16 TID 1500 row 8 → TID 1411): a TID 1500 reader lists measurement
groups; a volumetric group's Referenced Segment (TID 1411 row 7, the SEG's SOP instance and segment
number) lets a viewer show the outline the numbers were measured on. Beside the qualitative group of the
finding (:mod:`service.results.sr`), each group holds:

- Finding (DCM 121071) = the finding's code, Tracking Identifier / UID, the algorithm (TID 4019);
- Volume (SCT 118565006), UCUM ``ml``: voxels x voxel size from the headers;
- Diameter (SCT 81827009), UCUM ``mm``: the largest axial diameter over the segment's lesions.

The Referenced Segment names the SEG and its source series (TID 1411 row 9) rather than each source frame:
highdicom's ``ReferencedSegment.from_segmentation`` reads SegmentIdentificationSequence per frame, which a
one-segment SEG keeps in the shared functional groups (highdicom 0.28 raises AttributeError there).
The tracking UID is derived from the result id, so rebuilding a result's SR gives the same identifiers.
Per-lesion numbers (3-D connected components of one segment) are not separate ROIs in the SEG, so they go
into the report's comments (:func:`lesion_comments`), and in full into the REST JSON and worklist.
"""

from __future__ import annotations

from collections.abc import Mapping

import highdicom as hd
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.uid import generate_uid

from service.results.schema import Finding, Segment, StudyResult

__all__ = ["DIAMETER", "VOLUME", "lesion_comments", "volume_groups"]

VOLUME: Code = codes.SCT.Volume
"""SCT 118565006 "Volume"."""
DIAMETER: Code = codes.SCT.Diameter
"""SCT 81827009 "Diameter"."""
_ML = Code("ml", "UCUM", "milliliter")
_MM = codes.UCUM.Millimeter


def _algorithm(segment: Segment) -> hd.sr.AlgorithmIdentification:
    return hd.sr.AlgorithmIdentification(
        name=segment.model,
        version=segment.model_version,
        parameters=[f"threshold={segment.threshold:.6g}", f"sha256={segment.model_sha256}"],
        manufacturer="pacs-triage",
    )


def volume_groups(
    result: StudyResult, index: int, finding: Finding, segmentations: Mapping[str, Dataset]
) -> list[hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations]:
    """One TID 1411 group per segment of ``finding`` that a SEG in ``segmentations`` (by source series
    UID) holds; none for a negative finding or a segment without a SEG."""
    seg = segmentations.get(finding.series_uid)
    if not finding.positive or seg is None:
        return []
    numbers = {int(item.SegmentNumber) for item in seg.SegmentSequence}
    groups = []
    for segment in finding.segments:
        if segment.number not in numbers:
            continue
        text = f"{finding.model}: {finding.label} segment {segment.number} ({segment.model})"
        algorithm = _algorithm(segment)
        groups.append(
            hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
                tracking_identifier=hd.sr.TrackingIdentifier(
                    identifier=text[:64],
                    uid=generate_uid(entropy_srcs=[result.result_id, str(index), text]),
                ),
                referenced_segment=hd.sr.ReferencedSegment(
                    sop_class_uid=str(seg.SOPClassUID),
                    sop_instance_uid=str(seg.SOPInstanceUID),
                    segment_number=segment.number,
                    source_series=hd.sr.SourceSeriesForSegmentation(finding.series_uid),
                ),
                finding_type=Code(finding.code.value, finding.code.scheme, finding.code.meaning),
                algorithm_id=algorithm,
                measurements=[
                    hd.sr.Measurement(
                        name=VOLUME, value=round(segment.volume_ml, 3), unit=_ML, algorithm_id=algorithm
                    ),
                    hd.sr.Measurement(
                        name=DIAMETER,
                        value=round(segment.max_axial_diameter_mm, 1),
                        unit=_MM,
                        algorithm_id=algorithm,
                    ),
                ],
            )
        )
    return groups


def lesion_comments(result: StudyResult) -> list[str]:
    """One TEXT line per segment listing its lesions (3-D connected components), for the report comments."""
    lines = []
    for finding in result.findings:
        for segment in finding.segments if finding.positive else []:
            parts = [
                f"lesion {k}: {lesion.volume_ml:.2f} mL, {lesion.max_axial_diameter_mm:.1f} mm"
                for k, lesion in enumerate(segment.lesions, start=1)
            ]
            lines.append(
                f"{segment.model} on series {finding.series_uid}: {segment.volume_ml:.2f} mL in total, "
                f"largest axial diameter {segment.max_axial_diameter_mm:.1f} mm; {len(parts)} lesion(s)"
                + (f" ({'; '.join(parts)})" if parts else "")
            )
    return lines
