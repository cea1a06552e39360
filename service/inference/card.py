"""The model card schema: what ``training/export.py`` writes into ``models/<name>/card.json`` and what the
service's registry reads back. One pydantic model for both, so a card the service cannot read cannot be
written in the first place.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from service.inference.preprocess import PreprocessSpec

__all__ = [
    "CARD_VERSION",
    "DEMONSTRATION_NOTICE",
    "Activation",
    "AggregationSpec",
    "Code",
    "DetectionSpec",
    "DomainScore",
    "DomainSpec",
    "DriftReference",
    "Eligibility",
    "NAME_PATTERN",
    "InputSpec",
    "LabelSpec",
    "ModelCard",
    "SegmentationSpec",
    "Urgency",
    "decode_floats",
    "encode_floats",
    "sha256_file",
]

DEMONSTRATION_NOTICE = "demonstration model, not for clinical use"

CARD_VERSION = 2
"""The newest card schema version (:class:`ModelCard`); ``pacs-triage models init`` writes it."""

NAME_PATTERN = r"^[a-z0-9][a-z0-9-]{0,63}$"
"""A model's name: also its folder, a metric label and part of the SR's algorithm name."""

Urgency = Literal["stat", "urgent", "routine"]


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Code(_Frozen):
    """A coded concept (DICOM PS3.16 style): SNOMED CT is scheme ``SCT``, RadLex is ``RADLEX``."""

    scheme: str = Field(description="coding scheme designator, e.g. SCT or RADLEX")
    value: str
    meaning: str


class LabelSpec(_Frozen):
    """One finding a model reports, with its operating point chosen on the validation set."""

    name: str
    index: int | None = Field(
        None,
        ge=0,
        description="column of the score output this label reads (card v2); default: the label's position. "
        "A 2-class softmax model whose class 1 is the finding has one label with index 1",
    )
    code: Code
    threshold: float = Field(ge=0, le=1, description="probability or score at or above = positive")
    urgency: Urgency = Field(description="worklist priority a positive finding asks for")
    threshold_rule: str = Field(description="how the threshold was chosen, e.g. 'sensitivity >= 0.95 on val'")


class InputSpec(_Frozen):
    name: str = "image"
    shape: list[int | None] = Field(description="[batch, channels, height, width]; batch is None (dynamic)")
    dtype: Literal["float32"] = "float32"


class DetectionSpec(_Frozen):
    """CenterNet-style decoding parameters (see service.inference.postprocess.decode_detections)."""

    heatmap_output: str = "heatmap"
    size_output: str = "size"
    stride: int = Field(gt=0)
    nms_iou: float = Field(0.3, ge=0, le=1)
    max_detections: int = Field(10, gt=0)


class AggregationSpec(_Frozen):
    """Slice scores → series score (see service.inference.postprocess.aggregate_series)."""

    method: Literal["max_smoothed"] = "max_smoothed"
    window: int = Field(3, gt=0)


class SegmentationSpec(_Frozen):
    """Per-pixel probabilities → a mask at the source resolution (service.inference.segment).

    The pixel threshold is the label's ``threshold``. ``after`` names the classifier whose positive finding
    (same label) on a series is what the mask measures: the segmentation runs only on those series, so a
    negative study costs nothing and never gets a SEG (issue 16).
    """

    output: str = "probability"
    after: str | None = Field(None, description="run only where this model's finding is positive")


class Eligibility(_Frozen):
    """What the model was trained on; routing sends it nothing else.

    A version 2 card routes by this alone (:func:`service.routing.route_series`): a series of one of the
    ``modalities`` whose BodyPartExamined is one of ``body_parts`` or, without BodyPartExamined, whose
    study or series description has one of the ``keywords`` as a word. Version 1 cards need a YAML rule.
    """

    modalities: list[str] = Field(min_length=1)
    body_parts: list[str]
    keywords: list[str] = Field(
        default_factory=list, description="description words that route a series without BodyPartExamined"
    )
    min_slices: int = Field(1, gt=0, description="series with fewer instances are not analysed")


def encode_floats(values: np.ndarray) -> str:
    """float32 little-endian bytes, base64: a 128 x 128 matrix is one 87 KB line, not 16,384 lines."""
    return base64.b64encode(np.ascontiguousarray(values, dtype="<f4").tobytes()).decode("ascii")


def decode_floats(text: str) -> np.ndarray:
    """The inverse of :func:`encode_floats` (a flat float32 array)."""
    return np.frombuffer(base64.b64decode(text, validate=True), dtype="<f4").astype(np.float32)


class DomainScore(_Frozen):
    """One Mahalanobis distance ``sqrt((x - mean)^T precision (x - mean))`` of a feature vector.

    ``source`` ``"input"``: :func:`service.inference.domain_features.input_statistics` of the
    preprocessed model input (names in ``features``); ``"texture"``:
    :func:`service.inference.domain_features.texture_statistics` (names in ``features``);
    ``"output"``: the model's ``output`` (an extra graph output, e.g. the penultimate-layer embedding).
    ``mean`` and ``precision`` (the inverse of a shrunk covariance, ``dim x dim``) are
    :func:`encode_floats` strings. A score above ``threshold`` is outside the domain.
    """

    name: str
    source: Literal["input", "texture", "output"]
    output: str | None = None
    features: list[str] = Field(default_factory=list)
    dim: int = Field(gt=0)
    mean: str
    precision: str
    threshold: float = Field(gt=0)

    @model_validator(mode="after")
    def _shapes(self) -> DomainScore:
        try:
            mean, precision = decode_floats(self.mean), decode_floats(self.precision)
        except (binascii.Error, ValueError) as exc:
            raise ValueError(f"domain score {self.name}: mean/precision are not base64 float32") from exc
        if mean.shape != (self.dim,) or precision.shape != (self.dim * self.dim,):
            raise ValueError(f"domain score {self.name}: mean/precision do not have dim {self.dim}")
        if not (np.isfinite(mean).all() and np.isfinite(precision).all()):
            raise ValueError(f"domain score {self.name}: mean/precision are not finite")
        if (self.source == "output") != (self.output is not None):
            raise ValueError(f"domain score {self.name}: 'output' names the graph output of source 'output'")
        if self.source != "output" and len(self.features) != self.dim:
            raise ValueError(
                f"domain score {self.name}: {len(self.features)} feature names for dim {self.dim}"
            )
        return self


class DomainSpec(_Frozen):
    """The model's validated input domain (see :mod:`service.inference.domain`).

    ``unit`` ``"image"``: each instance is judged on its own (the median over its frames); ``"series"``:
    the series is judged on the median over its slices. Outside = any score above its threshold.
    ``report`` holds what the card shows people: the fit data, the in-domain rejection rate on held-out
    images, and the detection rate on each constructed out-of-domain set.
    """

    unit: Literal["image", "series"]
    scores: list[DomainScore] = Field(min_length=1)
    report: dict[str, Any] = Field(default_factory=dict)


class DriftReference(_Frozen):
    """What the drift monitor compares a model's latest series with (:mod:`service.lifecycle.drift`).

    Written at export from held-out in-domain series through the serving path
    (:func:`service.inference.domain.judge_series`, so the values are those the service would see);
    ``features`` maps each feature name (``manufacturer``, ``pixel_spacing``, ..., ``score:<label>``) to
    one value per series, None where the series had none (an absent header, no finding). Raw values rather
    than bins: the monitor bins them as it bins its own reference (:mod:`service.lifecycle.drift_stats`).
    """

    source: str = Field(description="the data the values come from")
    series: int = Field(gt=0, description="number of series, the length of every feature list")
    features: dict[str, list[float | str | None]] = Field(min_length=1)

    @model_validator(mode="after")
    def _same_length(self) -> DriftReference:
        wrong = sorted(k for k, v in self.features.items() if len(v) != self.series)
        if wrong:
            raise ValueError(f"drift reference features {wrong} do not hold one value per series")
        return self


Activation = Literal["probabilities", "sigmoid", "softmax"]


class ModelCard(BaseModel):
    """``card.json``: what a model is, what it takes, what it answers, and how far it was validated.

    Version 2 (``card_version``) adds, all optional so version 1 cards read as they are: the score
    output's ``activation`` (applied by the service), ``score_output``, ``cam_output`` (a class-activation
    map the service overlays on positive findings) and ``explanations``, per-label output columns
    (``LabelSpec.index``), 3-channel inputs with per-channel normalisation (``PreprocessSpec.channels``),
    routing by ``eligibility`` alone, and documentation fields after Mitchell et al. 2019, "Model Cards
    for Model Reporting" (license, authors, references, limitations, out-of-scope use, subgroup results,
    regulatory status). Fields this schema does not know are kept, not refused (a card written by a newer
    exporter still loads); ``pacs-triage models check`` lists them in case one is a typo.
    ``docs/card.schema.json`` is this model's JSON Schema.
    """

    model_config = ConfigDict(frozen=True, extra="allow")

    card_version: Literal[1, 2] = Field(
        1, description="1: cards before version 2 (no field); 2: the fields below marked 'card v2'"
    )
    name: str = Field(pattern=NAME_PATTERN)
    version: str
    task: Literal["classification", "detection", "series_classification", "segmentation"]
    description: str
    intended_use: str = DEMONSTRATION_NOTICE
    file: str = "model.onnx"
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    size_bytes: int = Field(gt=0)
    opset: int = Field(ge=17)
    input: InputSpec
    outputs: list[str] = Field(min_length=1)
    score_output: str | None = Field(
        None,
        description="card v2: the output holding the label scores [N, classes]; default 'probability' if "
        "listed, else the first output (classification tasks)",
    )
    activation: Activation = Field(
        "probabilities",
        description="card v2: what the score output holds. 'probabilities': already in [0, 1]; 'sigmoid': "
        "logits, sigmoid applied by the service; 'softmax': logits, softmax over the classes applied by "
        "the service (classification tasks)",
    )
    cam_output: str | None = Field(
        None,
        description="card v2: the output holding a class-activation map [N, labels, h, w] at the last "
        "feature map's resolution (ReLU of the head's weighted sum of the feature maps: Grad-CAM for a "
        "global-average-pooled linear head); the service keeps it, mapped to the source image, for positive "
        "findings only",
    )
    preprocessing: PreprocessSpec
    eligibility: Eligibility
    labels: list[LabelSpec] = Field(min_length=1)
    detection: DetectionSpec | None = None
    aggregation: AggregationSpec | None = None
    segmentation: SegmentationSpec | None = None
    domain: DomainSpec | None = Field(
        None, description="validated input domain; None: no domain gate (cards before it existed)"
    )
    drift_reference: DriftReference | None = Field(
        None,
        description="card v2: per-series input and score values of held-out in-domain series, the drift "
        "monitor's reference; None: the monitor takes the first series after start",
    )
    metrics: dict[str, Any] = Field(
        default_factory=dict, description="held-out test-set metrics, measured once at the end"
    )
    robustness: dict[str, Any] | None = Field(
        None,
        description="the robustness battery (training/robustness.py): per perturbation, holds/caught/neither",
    )
    parity: dict[str, Any] = Field(default_factory=dict, description="torch vs ONNX Runtime check at export")
    training: dict[str, Any] = Field(
        default_factory=dict, description="data, split, seed, epochs, hyper-parameters"
    )
    created: str
    license: str | None = Field(None, description="card v2: the model's licence, e.g. an SPDX identifier")
    authors: list[str] = Field(default_factory=list, description="card v2: who made the model")
    references: list[str] = Field(default_factory=list, description="card v2: papers, URLs, DOIs")
    limitations: str | None = Field(None, description="card v2: known failure modes and caveats")
    out_of_scope_use: str | None = Field(None, description="card v2: uses the model was not made for")
    subgroup_results: dict[str, Any] | None = Field(
        None, description="card v2: metrics per subgroup (sex, age band, scanner vendor, site)"
    )
    explanations: dict[str, Any] | None = Field(
        None,
        description="card v2: how the class-activation map and the t-SNE plot of the held-out embeddings "
        "were made (training/explain.py)",
    )
    regulatory_status: str | None = Field(
        None, description="card v2: e.g. 'not cleared for clinical use', a CE mark or an FDA 510(k) number"
    )
    shadow_of: str | None = Field(
        None,
        pattern=NAME_PATTERN,
        description="card v2: run in shadow of this model: on every series routed to it, this model runs too "
        "and its findings are stored and compared (GET /v1/models/{name}/shadow), never shown on the "
        "worklist, in the SR or in notifications",
    )

    @model_validator(mode="after")
    def _consistent(self) -> ModelCard:
        for score in self.domain.scores if self.domain else []:
            if score.output is not None and score.output not in self.outputs:
                raise ValueError(f"domain score {score.name} reads output {score.output!r}, not in outputs")
        if self.shadow_of == self.name:
            raise ValueError("a model cannot be its own shadow")
        if self.score_output is not None and self.score_output not in self.outputs:
            raise ValueError(f"score_output {self.score_output!r} is not in outputs")
        if self.cam_output is not None and self.cam_output not in self.outputs:
            raise ValueError(f"cam_output {self.cam_output!r} is not in outputs")
        if self.cam_output is not None and self.task not in ("classification", "series_classification"):
            raise ValueError("cam_output is for classification tasks (a detector's boxes already say where)")
        if self.task == "detection" and self.activation == "softmax":
            raise ValueError("a detection heatmap takes activation 'probabilities' or 'sigmoid', not softmax")
        columns = self.label_columns()
        if len(set(columns)) != len(columns):
            raise ValueError(f"two labels read the same output column ({columns})")
        channels = self.input.shape[1] if len(self.input.shape) > 1 else None
        if channels is not None and channels != self.preprocessing.channels:
            raise ValueError(
                f"input.shape has {channels} channel(s), "
                f"preprocessing.channels is {self.preprocessing.channels}"
            )
        return self

    @property
    def unknown_fields(self) -> list[str]:
        """Top-level fields this schema does not know (kept, shown by ``models check``)."""
        return sorted(self.model_extra or {})

    @property
    def scores_name(self) -> str:
        """The output the labels' scores come from (classification tasks)."""
        if self.score_output is not None:
            return self.score_output
        return "probability" if "probability" in self.outputs else self.outputs[0]

    def label_columns(self) -> list[int]:
        """The score-output column of each label, in label order."""
        return [i if label.index is None else label.index for i, label in enumerate(self.labels)]

    @classmethod
    def read(cls, path: Path) -> ModelCard:
        return cls.model_validate_json(path.read_text(encoding="utf-8"))

    def write(self, path: Path) -> None:
        path.write_text(self.model_dump_json(indent=2) + "\n", encoding="utf-8")


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
