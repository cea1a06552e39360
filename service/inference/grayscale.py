"""The grayscale pipeline after the modality LUT: VOI LUT or window, Presentation LUT Shape, MONOCHROME1.

Why a module of its own: a CR/DX producer says how its image is meant to look, and a model trained on one
rendering sees another if we ignore what it says. PS3.4 N.2 (Grayscale Transformations) orders the steps:
stored values → Modality LUT (done by :func:`service.inference.preprocess.modality_frames`) → VOI LUT →
Presentation LUT → P-values. Here every step ends in ``[0, 1]`` float32, brighter = higher, which is what
the models take and what the preview scales to 8 bits.

- VOI (PS3.3 C.11.2): the first item of the VOI LUT Sequence when there is one (pydicom's ``apply_voi``,
  scaled by the LUT's declared output range ``2**bits - 1``, C.11.2.1.1); else the first WindowCenter /
  WindowWidth pair through VOILUTFunction: LINEAR (C.11.2.1.2.1, the default when absent), LINEAR_EXACT
  (C.11.2.1.3.2) or SIGMOID (C.11.2.1.3.1). A LUT is preferred to a window when both are present, as
  pydicom's ``apply_voi_lut`` does: a non-linear LUT is the producer's tone curve, the window only an
  alternative view. Without either, or with values that cannot be used (width below the function's
  minimum, NaN, a garbled LUT), the image's own ``[low, high]`` percentile range is windowed LINEAR.
- Why not pydicom's ``apply_windowing``: it scales to the stored bit depth's range (``BitsStored``,
  RescaleSlope) in float64 and needs both to be right; we need ``[0, 1]`` in float32 on the hot path. The
  formulas here are the same three (tests/service/inference/test_preprocess_grayscale.py checks them
  against ``apply_windowing`` rescaled).
- Version 1 (:func:`window_for`, :func:`apply_window`, kept for cards written before version 2): the
  first window read as LINEAR, no VOI LUT, no Presentation LUT Shape; MONOCHROME1 inverted.
- Inversion (C.7.6.3.1.2, C.11.6.1): MONOCHROME1 means "minimum is white", so its output is inverted. The
  Presentation LUT Shape INVERSE inverts a MONOCHROME2 image. For MONOCHROME1 images the DX, MG and IO
  modules *require* INVERSE (C.8.11.7: "INVERSE - output after inversion is in P-Values - shall be used if
  Photometric Interpretation is MONOCHROME1"): there it names the same single inversion, not a second one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol

import numpy as np
from pydicom.dataset import Dataset
from pydicom.pixels import apply_voi

__all__ = [
    "VOI_FUNCTIONS",
    "VoiFunction",
    "Window",
    "WindowSpec",
    "apply_window",
    "dataset_window",
    "display_unit",
    "inverts",
    "percentile_window",
    "voi_lut_unit",
    "window_for",
    "window_unit",
]

VoiFunction = Literal["LINEAR", "LINEAR_EXACT", "SIGMOID"]
VOI_FUNCTIONS: tuple[VoiFunction, ...] = ("LINEAR", "LINEAR_EXACT", "SIGMOID")


@dataclass(frozen=True)
class Window:
    """One VOI window: ``center`` and ``width`` in modality values, and its PS3.3 C.11.2.1 function."""

    center: float
    width: float
    function: VoiFunction = "LINEAR"

    def usable(self) -> bool:
        """PS3.3 C.11.2.1.2: LINEAR needs ``width >= 1``; LINEAR_EXACT and SIGMOID ``width > 0``."""
        if not (np.isfinite(self.center) and np.isfinite(self.width)):
            return False
        return self.width >= 1 if self.function == "LINEAR" else self.width > 0


def window_unit(values: np.ndarray, window: Window, *, overwrite: bool = False) -> np.ndarray:
    """Apply ``window`` to modality values; float32 in ``[0, 1]`` (the standard's ``y_min..y_max``).

    LINEAR (C.11.2.1.2.1): ``x <= c - 0.5 - (w - 1) / 2`` → 0; ``x > c - 0.5 + (w - 1) / 2`` → 1; else
    ``((x - (c - 0.5)) / (w - 1) + 0.5)``. A width of exactly 1 is a step at ``c - 0.5``.
    LINEAR_EXACT (C.11.2.1.3.2): ``x <= c - w / 2`` → 0; ``x > c + w / 2`` → 1; else ``(x - c) / w + 0.5``.
    SIGMOID (C.11.2.1.3.1): ``1 / (1 + exp(-4 (x - c) / w))``.

    ``overwrite``: ``values`` (float32, owned by the caller and not needed afterwards) holds the result.
    The arithmetic runs in place either way, one pass per operation and no temporaries: on a 1024 x 1024
    image each temporary is a fresh 4 MiB allocation whose page faults cost more than the arithmetic.
    """
    c, w = float(window.center), float(window.width)
    if overwrite and values.dtype == np.float32 and values.flags.writeable:
        x = values
    else:
        x = np.array(values, dtype=np.float32)
    if window.function == "SIGMOID":
        np.subtract(x, np.float32(c), out=x)
        np.multiply(x, np.float32(-4.0), out=x)
        np.divide(x, np.float32(w), out=x)
        np.clip(x, np.float32(-80.0), np.float32(80.0), out=x)  # exp overflows float32 past ~88
        np.exp(x, out=x)
        np.add(x, np.float32(1.0), out=x)
        sigmoid: np.ndarray = np.divide(np.float32(1.0), x, out=x)
        return sigmoid
    if window.function == "LINEAR_EXACT":
        np.subtract(x, np.float32(c), out=x)
        np.divide(x, np.float32(w), out=x)
    elif w > 1:
        np.subtract(x, np.float32(c - 0.5), out=x)
        np.divide(x, np.float32(w - 1.0), out=x)
    else:
        step: np.ndarray = np.greater(x, np.float32(c - 0.5), out=np.empty_like(x, dtype=bool))
        return step.astype(np.float32)
    np.add(x, np.float32(0.5), out=x)
    return np.clip(x, np.float32(0.0), np.float32(1.0), out=x)


def percentile_window(values: np.ndarray, low: float, high: float) -> Window:
    """A LINEAR window over the ``[low, high]`` percentiles of ``values`` (at least 2 wide)."""
    lo, hi = np.percentile(values, [low, high])
    width = max(float(hi - lo), 2.0)
    return Window(center=float(lo) + width / 2, width=width)


def _first(ds: Dataset, keyword: str) -> object:
    value = ds.get(keyword)
    if _is_multi(value):
        return value[0] if len(value) else None
    return value


def dataset_window(ds: Dataset) -> Window | None:
    """The dataset's first WindowCenter/WindowWidth with its VOILUTFunction, or None if absent or unusable.

    An unknown VOILUTFunction is read as LINEAR, the function the standard implies when the attribute is
    absent (C.11.2.1.2); a garbled value of any of the three is no window at all.
    """
    try:
        center, width = _first(ds, "WindowCenter"), _first(ds, "WindowWidth")
        if center is None or width is None or center == "" or width == "":
            return None
        function = str(ds.get("VOILUTFunction") or "LINEAR").strip().upper()
        window = Window(
            center=float(center),  # type: ignore[arg-type]
            width=float(width),  # type: ignore[arg-type]
            function=function if function in VOI_FUNCTIONS else "LINEAR",
        )
    except Exception:  # pydicom converts on access and raises many types for garbled values
        return None
    return window if window.usable() else None


def voi_lut_unit(ds: Dataset, values: np.ndarray) -> np.ndarray | None:
    """The first VOI LUT Sequence item applied to ``values``, scaled to ``[0, 1]``; None without a usable LUT.

    pydicom's ``apply_voi`` reads the LUT (descriptor, US or OW data and its byte order) and maps its own
    input domain, ``first .. first + entries - 1``, into a table once; the frame is then looked up in that
    table, with values below the first entry mapped to it and above the last to the last (C.11.2.1.1). This
    costs one small table per image instead of ``apply_voi``'s masked copies of the whole frame (~4x faster
    on a 512 x 512 frame). The LUT's input is the modality output, an integer by construction: values are
    rounded first. The output range is ``0 .. 2**n - 1`` for the descriptor's ``n`` bits per entry (8, 10-16).
    """
    try:
        sequence = ds.get("VOILUTSequence")
        if not sequence:
            return None
        item = sequence[0]
        entries, first, bits = (int(v) for v in item.LUTDescriptor[:3])
        entries = entries or 2**16  # PS3.3 C.11.2.1.1: 0 means 65536 entries
        if "LUTData" not in item or not 8 <= bits <= 16:
            return None
        domain = np.arange(first, first + entries, dtype=np.int64)
        table = apply_voi(domain, ds, index=0).astype(np.float32) / float(2**bits - 1)
        if table.shape != (entries,):
            return None
    except Exception:  # a garbled LUT (descriptor, data length, VR): the window is the fallback
        return None
    index = np.clip(np.rint(values) - first, 0, entries - 1).astype(np.intp)
    looked_up: np.ndarray = np.take(table, index)
    return looked_up.clip(0.0, 1.0)


def inverts(ds: Dataset) -> bool:
    """True when higher values display darker: MONOCHROME1, or Presentation LUT Shape INVERSE (C.11.6.1)."""
    try:
        photometric = str(ds.get("PhotometricInterpretation") or "").strip().upper()
        shape = str(ds.get("PresentationLUTShape") or "").strip().upper()
    except Exception:
        return False
    return photometric == "MONOCHROME1" or shape == "INVERSE"


def display_unit(
    ds: Dataset, values: np.ndarray, low: float = 0.5, high: float = 99.5
) -> tuple[np.ndarray, str]:
    """The dataset's own rendering of one frame of modality values: its VOI LUT, else its window, else
    the ``[low, high]`` percentile window; inverted as :func:`inverts` says.

    Returns ``[0, 1]`` float32 (brighter = higher) and a short description of the VOI step, for a derived
    image's DerivationDescription.
    """
    unit = voi_lut_unit(ds, values)
    if unit is not None:
        description = "the first VOI LUT"
    else:
        window = dataset_window(ds)
        kind = "the dataset's"
        if window is None:
            window, kind = percentile_window(values, low, high), f"a {low:g}-{high:g} percentile"
        unit = window_unit(values, window)
        description = (
            f"{kind} {window.function} VOI window center {window.center:.6g} width {window.width:.6g}"
        )
    if inverts(ds):
        return 1.0 - unit, description + ", inverted (MONOCHROME1 or Presentation LUT Shape INVERSE)"
    return unit, description


# ------------------------------------------------------------ version 1 (cards without a version)


class WindowSpec(Protocol):
    """The window fields of :class:`service.inference.preprocess.PreprocessSpec` (named here, not
    imported: preprocess imports this module)."""

    @property
    def window_source(self) -> str: ...
    @property
    def window_center(self) -> float: ...
    @property
    def window_width(self) -> float: ...
    @property
    def percentile_low(self) -> float: ...
    @property
    def percentile_high(self) -> float: ...


def window_for(ds: Dataset, values: np.ndarray, spec: WindowSpec) -> tuple[float, float]:
    """Version 1's (center, width) LINEAR window for this dataset and these modality values: the card's
    window for ``"model"``; for ``"dicom"`` the first WindowCenter/WindowWidth whatever VOILUTFunction
    says, no VOI LUT; else (or for a width <= 1) the percentile window."""
    if spec.window_source == "model":
        return spec.window_center, spec.window_width
    if spec.window_source == "dicom":
        center, width = _first_number(ds, "WindowCenter"), _first_number(ds, "WindowWidth")
        if center is not None and width is not None and width > 1:
            return center, width
    lo, hi = np.percentile(values, [spec.percentile_low, spec.percentile_high])
    width_p = max(float(hi - lo), 2.0)
    return float(lo) + width_p / 2, width_p


def _is_multi(value: object) -> bool:
    return isinstance(value, list | tuple) or type(value).__name__ == "MultiValue"


def _first_number(ds: Dataset, keyword: str) -> float | None:
    """The first value of a DS attribute, or None when it is missing, empty, not a number or not finite:
    a window of NaN or infinity made the whole model input NaN (tests/reliability/test_fuzz_dicom.py)."""
    try:
        value = ds.get(keyword)
        if _is_multi(value):
            value = value[0] if len(value) else None
        number = None if value is None or value == "" else float(value)
    except Exception:  # garbled: the percentile window is the documented fallback
        return None
    return number if number is not None and np.isfinite(number) else None


def apply_window(values: np.ndarray, center: float, width: float) -> np.ndarray:
    """Version 1's window: PS3.3 C.11.2.1.2.1 LINEAR, output scaled to [0, 1] instead of a display range
    (version 2 uses :func:`service.inference.grayscale.window_unit`, which also takes the other functions)."""
    out = (values - (center - 0.5)) / (width - 1.0) + 0.5
    return np.clip(out, 0.0, 1.0).astype(np.float32, copy=False)
