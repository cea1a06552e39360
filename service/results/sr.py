"""A :class:`StudyResult` → DICOM Comprehensive 3D SR (TID 1500 Measurement Report), via highdicom.

Why an SR: it is the object a PACS stores, shows and forwards beside the images, in the same study, and a
viewer that knows TID 1500 draws the boxes. highdicom builds and checks the content tree; this module only
decides what goes where:

- observation context (TID 1001): a device observer (TID 1004) named ``pacs-triage`` whose model name lists
  the models used;
- per finding, one image-level group (TID 1501): Probability (DCM 122157, UCUM ``1``), a qualitative
  evaluation ``<finding code> = Present | Absent`` (SCT 52101004 / 272519000, CID 240) from ``positive``, the
  key image if any, and the algorithm (TID 4019: model name, version; parameters threshold, sha256 and
  the reproducibility record: card and preprocessing versions, our version, execution provider);
- per detection, one planar ROI group (TID 1410): a closed 5-point POLYLINE SCOORD around the box in the
  referenced image (its frame given only when the image has several), Finding (DCM 121071) = the finding
  code, and the box score as Probability;
- the "Qualitative Evaluations" container of TID 1500 (rows 12 and 14, UMLS C0034375) holds TEXT comments:
  the not-for-diagnostic-use statement, the result status and every "not analysed" reason. A result with no
  findings (not analysed, failed) is still a valid TID 1500 report through this container alone.

"Not for diagnostic use" is said where it survives whatever a PACS shows: in SeriesDescription and in the
first comment of the content tree; the flags agree (PreliminaryFlag PRELIMINARY, VerificationFlag
UNVERIFIED, CompletionFlag COMPLETE only for a complete result). Manufacturer is ``pacs-triage`` so our own
objects are recognised when a PACS sends them back. Patient and study attributes come only from the sources
(highdicom copies them); no other identifying text is written.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import cast

import highdicom as hd
import numpy as np
from highdicom.coding_schemes import CodingSchemeIdentificationItem
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.uid import Comprehensive3DSRStorage, generate_uid

from service.results.schema import Detection, Finding, StudyResult
from service.results.sr_volumes import lesion_comments, volume_groups

__all__ = [
    "MANUFACTURER",
    "PROBABILITY",
    "QUALITATIVE_EVALUATIONS",
    "SR_SERIES_DESCRIPTION",
    "SRReference",
    "build_sr",
    "frame_count",
]

MANUFACTURER = "pacs-triage"
"""Manufacturer of every object we write; the lead's ingest uses it to recognise our objects coming back."""
SR_SERIES_DESCRIPTION = "AI triage result - not for diagnostic use"
DISCLAIMER = (
    "AI triage result - not for diagnostic use. Produced automatically by pacs-triage "
    "(demonstration models); not reviewed by a person."
)
PROBABILITY: Code = codes.DCM.Probability
"""DCM 122157 "Probability": the model output in [0, 1], unit UCUM "1" (no units, CID 7181)."""
QUALITATIVE_EVALUATIONS = Code("C0034375", "UMLS", "Qualitative Evaluations")
"""TID 1500 row 12 container; its TEXT children (row 14) carry the comments."""
_UNIT = codes.UCUM.NoUnits
_LANGUAGE = Code("en-US", "RFC5646", "English (United States)")
"""highdicom's default language for TID 1500 (TID 1204), repeated for the report without measurements."""
_PRESENT: Code = codes.SCT.Present
_ABSENT: Code = codes.SCT.Absent
_PATIENT_STUDY_TYPE2 = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "AccessionNumber",
    "StudyID",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
)
_PROCEDURE_BY_MODALITY: dict[str, Code] = {
    "CT": codes.cid100.CTUnspecifiedBodyRegion,
    "MR": codes.cid100.MRIUnspecifiedBodyRegion,
    "PT": codes.cid100.PETUnspecifiedBodyRegion,
    "NM": codes.cid100.NMUnspecifiedBodyRegion,
    "CR": codes.cid100.XRUnspecifiedBodyRegion,
    "DX": codes.cid100.XRUnspecifiedBodyRegion,
}


