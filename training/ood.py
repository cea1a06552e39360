"""Images the shipped models were not made for, built on purpose: other processing chains and other sources.

Why here and not only in tests: the card reports how many of each the input-domain gate catches
(``training.domain``), and the robustness battery (``training.robustness``) uses the same transformations
at milder strengths; one definition keeps the card and the tests honest with each other.

Everything takes and returns pydicom datasets, so the whole serving path (modality LUT, VOI, inversion,
resize) runs on them exactly as on a received image. Transformations of a generator image change only its
pixels; headers stay those of a valid chest radiograph or head CT, so the gate has to judge the content.

- processing chains (:func:`unsharp`, :func:`gamma`, :func:`blur`, :func:`noise`): applied to the stored
  values between the VOI window's ends, as CR/DX consoles apply edge enhancement and tone curves;
- other sources: :func:`other_chest` (a chest radiograph phantom built another way: log-domain exposure,
  ellipse anatomy, 14-bit, MONOCHROME2, 1024 px), :func:`limb` (a non-chest radiograph),
  :func:`shepp_logan_head` (a head CT series from the modified Shepp-Logan phantom, Toft 1996, in HU),
  :func:`noise_image`.
"""

from __future__ import annotations

import copy

import numpy as np
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

__all__ = [
    "blur",
    "gaussian",
    "gamma",
    "limb",
    "noise",
    "noise_image",
    "other_chest",
    "shepp_logan_head",
    "unsharp",
    "with_pixels",
]


