"""Model outputs → findings: detection maps to boxes, slice scores to a series score. Torch-free, shared.

Training's evaluation (FROC, series AUC) calls these same functions on the same ONNX outputs the service
sees, so the metrics written into a model card are the metrics of the code that serves it.

Detector contract (CenterNet-style, Zhou et al. 2019, "Objects as Points"): the ONNX model outputs
``heatmap`` ``[N, 1, h, w]`` (per-cell probability that a lesion centre lies there, after a sigmoid) and
``size`` ``[N, 2, h, w]`` (box width and height in model-input pixels) at ``stride`` model pixels per cell.
A detection is a local maximum of the heatmap above the score threshold; overlapping boxes are then
suppressed greedily (NMS).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["Box", "aggregate_series", "box_iou", "decode_detections", "nms"]


@dataclass(frozen=True)
class Box:
    """An axis-aligned box ``(x0, y0, x1, y1)`` in pixels with a score in [0, 1]."""

    x0: float
    y0: float
    x1: float
    y1: float
    score: float

    @property
    def xyxy(self) -> tuple[float, float, float, float]:
        return (self.x0, self.y0, self.x1, self.y1)


def box_iou(a: tuple[float, float, float, float], b: tuple[float, float, float, float]) -> float:
    """Intersection over union of two ``(x0, y0, x1, y1)`` boxes."""
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def nms(boxes: list[Box], iou_threshold: float) -> list[Box]:
    """Greedy non-maximum suppression, highest score first."""
    kept: list[Box] = []
    for box in sorted(boxes, key=lambda b: b.score, reverse=True):
        if all(box_iou(box.xyxy, k.xyxy) <= iou_threshold for k in kept):
            kept.append(box)
    return kept


def _local_maxima(heatmap: np.ndarray) -> np.ndarray:
    """Mask of cells that equal the maximum of their 3x3 neighbourhood (the max-pool trick of CenterNet)."""
    padded = np.pad(heatmap, 1, mode="constant", constant_values=-np.inf)
    h, w = heatmap.shape
    neighbourhood = np.max(
        np.stack([padded[dy : dy + h, dx : dx + w] for dy in range(3) for dx in range(3)]), axis=0
    )
    return heatmap >= neighbourhood


def decode_detections(
    heatmap: np.ndarray,
    size: np.ndarray,
    stride: int,
    score_threshold: float,
    nms_iou: float = 0.3,
    max_detections: int = 10,
) -> list[Box]:
    """Boxes in model-input pixels from one image's ``heatmap [1, h, w]`` and ``size [2, h, w]``."""
    heat = np.asarray(heatmap, dtype=np.float32).reshape(heatmap.shape[-2:])
    peaks = _local_maxima(heat) & (heat >= score_threshold)
    ys, xs = np.nonzero(peaks)
    order = np.argsort(-heat[ys, xs])[: max_detections * 4]
    boxes: list[Box] = []
    for i in order:
        y, x = int(ys[i]), int(xs[i])
        cx, cy = (x + 0.5) * stride, (y + 0.5) * stride
        bw, bh = float(max(size[0, y, x], 1.0)), float(max(size[1, y, x], 1.0))
        boxes.append(Box(cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2, float(heat[y, x])))
    return nms(boxes, nms_iou)[:max_detections]


def aggregate_series(slice_probabilities: np.ndarray, window: int = 3) -> tuple[float, int]:
    """Series probability and key slice index from per-slice probabilities (ordered along the scan axis).

    A hemorrhage spans adjacent 5 mm slices, so the series score is the maximum of a centred moving average
    over ``window`` slices: one noisy slice alone does not flag the series. The key slice is the slice with
    the highest raw probability inside the best window.
    """
    p = np.asarray(slice_probabilities, dtype=np.float64).ravel()
    if p.size == 0:
        raise ValueError("a series needs at least one slice")
    k = max(1, min(window, p.size))
    kernel = np.ones(k) / k
    smoothed = np.convolve(np.pad(p, (k // 2, k - 1 - k // 2), mode="edge"), kernel, mode="valid")
    centre = int(np.argmax(smoothed))
    lo, hi = max(0, centre - k // 2), min(p.size, centre - k // 2 + k)
    key = lo + int(np.argmax(p[lo:hi]))
    return float(smoothed[centre]), key
