"""The one record type every loader yields and every training step consumes.

Loaders for real public formats (RSNA, NIH ChestX-ray14), the generic "DICOM folder + labels.csv" format and
the synthetic generator all end in a list of :class:`Record`, so the training loop never knows where an image
came from. Boxes are in the source image's pixel coordinates; they are mapped into model-input coordinates
by ``service.inference.preprocess.Geometry.to_model`` when the pixels are preprocessed.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["BoxLabel", "LabelError", "Record"]


class LabelError(ValueError):
    """A labels file, label row or image cannot be used; the message names the file or the row."""


@dataclass(frozen=True)
class BoxLabel:
    """A lesion box ``(x0, y0, x1, y1)`` in source pixels (x: column, y: row)."""

    x0: float
    y0: float
    x1: float
    y1: float
    label: str


@dataclass(frozen=True)
class Record:
    """One image (one DICOM instance or one slice of a series) with its labels."""

    path: Path
    patient_id: str
    study_uid: str
    series_uid: str
    sop_uid: str
    labels: Mapping[str, int]
    boxes: tuple[BoxLabel, ...] = ()
    slice_index: int | None = None
    extra: Mapping[str, str] = field(default_factory=dict)