_Group = (
    hd.sr.MeasurementsAndQualitativeEvaluations
    | hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations
    | hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations
)


@dataclass(frozen=True)
class SRReference:
    """Where an earlier SR of ours lives: enough for a PredecessorDocumentsSequence item (PS3.3 C.17.2.1)."""

    study_uid: str
    series_uid: str
    sop_instance_uid: str
    sop_class_uid: str = Comprehensive3DSRStorage
    result_id: str | None = None
    """The pacs-triage result it reported: the one a new SR's comments say it supersedes."""

    @classmethod
    def from_dataset(cls, ds: Dataset) -> SRReference:
        return cls(
            study_uid=str(ds.StudyInstanceUID),
            series_uid=str(ds.SeriesInstanceUID),
            sop_instance_uid=str(ds.SOPInstanceUID),
            sop_class_uid=str(ds.SOPClassUID),
        )

    def as_dataset(self) -> Dataset:
        """The four attributes highdicom's ``previous_versions`` reads; no need for the whole old SR."""
        ds = Dataset()
        ds.StudyInstanceUID = self.study_uid
        ds.SeriesInstanceUID = self.series_uid
        ds.SOPInstanceUID = self.sop_instance_uid
        ds.SOPClassUID = self.sop_class_uid
        return ds


def build_sr(
    result: StudyResult,
    sources: Sequence[Dataset],
    *,
    sop_instance_uid: str,
    series_instance_uid: str,
    series_number: int = 9901,
    instance_number: int = 1,
    predecessor: SRReference | None = None,
    institution_name: str | None = None,
    segmentations: Mapping[str, Dataset] | None = None,
) -> hd.sr.Comprehensive3DSR:
    """Build the TID 1500 Comprehensive 3D SR for ``result`` in the study of ``sources``.

    Parameters
    ----------
    result
        The result to report; findings, detections and "not analysed" reasons all go in.
    sources
        Image datasets of the study (pixel data not needed): every key instance and every instance with a
        detection must be among them; they may come from several series, and extra ones are ignored. The
        referenced ones are recorded as evidence (CurrentRequestedProcedureEvidenceSequence); patient and
        study attributes are copied from the first of them (or from ``sources[0]`` when nothing is
        referenced).
    sop_instance_uid, series_instance_uid, series_number, instance_number
        Identity of the new SR; the caller owns UIDs so a retry writes the same object.
    predecessor
        The SR this one replaces (a re-run after late instances): written to PredecessorDocumentsSequence.
    institution_name
        Optional InstitutionName of the SR.
    segmentations
        The DICOM SEGs of the result by source series UID (:mod:`service.results.seg`): each positive
        finding's segments become TID 1411 volumetric groups referencing them (:mod:`.sr_volumes`).

    Raises
    ------
    ValueError
        A referenced instance is missing from ``sources``, a source is from another study, a frame number is
        out of range, or there is no source at all.
    """
    if not sources:
        raise ValueError("build_sr needs at least one source dataset of the study (patient/study attributes)")
    by_uid = {str(ds.SOPInstanceUID): ds for ds in sources}
    other_study = [uid for uid, ds in by_uid.items() if str(ds.StudyInstanceUID) != result.study_uid]
    if other_study:
        raise ValueError(f"sources not in study {result.study_uid}: {', '.join(other_study)}")
    referenced = _referenced_uids(result.findings)
    missing = [uid for uid in referenced if uid not in by_uid]
    if missing:
        raise ValueError(f"referenced SOP instances missing from sources: {', '.join(missing)}")
    evidence = [_header(by_uid[uid]) for uid in referenced] or [_header(sources[0])]
    evidence.extend(_header(seg) for seg in (segmentations or {}).values())  # TID 1411 references them

    groups: list[_Group] = []
    for index, finding in enumerate(result.findings, start=1):
        groups.append(_finding_group(result, index, finding, by_uid))
        groups.extend(
            _detection_group(result, index, box, finding, detection, by_uid[detection.sop_instance_uid])
            for box, detection in enumerate(finding.detections, start=1)
        )
        groups.extend(volume_groups(result, index, finding, segmentations or {}))
    models = _model_names_versions(result)
    observation_context = hd.sr.ObservationContext(
        observer_device_context=hd.sr.ObserverContext(
            observer_type=codes.DCM.Device,
            observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
                uid=generate_uid(entropy_srcs=[MANUFACTURER, *(f"{n} {v}" for n, v in models)]),
                name=MANUFACTURER,
                manufacturer_name=MANUFACTURER,
                model_name=", ".join(n for n, _ in models) or MANUFACTURER,
            ),
        )
    )
    procedures = list(
        dict.fromkeys(
            _PROCEDURE_BY_MODALITY.get(str(ds.get("Modality", "")), codes.cid100.ImagingProcedure)
            for ds in evidence
        )
    )
    root = _report_root(observation_context, procedures, groups)
    root.ContentSequence.append(_comments(result, predecessor))

    sr = hd.sr.Comprehensive3DSR(
        evidence=evidence,
        content=root,
        series_instance_uid=series_instance_uid,
        series_number=series_number,
        sop_instance_uid=sop_instance_uid,
        instance_number=instance_number,
        manufacturer=MANUFACTURER,
        is_complete=result.status == "complete",
        is_final=False,
        is_verified=False,
        institution_name=institution_name,
        previous_versions=[predecessor.as_dataset()] if predecessor else None,
        series_description=SR_SERIES_DESCRIPTION,
        manufacturer_model_name=_lo(", ".join(n for n, _ in models) or MANUFACTURER),
        coding_schemes=_private_schemes(result.findings) or None,
    )
    if models:  # set here: highdicom passes a tuple through, which pydicom refuses for a multi-valued LO
        sr.SoftwareVersions = [_lo(f"{n} {v}") for n, v in models]  # type: ignore[assignment]
    return sr


