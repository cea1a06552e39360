"""DICOM dataset → model input tensor, the one function training and serving share.

Why one function: a model is only as good as the agreement between the pixels it was trained on and the
pixels it is served. Training imports this module (it is torch-free) and writes the :class:`PreprocessSpec`
it used into the model card; the service reads the spec back from the card and calls the same code, so the
two cannot drift.

The steps follow the DICOM grayscale pipeline (PS3.3 C.11, PS3.4 N.2). What a model sees is fixed by the
spec's ``version`` (written into the card, so an old card keeps the behaviour it was trained with):

1. stored values → modality values through the Modality LUT Sequence or RescaleSlope/RescaleIntercept
   (C.11.1, pydicom's ``apply_modality_lut``);
2. modality values → [0, 1] through a VOI transformation (C.11.2), chosen by ``window_source``:

   - ``"model"``: always the card's own LINEAR window, whatever the file says. The CT hemorrhage model
     uses a fixed 40/80 HU brain window by design: it was trained on Hounsfield units in that window, and
     a scanner's stored window (often a bone or a wide window) must not change what it sees;
   - ``"dicom"``, version 1: the first WindowCenter/WindowWidth read as LINEAR (VOILUTFunction, the VOI
     LUT Sequence and the Presentation LUT Shape are ignored), else the percentile window;
   - ``"dicom"``, version 2: the standard pipeline of :mod:`service.inference.grayscale`: the VOI LUT
     Sequence, else the window through VOILUTFunction (LINEAR, LINEAR_EXACT, SIGMOID), else the
     percentile window;
   - ``"percentile"``: the [percentile_low, percentile_high] range of the image, LINEAR;
3. inverted where higher values display darker: MONOCHROME1 (C.7.6.3.1.2), and in version 2 also a
   Presentation LUT Shape INVERSE on a MONOCHROME2 image (C.11.6.1);
4. resized to the model's input size keeping the aspect ratio, padded with zeros and centred;
5. normalised with the model's mean and standard deviation; a 3-channel model (``channels``) gets the
   gray image in each channel, each normalised with its own ``channel_mean``/``channel_std``.

The :class:`Geometry` returned alongside maps boxes between model-input and source-pixel coordinates, so a
detection is reported in the pixels of the referenced SOP instance.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydicom.dataset import Dataset
from pydicom.pixels import apply_modality_lut

from service.dicom.decode import codestream_mismatch, contained_decoder
from service.errors import PreprocessError
from service.inference.grayscale import (
    Window,
    apply_window,
    dataset_window,
    inverts,
    percentile_window,
    voi_lut_unit,
    window_for,
    window_unit,
)

__all__ = [
    "MAX_PIXELS",
    "PREPROCESS_VERSION",
    "Geometry",
    "PreprocessSpec",
    "Preprocessed",
    "modality_frames",
    "model_input",
    "preprocess_dataset",
    "resize_keep_aspect",
    "unit_frames",
]


MAX_PIXELS = 2**25
"""Most values (rows x columns x frames x samples) one instance may decode to: 32 Mi, e.g. one 5792 x 5792
image or 128 frames of 512 x 512. Decoding plus the modality LUT take ~14 bytes a value (stored, float64,
float32), so one instance stays under ~450 MiB. Checked before decoding, with every compressed frame's own
header (:func:`_check_codestreams`): a 1 KiB JPEG 2000 fragment can claim 65535 x 65535 pixels and make the
decoder allocate gigabytes (found by tests/reliability/test_fuzz_dicom.py)."""


PREPROCESS_VERSION = 2
"""The newest preprocessing version (see the module docstring); a card without ``version`` is version 1."""


class PreprocessSpec(BaseModel):
    """Everything that decides what a model sees; written into ``card.json`` under ``preprocessing``."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    version: Literal[1, 2] = Field(
        1,
        description=(
            "1: the first WindowCenter/WindowWidth as LINEAR, MONOCHROME1 inverted (cards before version "
            "2 have no field and keep this); 2: the standard grayscale pipeline (VOI LUT Sequence, "
            "VOILUTFunction LINEAR/LINEAR_EXACT/SIGMOID, Presentation LUT Shape INVERSE)"
        ),
    )
    height: int = Field(gt=0, le=4096, description="model input rows")
    width: int = Field(gt=0, le=4096, description="model input columns")
    window_source: Literal["dicom", "model", "percentile"] = Field(
        "dicom",
        description=(
            "'dicom': the dataset's own VOI (see version), else the percentile window; "
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
    channels: Literal[1, 3] = Field(
        1,
        description=(
            "model input channels: 1, or 3 for a network trained on RGB images (ImageNet weights); the "
            "grayscale image is copied into each channel, then each is normalised with its own mean/std"
        ),
    )
    channel_mean: list[float] | None = Field(
        None, description="per-channel mean (one value per channel) in place of mean, e.g. ImageNet's"
    )
    channel_std: list[float] | None = Field(
        None, description="per-channel standard deviation in place of std"
    )

    @model_validator(mode="after")
    def _per_channel(self) -> PreprocessSpec:
        for name, values in (("channel_mean", self.channel_mean), ("channel_std", self.channel_std)):
            if values is not None and len(values) != self.channels:
                raise ValueError(f"{name} has {len(values)} values for {self.channels} channel(s)")
        if self.channel_std is not None and min(self.channel_std) <= 0:
            raise ValueError("channel_std values must be > 0")
        return self

    def normalisation(self) -> tuple[np.ndarray, np.ndarray]:
        """Mean and standard deviation per channel, shaped ``[channels, 1, 1]`` for broadcasting."""
        mean = self.channel_mean if self.channel_mean is not None else [self.mean] * self.channels
        std = self.channel_std if self.channel_std is not None else [self.std] * self.channels
        shape = (self.channels, 1, 1)
        return np.asarray(mean, np.float32).reshape(shape), np.asarray(std, np.float32).reshape(shape)

    @property
    def unit_key(self) -> tuple[object, ...]:
        """What :func:`unit_frames` depends on: two specs with the same key give the same VOI output."""
        if self.window_source == "model":
            return (self.version, "model", self.window_center, self.window_width)
        return (self.version, self.window_source, self.percentile_low, self.percentile_high)


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
    """Model input for every frame of one instance: float32 ``array [frames, channels, height, width]``."""

    array: np.ndarray
    geometry: Geometry


def modality_frames(ds: Dataset) -> np.ndarray:
    """Decode the pixel data and apply the modality LUT; float32 ``[frames, rows, columns]``, a new array
    the caller owns (never the dataset's cached ``pixel_array``: the VOI step works in place on it).

    Raises :class:`PreprocessError` for data a grayscale model cannot take (colour, no pixels, a transfer
    syntax with no decoder, garbled attributes) and for an image over :data:`MAX_PIXELS`.
    """
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        raise PreprocessError("no pixel data")
    samples = _number(ds, "SamplesPerPixel", 1)
    photometric = _photometric(ds)
    if samples != 1 or photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise PreprocessError(
            f"photometric interpretation {photometric or 'missing'} with {samples} samples per pixel: "
            "the models take grayscale (MONOCHROME1/2) images only"
        )
    rows, columns, frames = _check_size(ds, samples)
    tsuid = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    try:
        if "PixelData" in ds:
            mismatch = codestream_mismatch(str(tsuid), ds.PixelData, rows, columns, samples)
            if mismatch is not None:
                raise PreprocessError(mismatch)
        with contained_decoder():  # a Rust decoder's panic is a BaseException: same net as the rest
            stored = ds.pixel_array
        # The modality LUT reads RescaleSlope/ModalityLUTSequence, which can be as garbled as the pixels
        # (a LUTDescriptor of the wrong length raised IndexError): inside the same net.
        values = np.asarray(apply_modality_lut(stored, ds), dtype=np.float32)
        if np.may_share_memory(values, stored):  # float pixels without a rescale: pydicom's own array
            values = values.copy()
    except PreprocessError:
        raise
    except Exception as exc:  # pydicom raises many types for undecodable data; all mean the same here
        name = getattr(tsuid, "name", None) or str(tsuid or "unknown transfer syntax")
        raise PreprocessError(f"pixel data cannot be decoded ({name}): {exc}") from exc
    # RescaleSlope "nan" or 1e308, NaN float pixels: a NaN model input. min and max propagate NaN and
    # show infinities, without the whole-image boolean temporary of isfinite().all().
    if values.size and not (np.isfinite(values.min()) and np.isfinite(values.max())):
        raise PreprocessError("pixel values are not finite after the modality LUT (RescaleSlope/Intercept?)")
    if frames > 1 and values.ndim == 3:
        return values
    if values.ndim != 2:
        raise PreprocessError(f"unexpected pixel array shape {values.shape}")
    return values[np.newaxis]


def _get(ds: Dataset, keyword: str) -> Any:
    """``ds.get`` for a dataset that may be garbled: pydicom converts a value on first access and raises
    for one it cannot convert (BytesLengthException, NotImplementedError for SamplesPerPixel sent with a
    wrong or unknown VR: found by tests/reliability/test_fuzz_dicom.py); that is a PreprocessError here."""
    try:
        return ds.get(keyword)
    except Exception as exc:
        raise PreprocessError(f"{keyword} cannot be read ({type(exc).__name__})") from exc


def _photometric(ds: Dataset) -> str:
    return str(_get(ds, "PhotometricInterpretation") or "").strip().upper()


def _number(ds: Dataset, keyword: str, default: int) -> int:
    """An integer attribute; a garbled one (wrong VR, several values, text) is a PreprocessError."""
    value = _get(ds, keyword)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except (TypeError, ValueError, OverflowError):
        raise PreprocessError(f"{keyword} is not a number") from None


def _check_size(ds: Dataset, samples: int) -> tuple[int, int, int]:
    """Refuse an image over :data:`MAX_PIXELS` before anything is decoded; (rows, columns, frames)."""
    rows, columns = _number(ds, "Rows", 0), _number(ds, "Columns", 0)
    frames = _number(ds, "NumberOfFrames", 1) or 1  # 0 is read as 1, as pydicom does
    if rows < 1 or columns < 1 or frames < 1:
        raise PreprocessError(f"image has {rows} rows, {columns} columns and {frames} frame(s)")
    values = rows * columns * frames * samples
    if values > MAX_PIXELS:
        raise PreprocessError(
            f"image too large: {rows} x {columns} x {frames} frame(s) x {samples} sample(s) = {values} "
            f"values; the limit is {MAX_PIXELS}"
        )
    return rows, columns, frames


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


def _unit_v2(ds: Dataset, frame: np.ndarray, spec: PreprocessSpec) -> np.ndarray:
    """Version 2's VOI step and inversion for one frame (module docstring, step 2 and 3); the result may
    overwrite ``frame``."""
    if spec.window_source == "model":
        unit = window_unit(frame, Window(spec.window_center, spec.window_width), overwrite=True)
    else:
        lut = voi_lut_unit(ds, frame) if spec.window_source == "dicom" else None
        if lut is not None:
            unit = lut
        else:
            window = dataset_window(ds) if spec.window_source == "dicom" else None
            if window is None:
                window = percentile_window(frame, spec.percentile_low, spec.percentile_high)
            unit = window_unit(frame, window, overwrite=True)
    return np.subtract(np.float32(1.0), unit, out=unit) if inverts(ds) else unit


def unit_frames(ds: Dataset, spec: PreprocessSpec) -> np.ndarray:
    """Steps 1-3 (decode, modality LUT, VOI, inversion): float32 ``[frames, rows, columns]`` in ``[0, 1]``.

    What comes out depends only on ``spec.unit_key``, so models that agree on it share one result
    (:mod:`service.analyse` computes it once per instance for them) and only resize it each.
    """
    values = modality_frames(ds)
    if spec.version == 1:
        inverted = _photometric(ds) == "MONOCHROME1"
        units = []
        for frame in values:
            center, width = window_for(ds, frame, spec)
            unit = apply_window(frame, center, width)
            units.append(1.0 - unit if inverted else unit)
        return np.stack(units).astype(np.float32, copy=False)
    for i in range(len(values)):
        unit = _unit_v2(ds, values[i], spec)
        if unit is not values[i]:  # a VOI LUT's table lookup is a new array
            values[i] = unit
    return values


def model_input(units: np.ndarray, spec: PreprocessSpec) -> Preprocessed:
    """Steps 4-5 on :func:`unit_frames`' output: resize to the model's input, normalise. ``units`` is
    only read (another model may be reading it too)."""
    frames: list[np.ndarray] = []
    geometry: Geometry | None = None
    for unit in units:
        resized, geometry = resize_keep_aspect(unit, spec.height, spec.width, spec.keep_aspect)
        frames.append(resized)
    assert geometry is not None  # modality_frames never returns zero frames
    if spec.channels == 1 and spec.channel_mean is None and spec.channel_std is None:
        array = ((np.stack(frames) - spec.mean) / spec.std)[:, np.newaxis].astype(np.float32, copy=False)
    else:  # the grayscale image in every channel (PS3.3 C.7.6.3.1.2: one sample is gray), normalised each
        mean, std = spec.normalisation()
        array = ((np.stack(frames)[:, np.newaxis] - mean) / std).astype(np.float32, copy=False)
    return Preprocessed(array=array, geometry=geometry)


def preprocess_dataset(ds: Dataset, spec: PreprocessSpec) -> Preprocessed:
    """Run the whole pipeline on one instance (all its frames), as ``spec.version`` says."""
    return model_input(unit_frames(ds, spec), spec)
