"""Seeded geometric and intensity augmentation of a model-input image and its boxes.

Why: radiology deep-learning guidance asks for augmentation that mimics real acquisition variation
(positioning, magnification, exposure) so a small training set generalises; a flip is valid only where
anatomy is symmetric enough (a head CT slice), not for a chest radiograph where the heart's side is part of
the picture, so the caller decides. Every random number comes from the ``rng`` the caller passes, drawn in a
fixed order, so the same seed gives the same image and boxes.

Vendor processing on top of the generator's own (each with probability 1/2 when switched on): unsharp
masking ``x + a (x - blur(x))``, a power tone curve over the image's value range, additive noise. Why: the
generator draws one console's processing per film, but a model trained only on that learned cues that one
more pass of unsharp masking erased (session 5 measured pneumothorax specificity 0.85 -> 0.12 at amount 2):
the robustness battery (training/robustness.py) asks the model to hold, or the gate to catch, and only
processing outside what training showed can be caught without turning away the in-domain range.

One affine transform per call, about the image centre: optional horizontal flip, rotation, zoom and
translation, sampled bilinearly (Pillow's ``F`` mode affine, in continuous pixel coordinates where pixel
``i`` covers ``[i, i + 1)``, the convention of ``service.inference.preprocess.Geometry``). Boxes follow the
same transform; a box that ends up mostly outside the image is dropped.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
from PIL import Image

__all__ = ["AugmentParams", "Augmenter"]


@dataclass(frozen=True)
class AugmentParams:
    """One draw of the random parameters (kept separate so tests and logs can see what was applied)."""

    flip: bool
    angle_deg: float
    zoom: float
    shift_x: float
    shift_y: float
    brightness: float
    contrast: float
    unsharp_amount: float = 0.0
    unsharp_sigma: float = 0.0
    gamma: float = 1.0
    noise_sd: float = 0.0


@dataclass(frozen=True)
class Augmenter:
    """Random affine + brightness/contrast for images ``[C, H, W]`` and boxes ``[n, 4]`` (x0, y0, x1, y1).

    Parameters
    ----------
    hflip
        Mirror left-right with probability 0.5 (head CT yes; chest radiographs no: the heart's side matters).
    rotation_deg
        Rotation drawn uniformly from ``[-rotation_deg, rotation_deg]``.
    translate_frac
        Shift drawn uniformly from ``[-translate_frac, translate_frac]`` times the width (x) and height (y).
    zoom_range
        Scale factor drawn uniformly from ``[low, high]``; ``> 1`` magnifies.
    brightness
        Offset drawn from ``[-brightness, brightness]`` times the channel's value range (max - min), so the
        amount means the same for a [0, 1] image and a normalised one.
    contrast
        Factor drawn from ``[1 - contrast, 1 + contrast]`` applied about the channel mean.
    unsharp
        Largest unsharp-masking amount (drawn uniformly from ``[0, unsharp]``), blur sigma drawn from
        ``unsharp_sigma_frac`` times the width; applied with probability 1/2.
    gamma
        Largest tone-curve exponent: drawn log-uniformly from ``[1 / gamma, gamma]`` over each channel's
        value range; applied with probability 1/2.
    noise
        Largest noise standard deviation as a fraction of the channel's value range (drawn uniformly);
        applied with probability 1/2.
    fill
        Value for pixels brought in from outside the image; ``None`` uses each channel's minimum, which is
        what the shared preprocessing pads with (zero before normalisation).
    min_visible
        A transformed box is kept when at least this fraction of its area stays inside the image.
    box_envelope
        ``"corners"``: the axis-aligned envelope of the four transformed corners (safe, slightly enlarged
        under rotation). ``"ellipse"``: the envelope of the transformed inscribed ellipse, exact for round
        lesions (nodules, haematomas) and not inflated by rotation.
    """

    hflip: bool = False
    rotation_deg: float = 0.0
    translate_frac: float = 0.0
    zoom_range: tuple[float, float] = (1.0, 1.0)
    brightness: float = 0.0
    contrast: float = 0.0
    unsharp: float = 0.0
    unsharp_sigma_frac: tuple[float, float] = (0.01, 0.03)
    gamma: float = 1.0
    noise: float = 0.0
    fill: float | None = None
    min_visible: float = 0.5
    box_envelope: Literal["corners", "ellipse"] = "corners"

    def __post_init__(self) -> None:
        low, high = self.zoom_range
        if not 0 < low <= high:
            raise ValueError(f"zoom_range must satisfy 0 < low <= high, got {self.zoom_range}")
        if self.gamma < 1:
            raise ValueError(f"gamma must be >= 1 (the exponent range is [1/gamma, gamma]), got {self.gamma}")
        for name in ("rotation_deg", "translate_frac", "brightness", "contrast", "unsharp", "noise"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not 0 <= self.min_visible <= 1:
            raise ValueError(f"min_visible must be in [0, 1], got {self.min_visible}")
        if self.box_envelope not in ("corners", "ellipse"):
            raise ValueError(f"box_envelope must be 'corners' or 'ellipse', got {self.box_envelope!r}")

    def sample(self, rng: np.random.Generator) -> AugmentParams:
        """Draw the parameters; always fourteen draws in the same order, whatever is switched off."""
        u = rng.random(14)
        low, high = self.zoom_range
        s_low, s_high = self.unsharp_sigma_frac
        return AugmentParams(
            flip=bool(self.hflip and u[0] < 0.5),
            angle_deg=float((2 * u[1] - 1) * self.rotation_deg),
            zoom=float(low + (high - low) * u[2]),
            shift_x=float((2 * u[3] - 1) * self.translate_frac),
            shift_y=float((2 * u[4] - 1) * self.translate_frac),
            brightness=float((2 * u[5] - 1) * self.brightness),
            contrast=float(1 + (2 * u[6] - 1) * self.contrast),
            unsharp_amount=float(u[8] * self.unsharp) if u[7] < 0.5 else 0.0,
            unsharp_sigma=float(s_low + (s_high - s_low) * u[9]),
            gamma=float(self.gamma ** (2 * u[11] - 1)) if u[10] < 0.5 else 1.0,
            noise_sd=float(u[13] * self.noise) if u[12] < 0.5 else 0.0,
        )

    def __call__(
        self, image: np.ndarray, boxes: np.ndarray, rng: np.random.Generator
    ) -> tuple[np.ndarray, np.ndarray]:
        """Augmented ``(image, boxes)``; boxes that fall mostly outside are dropped (see :meth:`apply`)."""
        out, kept_boxes, _ = self.apply(image, boxes, rng)
        return out, kept_boxes

    def apply(
        self, image: np.ndarray, boxes: np.ndarray, rng: np.random.Generator
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Like ``__call__`` but also returns the boolean mask of input boxes kept, to carry their labels."""
        params = self.sample(rng)
        image = np.asarray(image, dtype=np.float32)
        if image.ndim != 3:
            raise ValueError(f"image must be [C, H, W], got shape {image.shape}")
        boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
        _, height, width = image.shape
        matrix, offset = _forward(params, width, height)
        out = _intensity(_processing(image, params, rng), params)
        if not (np.allclose(matrix, np.eye(2)) and np.allclose(offset, 0)):
            out = _warp(out, matrix, offset, self.fill)
        new_boxes, keep = _transform_boxes(
            boxes, matrix, offset, width, height, self.min_visible, self.box_envelope
        )
        return out, new_boxes, keep

    def warp_label(self, label: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """A label map ``[C, H, W]`` moved as :meth:`apply` moves the image for a generator in the same state.

        :meth:`sample` always makes its fourteen draws first, so a fresh generator seeded as the image's was
        gives the same flip, rotation, zoom and shift; the map is resampled bilinearly with 0 outside and
        thresholded at 0.5 (no intensity change applies to a label).
        """
        params = self.sample(rng)
        label = np.asarray(label, dtype=np.float32)
        _, height, width = label.shape
        matrix, offset = _forward(params, width, height)
        if np.allclose(matrix, np.eye(2)) and np.allclose(offset, 0):
            return label.copy()
        return (_warp(label, matrix, offset, 0.0) > 0.5).astype(np.float32)


def _forward(params: AugmentParams, width: int, height: int) -> tuple[np.ndarray, np.ndarray]:
    """Source → output map ``p' = M p + o``: flip, rotate and zoom about the centre, then shift."""
    theta = math.radians(params.angle_deg)
    cos, sin = math.cos(theta), math.sin(theta)
    rotate = np.array([[cos, -sin], [sin, cos]], dtype=np.float64)
    flip = np.diag([-1.0 if params.flip else 1.0, 1.0])
    matrix = params.zoom * rotate @ flip
    centre = np.array([width / 2, height / 2])
    shift = np.array([params.shift_x * width, params.shift_y * height])
    offset = centre + shift - matrix @ centre
    return matrix, offset


def _processing(image: np.ndarray, params: AugmentParams, rng: np.random.Generator) -> np.ndarray:
    """Unsharp masking, then the tone curve, then noise, each over the channel's own value range."""
    if params.unsharp_amount == 0 and params.gamma == 1 and params.noise_sd == 0:
        return image
    from scipy.ndimage import gaussian_filter

    low = image.min(axis=(1, 2), keepdims=True)
    span = np.maximum(image.max(axis=(1, 2), keepdims=True) - low, np.float32(1e-6))
    out = image.astype(np.float32)
    if params.unsharp_amount > 0:
        sigma = params.unsharp_sigma * image.shape[2]
        blurred = np.stack([gaussian_filter(c, sigma, mode="reflect") for c in out])
        out = out + np.float32(params.unsharp_amount) * (out - blurred)
    if params.gamma != 1:
        v = np.clip((out - low) / span, 0, 1)
        out = low + span * v ** np.float32(params.gamma)
    if params.noise_sd > 0:
        out = out + (rng.standard_normal(out.shape) * params.noise_sd).astype(np.float32) * span
    return out.astype(np.float32, copy=False)


def _intensity(image: np.ndarray, params: AugmentParams) -> np.ndarray:
    if params.contrast == 1.0 and params.brightness == 0.0:
        return image.copy()
    mean = image.mean(axis=(1, 2), keepdims=True)
    value_range = image.max(axis=(1, 2), keepdims=True) - image.min(axis=(1, 2), keepdims=True)
    out: np.ndarray = (
        (image - mean) * np.float32(params.contrast) + mean + np.float32(params.brightness) * value_range
    )
    return out.astype(np.float32, copy=False)


def _warp(image: np.ndarray, matrix: np.ndarray, offset: np.ndarray, fill: float | None) -> np.ndarray:
    """Bilinear resampling of every channel through the inverse map (Pillow's AFFINE takes output → input)."""
    inverse = np.linalg.inv(matrix)
    inv_offset = -inverse @ offset
    data = (inverse[0, 0], inverse[0, 1], inv_offset[0], inverse[1, 0], inverse[1, 1], inv_offset[1])
    _, height, width = image.shape
    out = np.empty_like(image)
    for c, channel in enumerate(image):
        value = float(channel.min()) if fill is None else float(fill)
        pil = Image.fromarray(np.ascontiguousarray(channel), mode="F")
        warped = pil.transform(
            (width, height), Image.Transform.AFFINE, data, Image.Resampling.BILINEAR, fillcolor=value
        )
        out[c] = np.asarray(warped, dtype=np.float32)
    return out


def _transform_boxes(
    boxes: np.ndarray,
    matrix: np.ndarray,
    offset: np.ndarray,
    width: int,
    height: int,
    min_visible: float,
    envelope: str,
) -> tuple[np.ndarray, np.ndarray]:
    if len(boxes) == 0:
        return np.zeros((0, 4), np.float32), np.zeros(0, bool)
    b = boxes.astype(np.float64)
    if envelope == "corners":
        xs = b[:, [0, 2, 0, 2]]
        ys = b[:, [1, 1, 3, 3]]
        tx = matrix[0, 0] * xs + matrix[0, 1] * ys + offset[0]
        ty = matrix[1, 0] * xs + matrix[1, 1] * ys + offset[1]
        env = np.stack([tx.min(1), ty.min(1), tx.max(1), ty.max(1)], axis=1)
    else:
        cx, cy = (b[:, 0] + b[:, 2]) / 2, (b[:, 1] + b[:, 3]) / 2
        hw, hh = (b[:, 2] - b[:, 0]) / 2, (b[:, 3] - b[:, 1]) / 2
        ncx = matrix[0, 0] * cx + matrix[0, 1] * cy + offset[0]
        ncy = matrix[1, 0] * cx + matrix[1, 1] * cy + offset[1]
        ex = np.hypot(matrix[0, 0] * hw, matrix[0, 1] * hh)
        ey = np.hypot(matrix[1, 0] * hw, matrix[1, 1] * hh)
        env = np.stack([ncx - ex, ncy - ey, ncx + ex, ncy + ey], axis=1)
    clipped = np.stack(
        [
            np.clip(env[:, 0], 0, width),
            np.clip(env[:, 1], 0, height),
            np.clip(env[:, 2], 0, width),
            np.clip(env[:, 3], 0, height),
        ],
        axis=1,
    )
    area = (env[:, 2] - env[:, 0]) * (env[:, 3] - env[:, 1])
    inside = np.clip(clipped[:, 2] - clipped[:, 0], 0, None) * np.clip(clipped[:, 3] - clipped[:, 1], 0, None)
    keep = (inside > 0) & (inside >= min_visible * area)
    return clipped[keep].astype(np.float32), keep