def _referenced_uids(findings: Sequence[Finding]) -> list[str]:
    """Key instances and detection instances, in order of first mention, without repeats."""
    uids: dict[str, None] = {}
    for finding in findings:
        if finding.key_instance_uid:
            uids[finding.key_instance_uid] = None
        for detection in finding.detections:
            uids[detection.sop_instance_uid] = None
    return list(uids)


def _header(ds: Dataset) -> Dataset:
    """A pixel-free copy of ``ds`` with the Type 2 patient/study attributes present (maybe empty).

    highdicom reads ``evidence[0].PatientSex`` and friends as attributes, which fails on real-world images
    that leave a Type 2 attribute out; an empty value is what the SR must carry then anyway.
    """
    hdr = Dataset()
    for elem in ds:
        if elem.tag.group == 0x7FE0 or (0x6000 <= elem.tag.group <= 0x60FF):
            continue  # pixel data, overlays: large and not needed
        hdr.add(copy.deepcopy(elem))
    for keyword in _PATIENT_STUDY_TYPE2:
        if keyword not in hdr:
            setattr(hdr, keyword, None)
    return hdr


def frame_count(ds: Dataset) -> int:
    """NumberOfFrames, 1 when absent (single-frame IODs); the preview decides frame references by it too."""
    return int(ds.get("NumberOfFrames", 1) or 1)


def _frames(ds: Dataset, frame: int | None) -> list[int] | None:
    """ReferencedFrameNumber only when the image has more than one frame.

    It is Type 1C, required when the reference does not apply to all frames (PS3.3 Table 10-3, Image SOP
    Instance Reference Macro): with one frame it always does. Deciding by NumberOfFrames rather than by IOD
    also suits highdicom, which refuses frame numbers for single-frame IODs that carry NumberOfFrames = 1.
    """
    frames = frame_count(ds)
    if frame is not None and not 1 <= frame <= frames:
        raise ValueError(f"frame {frame} out of range for {ds.SOPInstanceUID} ({frames} frames)")
    return [frame or 1] if frames > 1 else None


