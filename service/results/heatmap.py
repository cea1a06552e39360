"""Heat maps of positive findings: storage in the result (:class:`HeatMap` values) and the preview overlay.

A classifier whose card names a ``cam_output`` answers, with its probability, a class-activation map at
its last feature map's resolution (Zhou et al. 2016; equal to Grad-CAM, Selvaraju et al. 2017, for a
global-average-pooled linear head: training/explain.py). :mod:`service.inference.heatmap` maps it onto the
source image and stores it here as 8-bit values scaled to the map's peak (zlib, base64) on a grid with the
source's aspect ratio, at most :data:`MAX_SIDE` on its longest side: the map has 8 x 8 cells of
information, so a finer grid would only make the stored result larger. The preview resizes it to the
picture (bilinear) and blends a colour map over the grayscale image where the activation is above
:data:`FLOOR` of the peak, with a legend: the heat map says where the model looked, not where the lesion
is, and the preview stays "NOT FOR DIAGNOSTIC USE".
"""

from __future__ import annotations

import base64
import zlib

import numpy as np
from PIL import Image, ImageDraw, ImageFont

__all__ = [
    "FLOOR",
    "LEGEND_TEXT",
    "MAX_ALPHA",
    "MAX_SIDE",
    "colour_map",
    "decode_heatmap",
    "draw_colour_bar",
    "encode_heatmap",
    "grid_shape",
    "overlay",
]

MAX_SIDE = 128
"""Longest side of the stored grid (source aspect ratio kept)."""
FLOOR = 0.2
"""Activation below this fraction of the map's peak is not coloured (the image stays readable)."""
MAX_ALPHA = 0.5
"""Opacity at the peak: the anatomy under the hottest spot still shows through."""
LEGEND_TEXT = "where the model looked, not a lesion outline"

_STOPS = np.array(
    [
        [0.00, 0, 0, 160],
        [0.25, 0, 120, 255],
        [0.50, 0, 220, 120],
        [0.75, 255, 220, 0],
        [1.00, 255, 0, 0],
    ]
)
"""Blue → cyan-green → yellow → red: low to high, readable by hue and by brightness."""


def grid_shape(rows: int, columns: int) -> tuple[int, int]:
    """The stored grid for a ``rows x columns`` source: the same aspect, longest side <= MAX_SIDE."""
    scale = min(1.0, MAX_SIDE / max(rows, columns))
    return max(1, round(rows * scale)), max(1, round(columns * scale))


def encode_heatmap(values: np.ndarray) -> str:
    """Values in [0, 1] ``[rows, columns]`` → base64 of zlib-compressed uint8 (row-major)."""
    quantised = np.round(np.clip(np.asarray(values, dtype=np.float64), 0.0, 1.0) * 255.0).astype(np.uint8)
    return base64.b64encode(zlib.compress(quantised.tobytes(), 9)).decode("ascii")


def decode_heatmap(text: str, rows: int, columns: int) -> np.ndarray:
    """The inverse of :func:`encode_heatmap`: float32 ``[rows, columns]`` in [0, 1]; ValueError if it
    does not decode or does not hold ``rows x columns`` values."""
    try:
        raw = np.frombuffer(zlib.decompress(base64.b64decode(text, validate=True)), dtype=np.uint8)
    except (ValueError, zlib.error) as exc:
        raise ValueError("heat map is not base64 zlib uint8 values") from exc
    if raw.size != rows * columns:
        raise ValueError(f"heat map holds {raw.size} values, not {rows} x {columns}")
    return raw.reshape(rows, columns).astype(np.float32) / 255.0


def colour_map(values: np.ndarray) -> np.ndarray:
    """Values in [0, 1] → uint8 RGB ``[..., 3]`` along :data:`_STOPS` (piecewise linear)."""
    v = np.clip(np.asarray(values, dtype=np.float64), 0.0, 1.0)
    channels = [np.interp(v, _STOPS[:, 0], _STOPS[:, c]) for c in (1, 2, 3)]
    return np.round(np.stack(channels, axis=-1)).astype(np.uint8)


def overlay(image: Image.Image, values: np.ndarray) -> Image.Image:
    """``image`` (RGB) with the heat map resized over all of it and blended where above :data:`FLOOR`."""
    small = Image.fromarray(np.asarray(values, dtype=np.float32), mode="F")
    heat = np.asarray(small.resize(image.size, Image.Resampling.BILINEAR), dtype=np.float64)
    alpha = MAX_ALPHA * np.clip((heat - FLOOR) / (1.0 - FLOOR), 0.0, 1.0)[..., np.newaxis]
    base = np.asarray(image.convert("RGB"), dtype=np.float64)
    blended = base * (1.0 - alpha) + colour_map(heat).astype(np.float64) * alpha
    return Image.fromarray(np.round(blended).astype(np.uint8), mode="RGB")


def draw_colour_bar(
    draw: ImageDraw.ImageDraw,
    xy: tuple[int, int],
    size: tuple[int, int],
    font: ImageFont.FreeTypeFont | ImageFont.ImageFont,
) -> None:
    """The legend's bar at ``xy`` (``size`` = width, height): "low", the colours from FLOOR up, "high"."""
    x, y = xy
    width, height = size
    low_w = int(draw.textlength("low ", font=font))
    high_w = int(draw.textlength(" high", font=font))
    bar = max(8, width - low_w - high_w)
    draw.text((x, y), "low", fill=(255, 255, 255), font=font)
    colours = colour_map(np.linspace(FLOOR, 1.0, bar))
    for i, colour in enumerate(colours):
        left = x + low_w + i
        draw.line((left, y + 2, left, y + height - 2), fill=tuple(int(c) for c in colour))
    draw.text((x + low_w + bar, y), " high", fill=(255, 255, 255), font=font)
