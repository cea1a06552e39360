"""The one result schema: REST, SR, preview, worklist and webhooks all take a :class:`StudyResult`.

Frozen and ``extra="forbid"`` (as mercure's Task): a result is written once, and a typo in a field name is
an error rather than a silently dropped value. A re-run because late instances arrived writes a new result
whose ``supersedes`` names the old one; results are never edited in place.
"""

from __future__ import annotations

from datetime import datetime
from enum import IntEnum
from typing import Literal, cast

from pydantic import BaseModel, ConfigDict, Field

__all__ = [
    "Assembly",
    "Code",
    "Detection",
    "Finding",
    "HeatMap",
    "HopTimes",
    "Lesion",
    "MaskFrame",
    "ModelUsed",
    "NotAnalysed",
    "Priority",
    "PriorityName",
    "RemoteRequest",
    "ResultStatus",
    "Segment",
    "StudyResult",
]

PriorityName = Literal["routine", "urgent", "stat"]
"""A priority as REST, results and webhooks carry it (:class:`Priority` is the same thing as a number)."""
ResultStatus = Literal["complete", "partial", "not_analysed", "failed"]


class Priority(IntEnum):
    """The one priority: jobs, the worklist, the outbox and the inference backends order by it; a lower
    number runs first. HL7 v2 ORC-7 / DICOM worklists name the same three levels (STAT, urgent, routine)."""

    STAT = 0
    URGENT = 1
    ROUTINE = 2

    @classmethod
    def of(cls, name: str) -> Priority:
        """``"stat"`` → ``Priority.STAT``: the name a StudyResult or a request carries."""
        return cls[name.upper()]

    @property
    def label(self) -> PriorityName:
        """``Priority.STAT.label == "stat"``: the name REST and results use."""
        return cast(PriorityName, self.name.lower())


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Code(_Frozen):
    """A coded concept (PS3.16 style): scheme designator, code value, code meaning."""

    scheme: str
    value: str
    meaning: str


class Detection(_Frozen):
    """A box in the source pixels (columns x, rows y) of one frame of one SOP instance."""

    sop_instance_uid: str
    frame: int = Field(ge=1, description="1-based frame number, as in DICOM ReferencedFrameNumber")
    x0: float
    y0: float
    x1: float
    y1: float
    score: float = Field(ge=0, le=1)


class Lesion(_Frozen):
    """One 3-D connected component of a segment (service.results.quantify)."""

    volume_ml: float = Field(ge=0)
    max_axial_diameter_mm: float = Field(ge=0, description="longest in-plane extent on its widest slice")
    widest_instance_uid: str = Field(description="the slice where the lesion is widest")


class MaskFrame(_Frozen):
    """The mask on one source slice: ``service.results.quantify.encode_mask`` (packed bits, zlib, base64)."""

    sop_instance_uid: str
    mask: str


class Segment(_Frozen):
    """A segmentation model's mask of one finding on its series, with the measurements it gives.

    ``instances`` lists every slice the model segmented (scan order); ``frames`` only those with blood, at
    the source resolution ``rows x columns``. Becomes one segment of a DICOM SEG (number ``number``) and a
    TID 1411 volumetric measurement group in the SR that references it.
    """

    number: int = Field(1, ge=1, description="SegmentNumber in the DICOM SEG")
    model: str
    model_version: str
    model_sha256: str
    label: str
    code: Code
    threshold: float = Field(ge=0, le=1, description="pixel probability at or above = inside")
    volume_ml: float = Field(ge=0)
    max_axial_diameter_mm: float = Field(ge=0)
    lesions: list[Lesion] = Field(default_factory=list, description="largest first")
    voxel_mm: tuple[float, float, float] = Field(description="row, column and slice spacing (mm)")
    slice_spacing_source: str = Field(description="positions, SpacingBetweenSlices or SliceThickness")
    rows: int = Field(gt=0)
    columns: int = Field(gt=0)
    instances: list[str] = Field(min_length=1)
    frames: list[MaskFrame] = Field(default_factory=list)


class HeatMap(_Frozen):
    """Where the model looked for a positive finding, on its key image (card ``cam_output``).

    The class-activation map (Grad-CAM for a global-average-pooled linear head; Selvaraju et al. 2017)
    mapped from the model input back onto the whole source frame: ``values`` is a ``rows x columns`` grid
    with the source's aspect ratio (:func:`service.results.heatmap.decode_heatmap`: uint8, 255 = ``peak``).
    """

    sop_instance_uid: str
    frame: int = Field(ge=1, description="1-based frame number of the key image")
    rows: int = Field(gt=0, description="grid rows (covering the source's rows)")
    columns: int = Field(gt=0, description="grid columns (covering the source's columns)")
    values: str = Field(description="base64 of zlib-compressed uint8, row-major; 255 = the map's peak")
    peak: float = Field(ge=0, description="the map's maximum in the model's units (ReLU of the weighted sum)")
    output: str = Field(description="the model output it came from (the card's cam_output)")


class Finding(_Frozen):
    """One label of one model on one series."""

    model: str
    model_version: str
    model_sha256: str
    label: str
    code: Code
    probability: float = Field(ge=0, le=1)
    threshold: float = Field(ge=0, le=1)
    positive: bool
    urgent: bool = Field(description="positive and the label's urgency is stat or urgent")
    urgency: PriorityName = Field(description="worklist priority the label asks for when positive")
    series_uid: str
    key_instance_uid: str | None = None
    key_frame: int | None = Field(None, ge=1)
    detections: list[Detection] = Field(default_factory=list)
    segments: list[Segment] = Field(
        default_factory=list, description="masks with volume and diameter (positive findings only)"
    )
    heatmap: HeatMap | None = Field(
        None, description="where the model looked on the key image (positive findings of a model with a cam)"
    )