def _algorithm(finding: Finding, result: StudyResult) -> hd.sr.AlgorithmIdentification:
    """TID 4019 with the reproducibility record of the model that ran (card and preprocessing versions,
    our version, execution provider) as Algorithm Parameters, after its threshold and sha256."""
    parameters = [f"threshold={finding.threshold:.6g}", f"sha256={finding.model_sha256}"]
    used = next((m for m in result.models if m.name == finding.model), None)
    if used is not None and used.code_version is not None:
        parameters += [
            f"card_version={used.card_version}",
            f"preprocessing_version={used.preprocessing_version}",
            f"code_version={used.code_version}",
            f"execution_provider={used.provider}",
        ]
    return hd.sr.AlgorithmIdentification(
        name=finding.model, version=finding.model_version, parameters=parameters, manufacturer=MANUFACTURER
    )


def _code(finding: Finding) -> Code:
    return Code(finding.code.value, finding.code.scheme, finding.code.meaning)


def _tracking(result: StudyResult, index: int, text: str) -> hd.sr.TrackingIdentifier:
    """Deterministic UIDs: rebuilding the SR of a result gives the same tracking identifiers."""
    return hd.sr.TrackingIdentifier(
        identifier=text, uid=generate_uid(entropy_srcs=[result.result_id, str(index), text])
    )


def _probability(value: float, finding: Finding, result: StudyResult) -> hd.sr.Measurement:
    algorithm = _algorithm(finding, result)
    return hd.sr.Measurement(name=PROBABILITY, value=value, unit=_UNIT, algorithm_id=algorithm)


def _finding_group(
    result: StudyResult, index: int, finding: Finding, by_uid: dict[str, Dataset]
) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    """TID 1501: the finding's probability and present/absent decision, on its key image if it has one."""
    source_images = None
    if finding.key_instance_uid:
        ds = by_uid[finding.key_instance_uid]
        source_images = [
            hd.sr.SourceImageForMeasurementGroup.from_source_image(ds, _frames(ds, finding.key_frame))
        ]
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=_tracking(result, index, f"{finding.model}: {finding.label}"),
        algorithm_id=_algorithm(finding, result),
        measurements=[_probability(finding.probability, finding, result)],
        qualitative_evaluations=[
            hd.sr.QualitativeEvaluation(name=_code(finding), value=_PRESENT if finding.positive else _ABSENT)
        ],
        source_images=source_images,
    )


def _detection_group(
    result: StudyResult, index: int, box: int, finding: Finding, detection: Detection, ds: Dataset
) -> hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations:
    """TID 1410: one box as a closed polyline (SCOORD column/row, PS3.3 C.18.6.1.2), its finding and score."""
    x0, y0, x1, y1 = detection.x0, detection.y0, detection.x1, detection.y1
    corners = np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]], dtype=np.float32)
    region = hd.sr.ImageRegion(
        graphic_type=hd.sr.GraphicTypeValues.POLYLINE,
        graphic_data=corners,
        source_image=hd.sr.SourceImageForRegion.from_source_image(ds, _frames(ds, detection.frame)),
    )
    return hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=_tracking(result, index, f"{finding.model}: {finding.label} box {box}"),
        referenced_region=region,
        finding_type=_code(finding),
        algorithm_id=_algorithm(finding, result),
        measurements=[_probability(detection.score, finding, result)],
    )


