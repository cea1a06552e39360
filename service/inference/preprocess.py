"""DICOM dataset → model input tensor, the one function training and serving share.

Why one function: a model is only as good as the agreement between the pixels it was trained on and the
pixels it is served. Training imports this module (it is torch-free) and writes the :class:`PreprocessSpec`
it used into the model card; the service reads the spec back from the card and calls the same code, so the
two cannot drift.

The steps follow the DICOM grayscale pipeline (PS3.3 C.11, PS3.4 N.2):

1. stored values → modality values through the Modality LUT or RescaleSlope/RescaleIntercept (C.11.1);
2. modality values → [0, 1] through a VOI window (C.11.2.1.2, "LINEAR"): the window from the dataset's
   tags, the model's own default, or a percentile window when the dataset has none;
3. MONOCHROME1 inverted so that higher is always brighter (C.7.6.3.1.2);
4. resized to the model's input size keeping the aspect ratio, padded with zeros and centred;
5. normalised with the model's mean and standard deviation.

The :class:`Geometry` returned alongside maps boxes between model-input and source-pixel coordinates, so a
detection is reported in the pixels of the referenced SOP instance.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field
from pydicom.dataset import Dataset
from pydicom.pixels import apply_modality_lut

__all__ = [
    "Geometry",
    "PreprocessError",
    "PreprocessSpec",
    "Preprocessed",
    "apply_window",
    "modality_frames",
    "preprocess_dataset",
    "resize_keep_aspect",
    "window_for",
]


class PreprocessError(ValueError):
    """The dataset cannot be turned into a model input; ``reason`` is meant for a person."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class PreprocessSpec(BaseModel):
    """Everything that decides what a model sees; written into ``card.json`` under ``preprocessing``."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    height: int = Field(gt=0, le=4096, description="model input rows")
    width: int = Field(gt=0, le=4096, description="model input columns")
    window_source: Literal["dicom", "model", "percentile"] = Field(
        "dicom",
        description=(
            "'dicom': the first WindowCenter/WindowWidth of the dataset, else the percentile window; "
            "'model': always window_center/window_width (e.g. a CT brain window in HU); "
            "'percentile': the [percentile_low, percentile_high] range of the image"
        ),
    )
    window_center: float = 40.0
    window_width: float = Field(80.0, gt=0)
    percentile_low: float = Field(0.5, ge=0, lt=50)
    percentile_high: float = Field(99.5, gt=50, le=100)
    keep_aspect: bool = True
    mean: float = 0.0
    std: float = Field(1.0, gt=0)


@dataclass(frozen=True)
class Geometry:
    """How source pixels were placed into the model input: ``model = source * scale + offset``."""

    rows: int
    columns: int
    scale_y: float
    scale_x: float
    offset_y: float
    offset_x: float

    def to_source(self, box: tuple[float, float, float, float]) -> tuple[float, float, float, float]:
        """Map an ``(x0, y0, x1, y1)`` box in model-input pixels to source pixels, clipped to the image."""
        x0, y0, x1, y1 = box
        sx0 = (x0 - self.offset_x) / self.scale_x
        sx1 = (x1 - self.offset_x) / self.scale_x
        sy0 = (y0 - self.offset_y) / self.scale_y
        sy1 = (y1 - self.offset_y) / self.scale_y
        return (
            float(np.clip(sx0, 0, self.columns)),
            float(np.clip(sy0, 0, self.rows)),
            float(np.clip(sx1, 0, self.columns)),
            float(np.clip(sy1, 0, self.rows)),
        )

    def to_model(self, box: tuple[float, float, float, float]) -> tuple[float, float, float, float]:
        """Map an ``(x0, y0, x1, y1)`` box in source pixels to model-input pixels."""
        x0, y0, x1, y1 = box
        return (
            x0 * self.scale_x + self.offset_x,
            y0 * self.scale_y + self.offset_y,
            x1 * self.scale_x + self.offset_x,
            y1 * self.scale_y + self.offset_y,
        )


@dataclass(frozen=True)
class Preprocessed:
    """Model input for every frame of one instance: ``array`` is float32 ``[frames, 1, height, width]``."""

    array: np.ndarray
    geometry: Geometry


def modality_frames(ds: Dataset) -> np.ndarray:
    """Decode the pixel data and apply the modality LUT; float32 ``[frames, rows, columns]``.

    Raises :class:`PreprocessError` for data a grayscale model cannot take (colour, no pixels, a transfer
    syntax with no decoder). The caller is expected to have checked the dataset's size limits.
    """
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        raise PreprocessError("no pixel data")
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    photometric = str(ds.get("PhotometricInterpretation", "")).strip().upper()
    if samples != 1 or photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise PreprocessError(
            f"photometric interpretation {photometric or 'missing'} with {samples} samples per pixel: "
            "the models take grayscale (MONOCHROME1/2) images only"
        )
    try:
        stored = ds.pixel_array
    except Exception as exc:  # pydicom raises many types for undecodable data; all mean the same here
        tsuid = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        name = getattr(tsuid, "name", None) or str(tsuid or "unknown transfer syntax")
        raise PreprocessError(f"pixel data cannot be decoded ({name}): {exc}") from exc
    values = np.asarray(apply_modality_lut(stored, ds), dtype=np.float32)
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames > 1 and values.ndim == 3:
        return values
    if values.ndim != 2:
        raise PreprocessError(f"unexpected pixel array shape {values.shape}")
    return values[np.newaxis]


def window_for(ds: Dataset, values: np.ndarray, spec: PreprocessSpec) -> tuple[float, float]:
    """The (center, width) VOI window the spec asks for, for this dataset and these modality values."""
    if spec.window_source == "model":
        return spec.window_center, spec.window_width
    if spec.window_source == "dicom":
        center, width = ds.get("WindowCenter"), ds.get("WindowWidth")
        if center is not None and width is not None:
            c = float(center[0] if _is_multi(center) else center)
            w = float(width[0] if _is_multi(width) else width)
            if w > 1:
                return c, w
    lo, hi = np.percentile(values, [spec.percentile_low, spec.percentile_high])
    width_p = max(float(hi - lo), 2.0)
    return float(lo) + width_p / 2, width_p


def _is_multi(value: object) -> bool:
    return isinstance(value, list | tuple) or type(value).__name__ == "MultiValue"


def apply_window(values: np.ndarray, center: float, width: float) -> np.ndarray:
    """PS3.3 C.11.2.1.2.1 LINEAR window, output scaled to [0, 1] instead of a display range."""
    out = (values - (center - 0.5)) / (width - 1.0) + 0.5
    return np.clip(out, 0.0, 1.0).astype(np.float32, copy=False)


def resize_keep_aspect(
    image: np.ndarray, height: int, width: int, keep_aspect: bool = True
) -> tuple[np.ndarray, Geometry]:
    """Bilinear resize of a 2-D float image to ``height x width``; zero-padded and centred if keep_aspect."""
    rows, columns = image.shape
    if keep_aspect:
        scale = min(height / rows, width / columns)
        scale_y = scale_x = scale
    else:
        scale_y, scale_x = height / rows, width / columns
    new_h = max(1, min(height, round(rows * scale_y)))
    new_w = max(1, min(width, round(columns * scale_x)))
    if (new_h, new_w) == (rows, columns):
        resized = image.astype(np.float32, copy=False)
    else:
        pil = Image.fromarray(np.ascontiguousarray(image, dtype=np.float32), mode="F")
        resized = np.asarray(pil.resize((new_w, new_h), Image.Resampling.BILINEAR), dtype=np.float32)
    off_y, off_x = (height - new_h) // 2, (width - new_w) // 2
    out = np.zeros((height, width), dtype=np.float32)
    out[off_y : off_y + new_h, off_x : off_x + new_w] = resized
    geometry = Geometry(
        rows=rows,
        columns=columns,
        scale_y=new_h / rows,
        scale_x=new_w / columns,
        offset_y=float(off_y),
        offset_x=float(off_x),
    )
    return out, geometry


def preprocess_dataset(ds: Dataset, spec: PreprocessSpec) -> Preprocessed:
    """Run the whole pipeline on one instance (all its frames)."""
    values = modality_frames(ds)
    inverted = str(ds.get("PhotometricInterpretation", "")).strip().upper() == "MONOCHROME1"
    frames: list[np.ndarray] = []
    geometry: Geometry | None = None
    for frame in values:
        center, width = window_for(ds, frame, spec)
        unit = apply_window(frame, center, width)
        if inverted:
            unit = 1.0 - unit
        resized, geometry = resize_keep_aspect(unit, spec.height, spec.width, spec.keep_aspect)
        frames.append((resized - spec.mean) / spec.std)
    assert geometry is not None  # modality_frames never returns zero frames
    array = np.stack(frames)[:, np.newaxis].astype(np.float32, copy=False)
    return Preprocessed(array=array, geometry=geometry)