def gaussian(image: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian blur (periodic edges padded by reflection) via the FFT; float64."""
    pad = int(np.ceil(3 * sigma))
    padded = np.pad(np.asarray(image, dtype=np.float64), pad, mode="reflect")
    fy = np.fft.fftfreq(padded.shape[0])[:, None]
    fx = np.fft.rfftfreq(padded.shape[1])[None, :]
    kernel = np.exp(-2 * (np.pi * sigma) ** 2 * (fy**2 + fx**2))
    out = np.fft.irfft2(np.fft.rfft2(padded) * kernel, s=padded.shape)
    return out[pad:-pad, pad:-pad] if pad else out


def with_pixels(template: Dataset, stored: np.ndarray, **attrs: object) -> Dataset:
    """A copy of ``template`` with new stored pixels (uint16 or int16 as given), new UIDs and ``attrs``."""
    ds = copy.deepcopy(template)
    stored = np.ascontiguousarray(stored)
    ds.Rows, ds.Columns = stored.shape
    ds.PixelRepresentation = 1 if stored.dtype == np.int16 else 0
    ds.BitsAllocated = 16
    for key, value in attrs.items():
        setattr(ds, key, value)
    ds.PixelData = stored.tobytes()
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    return ds


def _window_range(ds: Dataset) -> tuple[float, float]:
    center, width = float(ds.WindowCenter), float(ds.WindowWidth)
    return center - width / 2, center + width / 2


def _restore(ds: Dataset, values: np.ndarray) -> Dataset:
    top = 2 ** int(ds.BitsStored) - 1
    return with_pixels(ds, np.clip(np.rint(values), 0, top).astype(np.uint16))


def unsharp(ds: Dataset, amount: float, sigma_frac: float = 0.02) -> Dataset:
    """Unsharp masking ``x + amount (x - blur(x))``, blur sigma a fraction of the image width (vendors'
    large-kernel edge enhancement: 1-3 % of the width, amount 0.5-3)."""
    x = ds.pixel_array.astype(np.float64)
    return _restore(ds, x + amount * (x - gaussian(x, sigma_frac * x.shape[1])))


def gamma(ds: Dataset, exponent: float) -> Dataset:
    """A power tone curve over the stored window's range (values outside it are left as they are)."""
    x = ds.pixel_array.astype(np.float64)
    lo, hi = _window_range(ds)
    v = np.clip((x - lo) / (hi - lo), 0, 1)
    inside = (x >= lo) & (x <= hi)
    return _restore(ds, np.where(inside, lo + (hi - lo) * v**exponent, x))


def blur(ds: Dataset, sigma_px: float) -> Dataset:
    """Gaussian blur in source pixels (a softer detector or a smoothing kernel)."""
    return _restore(ds, gaussian(ds.pixel_array.astype(np.float64), sigma_px))


def noise(ds: Dataset, sd_frac: float, seed: int = 0) -> Dataset:
    """Additive Gaussian noise, ``sd_frac`` of the window width (a low-dose or under-exposed image)."""
    x = ds.pixel_array.astype(np.float64)
    lo, hi = _window_range(ds)
    return _restore(ds, x + np.random.default_rng(seed).normal(0, sd_frac * (hi - lo), x.shape))


def _ellipse(y: np.ndarray, x: np.ndarray, cy: float, cx: float, ry: float, rx: float) -> np.ndarray:
    return (((y - cy) / ry) ** 2 + ((x - cx) / rx) ** 2 <= 1).astype(np.float64)


def _to_stored(
    att: np.ndarray, rng: np.random.Generator, bits: int, mono1: bool
) -> tuple[np.ndarray, float, float]:
    """Attenuation → log-exposure detector values with quantum noise, ``bits`` deep.

    Returns (stored, window center, window width)."""
    att = gaussian(att, 1.5)
    exposure = np.exp(-att) * 1e4
    exposure = rng.poisson(exposure).astype(np.float64) + 1
    top = 2**bits - 1
    signal = np.log(exposure)
    signal = (signal - signal.min()) / (np.ptp(signal) + 1e-9)
    stored = np.rint((1 - signal if mono1 else signal) * top * 0.9 + top * 0.05)
    lo, hi = np.percentile(stored, [2, 98])
    return stored.astype(np.uint16), float((lo + hi) / 2), float(hi - lo)


def other_chest(template: Dataset, seed: int, size: int = 1024) -> Dataset:
    """A PA chest radiograph phantom made another way than the generator's: ellipse lungs, heart,
    spine and rib arcs through a log-exposure detector, 14-bit MONOCHROME2, ``size`` px square."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size] / size
    att = 1.2 * _ellipse(y, x, 0.55, 0.5, 0.48, 0.42)  # soft tissue of the trunk
    for side in (-1, 1):
        lung = _ellipse(y, x, 0.47 + rng.uniform(-0.02, 0.02), 0.5 + side * 0.17, 0.27, 0.13)
        att -= 0.8 * lung
        for k in range(9):  # posterior rib arcs
            arc_y = 0.25 + 0.055 * k + 0.25 * (x - 0.5 - side * 0.05) ** 2
            rib = (np.abs(y - arc_y) < 0.008) & (np.abs(x - 0.5) > 0.04) & (np.sign(x - 0.5) == side)
            att += 0.35 * rib * _ellipse(y, x, 0.5, 0.5, 0.45, 0.4)
    att += 0.9 * _ellipse(y, x, 0.6, 0.55, 0.15, 0.13)  # heart
    att += 1.0 * (np.abs(x - 0.5) < 0.035) * (y > 0.1)  # spine
    att += 0.3 * ((np.abs(y - 0.18 - 0.2 * np.abs(x - 0.5)) < 0.01) & (np.abs(x - 0.5) < 0.3))  # clavicles
    att += 1.5 * (y > 0.72 + 0.08 * np.cos((x - 0.5) * 6))  # abdomen below the diaphragm
    stored, center, width = _to_stored(np.clip(att, 0, None), rng, 14, mono1=False)
    return with_pixels(
        template,
        stored,
        BitsStored=14,
        HighBit=13,
        PhotometricInterpretation="MONOCHROME2",
        WindowCenter=round(center, 1),
        WindowWidth=round(width, 1),
        PresentationLUTShape="IDENTITY",
    )


def limb(template: Dataset, seed: int, size: int = 768) -> Dataset:
    """A non-chest radiograph: a forearm or lower leg (two long bones in soft tissue) on air."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size] / size
    tilt = rng.uniform(-0.15, 0.15)
    xr = x - 0.5 - tilt * (y - 0.5)
    att = 1.0 * (np.abs(xr) < 0.16) * (y > 0.03) * (y < 0.97)
    for offset, half in ((-0.06, 0.035), (0.06, 0.028)):
        shaft = np.abs(xr - offset) < half
        cortex = shaft & (np.abs(xr - offset) > half * 0.55)
        att += 0.6 * shaft + 1.2 * cortex
    mono1 = bool(rng.random() < 0.5)
    stored, center, width = _to_stored(att, rng, 12, mono1=mono1)
    return with_pixels(
        template,
        stored,
        BitsStored=12,
        HighBit=11,
        PhotometricInterpretation="MONOCHROME1" if mono1 else "MONOCHROME2",
        PresentationLUTShape="INVERSE" if mono1 else "IDENTITY",
        WindowCenter=round(center, 1),
        WindowWidth=round(width, 1),
    )


def noise_image(template: Dataset, seed: int) -> Dataset:
    """Uniform random stored values over the template's bit depth and window."""
    rng = np.random.default_rng(seed)
    lo, hi = _window_range(template)
    stored = rng.uniform(max(lo, 0), hi, size=(int(template.Rows), int(template.Columns)))
    return _restore(template, stored)


# modified Shepp-Logan (Toft 1996): (value, a, b, x0, y0, phi degrees); value added inside each ellipse
_SHEPP_LOGAN = (
    (1.0, 0.69, 0.92, 0.0, 0.0, 0),
    (-0.8, 0.6624, 0.8740, 0.0, -0.0184, 0),
    (-0.2, 0.1100, 0.3100, 0.22, 0.0, -18),
    (-0.2, 0.1600, 0.4100, -0.22, 0.0, 18),
    (0.1, 0.2100, 0.2500, 0.0, 0.35, 0),
    (0.1, 0.0460, 0.0460, 0.0, 0.1, 0),
    (0.1, 0.0460, 0.0460, 0.0, -0.1, 0),
    (0.1, 0.0460, 0.0230, -0.08, -0.605, 0),
    (0.1, 0.0230, 0.0230, 0.0, -0.606, 0),
    (0.1, 0.0230, 0.0460, 0.06, -0.605, 0),
)


def shepp_logan_head(templates: list[Dataset], seed: int) -> list[Dataset]:
    """A head CT series of the modified Shepp-Logan phantom, one slice per template (the templates give
    the headers and slice positions): the 2-D phantom shrinks towards the vertex and the base as an
    ellipsoid does; phantom units map to HU as skull 1.0 → ~1000 HU, brain 0.2 → 30 HU, ventricles 0 →
    5 HU (an intensity scale a CT head has, through a geometry the generator never draws)."""
    rng = np.random.default_rng(seed)
    n, size = len(templates), int(templates[0].Rows)
    out = []
    for k, template in enumerate(templates):
        t = (k + 0.5) / n * 1.6 - 0.8
        g = float(np.sqrt(max(1 - t * t, 0.05)))
        y, x = (np.mgrid[0:size, 0:size] + 0.5) / size * 2 - 1
        phantom = np.zeros((size, size))
        masks = []
        for value, a, b, x0, y0, phi in _SHEPP_LOGAN:
            c, s = np.cos(np.radians(phi)), np.sin(np.radians(phi))
            xr, yr = (x / g - x0) * c + (y / g - y0) * s, -(x / g - x0) * s + (y / g - y0) * c
            masks.append((xr / a) ** 2 + (yr / b) ** 2 <= 1)
            phantom += value * masks[-1]
        hu = np.where(phantom > 0.5, 1000 * phantom, 150 * phantom)
        hu = np.where(masks[0], hu, -1000.0) + rng.normal(0, 5, (size, size))
        stored = np.clip(np.rint(hu + 1024), 0, 4095).astype(np.uint16)  # the generator's 12-bit CT
        out.append(with_pixels(template, stored, RescaleIntercept=-1024, RescaleSlope=1))
    return out
