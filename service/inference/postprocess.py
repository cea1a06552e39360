"""Model outputs → findings: detection maps to boxes, slice scores to a series score. Torch-free, shared.

:func:`findings_from_outputs` turns one model's outputs on one series into :class:`Finding` objects
(probability against the card's threshold, urgency, key image and frame, boxes in source pixels); the
functions below it are the numeric steps, which training's evaluation calls too.

Training's evaluation (FROC, series AUC) calls these same functions on the same ONNX outputs the service
sees, so the metrics written into a model card are the metrics of the code that serves it.

Detector contract (CenterNet-style, Zhou et al. 2019, "Objects as Points"): the ONNX model outputs
``heatmap`` ``[N, 1, h, w]`` (per-cell probability that a lesion centre lies there, after a sigmoid) and
``size`` ``[N, 2, h, w]`` (box width and height in model-input pixels) at ``stride`` model pixels per cell.
A detection is a local maximum of the heatmap above the score threshold; overlapping boxes are then
suppressed greedily (NMS).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

from service.inference.card import Activation, ModelCard
from service.inference.preprocess import Geometry, Preprocessed
from service.results.schema import Code, Detection, Finding

__all__ = [
    "Box",
    "ModelImage",
    "activate",
    "aggregate_series",
    "box_iou",
    "decode_detections",
    "findings_from_outputs",
    "label_scores",
    "nms",
    "source_mask",
]


@dataclass(frozen=True)
class ModelImage:
    """One preprocessed instance of a series, in the order its frames were stacked into the model input."""

    sop_instance_uid: str
    pre: Preprocessed


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
    peaks: np.ndarray = heatmap >= neighbourhood
    return peaks


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


def activate(values: np.ndarray, activation: Activation) -> np.ndarray:
    """The card's ``activation`` on raw scores ``[rows, classes]`` (softmax over the last axis).

    Models trained elsewhere often end in logits; the card says so and the service applies the function,
    rather than clipping logits to [0, 1] and calling them probabilities. Computed in float64 with the max
    subtracted, so large logits neither overflow nor lose the difference between classes.
    """
    if activation == "probabilities":
        return np.asarray(values)
    x = np.asarray(values, dtype=np.float64)
    if activation == "sigmoid":
        sigmoid: np.ndarray = 0.5 * (1.0 + np.tanh(0.5 * x))  # = 1 / (1 + exp(-x)), no overflow for large |x|
        return sigmoid
    if activation == "softmax":
        e = np.exp(x - np.max(x, axis=-1, keepdims=True))
        softmax: np.ndarray = e / np.sum(e, axis=-1, keepdims=True)
        return softmax
    return x


def label_scores(card: ModelCard, outputs: dict[str, np.ndarray], rows: int) -> np.ndarray:
    """``[rows, labels]`` probabilities: the score output, activated, one column per label (``index``)."""
    raw = np.asarray(outputs[card.scores_name], dtype=np.float64).reshape(rows, -1)
    return activate(raw, card.activation)[:, card.label_columns()]


def _finding(
    card: ModelCard, label_index: int, series_uid: str, probability: float, **kwargs: object
) -> Finding:
    label = card.labels[label_index]
    positive = probability >= label.threshold
    return Finding(
        model=card.name,
        model_version=card.version,
        model_sha256=card.sha256,
        label=label.name,
        code=Code(scheme=label.code.scheme, value=label.code.value, meaning=label.code.meaning),
        probability=float(np.clip(probability, 0.0, 1.0)),
        threshold=label.threshold,
        positive=positive,
        urgent=positive and label.urgency in ("stat", "urgent"),
        urgency=label.urgency,
        series_uid=series_uid,
        **kwargs,
    )


def _rows(images: Sequence[ModelImage]) -> list[tuple[int, int]]:
    """For each row of the stacked model input: (index into ``images``, 1-based frame number).

    Multi-frame instances contribute one row per frame, so a finding or box can name its frame.
    """
    return [(i, f + 1) for i, img in enumerate(images) for f in range(img.pre.array.shape[0])]


def _classify(
    card: ModelCard, series_uid: str, images: Sequence[ModelImage], out: dict[str, np.ndarray]
) -> list[Finding]:
    """Per label: the highest probability over the series' images, keyed to that image and frame."""
    index = _rows(images)
    probs = label_scores(card, out, len(index))
    findings = []
    for li in range(len(card.labels)):
        best = int(np.argmax(probs[:, li]))
        img, frame = index[best]
        findings.append(
            _finding(
                card,
                li,
                series_uid,
                float(probs[best, li]),
                key_instance_uid=images[img].sop_instance_uid,
                key_frame=frame,
            )
        )
    return findings


