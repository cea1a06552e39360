"""The model card schema: what ``training/export.py`` writes into ``models/<name>/card.json`` and what the
service's registry reads back. One pydantic model for both, so a card the service cannot read cannot be
written in the first place.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from service.inference.preprocess import PreprocessSpec

__all__ = [
    "DEMONSTRATION_NOTICE",
    "AggregationSpec",
    "Code",
    "DetectionSpec",
    "Eligibility",
    "InputSpec",
    "LabelSpec",
    "ModelCard",
    "Urgency",
    "sha256_file",
]

DEMONSTRATION_NOTICE = "demonstration model, not for clinical use"

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


class Eligibility(_Frozen):
    """What the model was trained on; routing sends it nothing else."""

    modalities: list[str]
    body_parts: list[str]
    min_slices: int = Field(1, gt=0, description="series with fewer instances are not analysed")


class ModelCard(_Frozen):
    name: str = Field(pattern=r"^[a-z0-9][a-z0-9-]{0,63}$")
    version: str
    task: Literal["classification", "detection", "series_classification"]
    description: str
    intended_use: str = DEMONSTRATION_NOTICE
    file: str = "model.onnx"
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    size_bytes: int = Field(gt=0)
    opset: int = Field(ge=17)
    input: InputSpec
    outputs: list[str] = Field(min_length=1)
    preprocessing: PreprocessSpec
    eligibility: Eligibility
    labels: list[LabelSpec] = Field(min_length=1)
    detection: DetectionSpec | None = None
    aggregation: AggregationSpec | None = None
    metrics: dict[str, Any] = Field(description="held-out test-set metrics, measured once at the end")
    parity: dict[str, Any] = Field(description="torch vs ONNX Runtime check at export")
    training: dict[str, Any] = Field(description="data, split, seed, epochs, hyper-parameters")
    created: str

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