class NotAnalysed(_Frozen):
    """A series (or instance) that no model looked at, and why. Never silence."""

    series_uid: str
    model: str | None = None
    reason: str = Field(description="starts with 'not analysed: '")


class ModelUsed(_Frozen):
    """One model that ran on the study: the reproducibility record.

    Enough to run the same computation again and get the same numbers: the exact graph (``sha256``), the
    card schema and preprocessing versions that decided what it saw, the service's version, the
    execution provider, and the instances it was given. Results stored before the record existed read
    with the new fields empty.
    """

    name: str
    version: str
    sha256: str
    provider: str = Field(description="ONNX Runtime execution provider that ran it")
    card_version: int | None = Field(None, description="model card schema version (card.json card_version)")
    preprocessing_version: int | None = Field(
        None, description="preprocessing pipeline version of the card (preprocessing.version)"
    )
    code_version: str | None = Field(None, description="pacs-triage version that ran it")
    input_instances: list[str] = Field(
        default_factory=list,
        description="SOP Instance UIDs given to the model, series by series in the order they were stacked",
    )

    def describe(self) -> str:
        """One line for the SR, FHIR Provenance and logs (no patient data: model and software only)."""
        return (
            f"{self.name} {self.version} (sha256 {self.sha256}; card v{self.card_version or 1}, "
            f"preprocessing v{self.preprocessing_version or 1}; {self.code_version or 'pacs-triage'}; "
            f"{self.provider}; {len(self.input_instances)} instance(s))"
        )


class RemoteRequest(_Frozen):
    """One request that took a study's data to a remote inference backend (issue 18: which backend saw
    what). Each is also an audit event of the study (``remote_inference``, GET /v1/studies/{uid}/audit)."""

    model: str
    backend: str = Field(description='where it went, as models[].provider names it ("KServeV2:<URL>")')
    request_id: str = Field(description="the pseudonymous id the request carried (random, new each time)")
    sent: Literal["pixels", "deidentified-dicom"] = Field(
        description="pixels: preprocessed pixels only, no DICOM header; deidentified-dicom: DICOM objects"
        " after the PS3.15 Annex E Basic Profile (docs/deidentification.md)"
    )
    images: int = Field(ge=0, description="images (or instances) in the request")


class HopTimes(_Frozen):
    """When the study passed each hop, so time-to-flag is a measurement (timezone-aware UTC)."""

    first_instance_received: datetime | None = None
    last_instance_received: datetime | None = None
    study_complete: datetime | None = None
    inference_started: datetime | None = None
    inference_done: datetime | None = None
    result_stored: datetime | None = None
    worklist_updated: datetime | None = Field(
        None,
        description="the worklist entry took this result (same transaction as result_stored), or its "
        "findings earlier, in the job's measurements-pending result",
    )


class Assembly(_Frozen):
    """How complete the study was when it was analysed, from the evidence (see service.assemble)."""

    complete: bool | None = Field(
        description="true: every image series has the instances it declares (ImagesInAcquisition); false: "
        "some series has fewer (the result is partial); null: no counts declared, presumed complete "
        "(association released or no new instance for the quiet time)"
    )
    instances_analysed: int = Field(ge=0, description="image instances stored when the analysis started")
    instances_declared: int | None = Field(
        None, ge=0, description="image instances the series declare, when every series declares its count"
    )

    def describe(self) -> str:
        """One line for the SR and the preview: how many instances the result rests on."""
        n = self.instances_analysed
        if self.complete is False:
            return f"INCOMPLETE STUDY: analysed {n} of {self.instances_declared} declared image instances"
        if self.complete:
            return f"analysed {n} of {self.instances_declared} declared image instances"
        return f"analysed {n} image instance{'s' if n != 1 else ''} (presumed complete: no count declared)"


class StudyResult(_Frozen):
    result_id: str
    study_uid: str
    accession_number: str | None = Field(None, description="for the API response only; never logged")
    status: ResultStatus
    priority: PriorityName
    findings: list[Finding] = Field(default_factory=list)
    not_analysed: list[NotAnalysed] = Field(default_factory=list)
    models: list[ModelUsed] = Field(default_factory=list)
    timestamps: HopTimes = Field(default_factory=HopTimes)
    supersedes: str | None = None
    measurements_pending: bool = Field(
        False,
        description="true: the findings of the study's classifiers, stored (and on the worklist) before the "
        "segmentation that measures the positive ones has run; the result with the measurements supersedes "
        "this one within a second or so, and only that one is sent to the PACS as SR/SEG",
    )
    assembly: Assembly | None = Field(None, description="how complete the study was when analysed")
    remote_requests: list[RemoteRequest] = Field(
        default_factory=list, description="what left the service for remote inference, request by request"
    )
    shadow_findings: list[Finding] = Field(
        default_factory=list,
        description="findings of models in shadow mode (card shadow_of): stored for comparison "
        "(GET /v1/models/{name}/shadow), never on the worklist, in the SR or in notifications",
    )
    shadow_models: list[ModelUsed] = Field(
        default_factory=list, description="the shadow models that ran, with their reproducibility record"
    )