def _detect(
    card: ModelCard, series_uid: str, images: Sequence[ModelImage], out: dict[str, np.ndarray]
) -> list[Finding]:
    """One finding for the (single) label: boxes from every frame, mapped back to source pixels.

    The finding's probability is the best box score, or the heatmap peak when no box passed the
    threshold, so a negative still carries a number a reader can compare with the threshold.
    """
    spec = card.detection
    assert spec is not None, "a detection card has a detection spec"
    heat, size = activate(out[spec.heatmap_output], card.activation), out[spec.size_output]
    threshold = card.labels[0].threshold
    index = _rows(images)
    detections: list[Detection] = []
    best_score, best_row = 0.0, 0
    for row, (img, frame) in enumerate(index):
        peak = float(np.max(heat[row]))
        if peak > best_score:
            best_score, best_row = peak, row
        for box in decode_detections(
            heat[row], size[row], spec.stride, threshold, spec.nms_iou, spec.max_detections
        ):
            x0, y0, x1, y1 = images[img].pre.geometry.to_source(box.xyxy)
            detections.append(
                Detection(
                    sop_instance_uid=images[img].sop_instance_uid,
                    frame=frame,
                    x0=x0,
                    y0=y0,
                    x1=x1,
                    y1=y1,
                    score=float(np.clip(box.score, 0, 1)),
                )
            )
    detections.sort(key=lambda d: d.score, reverse=True)
    key_img, key_frame = index[best_row]
    if detections:
        key = detections[0]
        return [
            _finding(
                card,
                0,
                series_uid,
                key.score,
                key_instance_uid=key.sop_instance_uid,
                key_frame=key.frame,
                detections=detections,
            )
        ]
    return [
        _finding(
            card,
            0,
            series_uid,
            best_score,
            key_instance_uid=images[key_img].sop_instance_uid,
            key_frame=key_frame,
        )
    ]


def _series_classify(
    card: ModelCard, series_uid: str, images: Sequence[ModelImage], out: dict[str, np.ndarray]
) -> list[Finding]:
    """Slice probabilities (images are already in scan order) → series probability and key slice."""
    index = _rows(images)
    probs = label_scores(card, out, len(index))
    window = card.aggregation.window if card.aggregation else 3
    findings = []
    for li in range(len(card.labels)):
        prob, key = aggregate_series(probs[:, li], window)
        img, frame = index[key]
        findings.append(
            _finding(
                card, li, series_uid, prob, key_instance_uid=images[img].sop_instance_uid, key_frame=frame
            )
        )
    return findings


def source_mask(probability: np.ndarray, geometry: Geometry, threshold: float) -> np.ndarray:
    """A model-input probability map ``[H, W]`` → a boolean mask in the source pixels (``rows x columns``).

    Undoes :func:`service.inference.preprocess.resize_keep_aspect`: crops the padding, resizes the
    probabilities bilinearly to the source size, then thresholds (thresholding after the resize gives
    smooth edges rather than model-pixel blocks; volumes are measured on this mask).
    """
    top, left = round(geometry.offset_y), round(geometry.offset_x)
    height = max(1, round(geometry.rows * geometry.scale_y))
    width = max(1, round(geometry.columns * geometry.scale_x))
    crop = np.ascontiguousarray(probability[top : top + height, left : left + width], dtype=np.float32)
    if not crop.size or crop.max() < threshold:  # bilinear weights are convex: nothing resized reaches it
        return np.zeros((geometry.rows, geometry.columns), dtype=bool)
    if crop.shape != (geometry.rows, geometry.columns):
        pil = Image.fromarray(crop, mode="F")
        size = (geometry.columns, geometry.rows)
        crop = np.asarray(pil.resize(size, Image.Resampling.BILINEAR), dtype=np.float32)
    return crop >= threshold


_TASKS = {"classification": _classify, "detection": _detect, "series_classification": _series_classify}


def findings_from_outputs(
    card: ModelCard, series_uid: str, images: Sequence[ModelImage], outputs: dict[str, np.ndarray]
) -> list[Finding]:
    """The findings of one model on one series, from its outputs for ``images`` stacked in that order.

    Dispatches on the card's ``task``: ``classification`` (best image per label), ``detection`` (boxes
    mapped back to source pixels) or ``series_classification`` (slice scores aggregated along the scan).
    """
    return _TASKS[card.task](card, series_uid, images, outputs)