def _report_root(
    observation_context: hd.sr.ObservationContext,
    procedures: Sequence[Code],
    groups: Sequence[_Group],
) -> hd.sr.ContainerContentItem:
    """The TID 1500 root container.

    With groups, highdicom's MeasurementReport builds it. Without (nothing analysed), MeasurementReport
    refuses, but TID 1500 needs only one of Imaging Measurements (row 6) or Qualitative Evaluations
    (row 12), so rows 1-4 are written here with highdicom's items, exactly as MeasurementReport writes them.
    """
    if groups:
        report = hd.sr.MeasurementReport(
            observation_context=observation_context,
            procedure_reported=procedures,
            imaging_measurements=groups,
        )
        return cast(hd.sr.ContainerContentItem, report[0])
    root = hd.sr.ContainerContentItem(name=codes.cid7021.ImagingMeasurementReport, template_id="1500")
    root.ContentSequence = hd.sr.ContentSequence()
    # highdicom annotates a CodedConcept; its CodeContentItem takes a pydicom Code as well
    root.ContentSequence.extend(hd.sr.LanguageOfContentItemAndDescendants(_LANGUAGE))  # type: ignore[arg-type]
    root.ContentSequence.extend(observation_context)
    root.ContentSequence.extend(
        hd.sr.CodeContentItem(
            name=codes.DCM.ProcedureReported,
            value=procedure,
            relationship_type=hd.sr.RelationshipTypeValues.HAS_CONCEPT_MOD,
        )
        for procedure in procedures
    )
    return root


def _comments(result: StudyResult, predecessor: SRReference | None) -> hd.sr.ContainerContentItem:
    """TID 1500 row 12 container with TEXT comments (row 14): disclaimer, status, not-analysed reasons.

    "Supersedes" names the result of the SR this one replaces (``predecessor``), the one the PACS holds:
    not ``result.supersedes`` where that is a result no SR was made for (a head CT's findings stored
    before their measurements, ``measurements_pending``, are never rendered); without a predecessor there
    is nothing in the PACS to supersede. A predecessor that does not say its result (made from a dataset)
    falls back to ``result.supersedes``."""
    texts = [DISCLAIMER, f"pacs-triage result {result.result_id}: status {result.status}"]
    if result.assembly is not None:
        texts.append(result.assembly.describe())
    superseded = predecessor and (predecessor.result_id or result.supersedes)
    if superseded:
        texts.append(f"supersedes pacs-triage result {superseded}")
    texts.extend(lesion_comments(result))
    texts.extend(
        f"series {item.series_uid}{f' ({item.model})' if item.model else ''}: {item.reason}"
        for item in result.not_analysed
    )
    container = hd.sr.ContainerContentItem(
        name=QUALITATIVE_EVALUATIONS, relationship_type=hd.sr.RelationshipTypeValues.CONTAINS
    )
    container.ContentSequence = hd.sr.ContentSequence(
        [
            hd.sr.TextContentItem(
                name=codes.DCM.Comment, value=text, relationship_type=hd.sr.RelationshipTypeValues.CONTAINS
            )
            for text in texts
        ]
    )
    return container


def _model_names_versions(result: StudyResult) -> list[tuple[str, str]]:
    """Models that ran, from ``result.models``, else from the findings; each once, in order."""
    pairs = [(m.name, m.version) for m in result.models] or [
        (f.model, f.model_version) for f in result.findings
    ]
    return list(dict.fromkeys(pairs))


def _lo(text: str) -> str:
    """Fit a LO (64 characters); highdicom refuses longer values rather than truncating."""
    return text if len(text) <= 64 else text[:63] + "~"


def _private_schemes(findings: Sequence[Finding]) -> list[CodingSchemeIdentificationItem]:
    """Declare private coding schemes ("99..." designators) used by finding codes (PS3.3 C.12.1.1.2)."""
    schemes = dict.fromkeys(f.code.scheme for f in findings if f.code.scheme.startswith("99"))
    return [
        CodingSchemeIdentificationItem(designator=scheme, name=f"{scheme} (pacs-triage model labels)")
        for scheme in schemes
    ]
