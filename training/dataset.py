"""Records → tensors for training: the shared preprocessing, an in-memory cache, CenterNet targets.

Every image goes through ``service.inference.preprocess.preprocess_dataset`` with the model's
:class:`PreprocessSpec`, the same function the service calls, so a model never trains on pixels it will not
be served. Preprocessing a record costs a DICOM decode and a resize; it is done once per record and the
float32 array kept in memory (a 128x128 image is 64 KiB, so thousands fit easily).

Boxes are recorded in source pixels and mapped into model-input pixels with ``Geometry.to_model``.
Detection targets follow CenterNet (Zhou et al. 2019): a Gaussian peak of 1.0 at each box centre's cell on
a ``[1, H/stride, W/stride]`` heatmap (sigma from the box size, as their ``gaussian_radius`` does more
elaborately) and the box width/height in model pixels at that cell, with a mask marking the cells that carry
a size. Augmentation runs in training only, seeded per (seed, epoch, index) so a run is reproducible.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
from torch.utils.data import Dataset

from service.inference.preprocess import PreprocessSpec, preprocess_dataset
from training.data.records import LabelError, Record

__all__ = [
    "Augment",
    "ImageDataset",
    "PreprocessedSet",
    "attach_masks",
    "centernet_targets",
    "preprocess_records",
]

log = logging.getLogger(__name__)


class Augment(Protocol):
    """What ``training.data.augment.Augmenter`` is: image ``[C, H, W]`` and boxes ``[n, 4]`` in model px."""

    def __call__(
        self, image: np.ndarray, boxes: np.ndarray, rng: np.random.Generator
    ) -> tuple[np.ndarray, np.ndarray]: ...


@dataclass
class PreprocessedSet:
    """Preprocessed images of a list of records, in the records' order.

    ``images`` is float32 ``[N, 1, H, W]``; ``labels`` float32 ``[N]`` for the chosen label (``-1`` where a
    record lacks it); ``boxes`` one float32 ``[n, 4]`` array of model-pixel boxes per record; ``masks``
    (optional) uint8 ``[N, 1, H, W]``, where the finding is in model pixels (:func:`attach_masks`).
    """

    records: list[Record]
    images: np.ndarray
    labels: np.ndarray
    boxes: list[np.ndarray]
    masks: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.records)


def _default_reader(path: Any) -> Any:
    from training.data.formats.images import read_image_dataset  # helper A's module; imported late on purpose

    return read_image_dataset(path)


def preprocess_records(
    records: Sequence[Record],
    spec: PreprocessSpec,
    label: str,
    box_label: str | None = None,
    reader: Callable[[Any], Any] | None = None,
    progress: bool = False,
) -> PreprocessedSet:
    """Read and preprocess every record once (the cache); map its boxes into model pixels.

    ``box_label`` keeps only boxes with that label (``None`` keeps all). A record whose pixels cannot be
    preprocessed raises :class:`LabelError` naming its file.
    """
    from service.errors import PreprocessError

    read = reader or _default_reader
    images = np.zeros((len(records), 1, spec.height, spec.width), dtype=np.float32)
    labels = np.full(len(records), -1.0, dtype=np.float32)
    boxes: list[np.ndarray] = []
    iterator: Any = records
    if progress:
        from tqdm import tqdm

        iterator = tqdm(records, desc="preprocess", unit="img", leave=False)
    for i, record in enumerate(iterator):
        try:
            pre = preprocess_dataset(read(record.path), spec)
        except PreprocessError as exc:
            raise LabelError(f"{record.path}: {exc.reason}") from exc
        images[i] = pre.array[0]
        if label in record.labels:
            labels[i] = float(record.labels[label])
        kept = [b for b in record.boxes if box_label is None or b.label == box_label]
        mapped = [pre.geometry.to_model((b.x0, b.y0, b.x1, b.y1)) for b in kept]
        boxes.append(np.asarray(mapped, dtype=np.float32).reshape(-1, 4))
    return PreprocessedSet(list(records), images, labels, boxes)


def attach_masks(data: PreprocessedSet, spec: PreprocessSpec, read_mask: Callable[[Record], Any]) -> None:
    """Resize each record's source-pixel mask into model pixels as its image was (coverage > 0.5)."""
    from service.inference.preprocess import resize_keep_aspect

    masks = np.zeros((len(data), 1, spec.height, spec.width), np.uint8)
    for i, record in enumerate(data.records):
        resized, _ = resize_keep_aspect(np.asarray(read_mask(record), np.float32), spec.height, spec.width,
                                        spec.keep_aspect)  # fmt: skip
        masks[i, 0] = resized > 0.5
    data.masks = masks


def centernet_targets(
    boxes: np.ndarray, height: int, width: int, stride: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Heatmap ``[1, h, w]``, size ``[2, h, w]`` and size mask ``[1, h, w]`` for boxes in model pixels.

    The centre cell of a box is ``floor(centre / stride)``, the inverse of ``decode_detections``, which puts
    a peak at cell ``x`` back at ``(x + 0.5) * stride``. Sigma is a sixth of the box's mean side in cells,
    at least 0.7 cells, so small lesions still get a peak a few cells wide.
    """
    h, w = height // stride, width // stride
    heat = np.zeros((1, h, w), dtype=np.float32)
    size = np.zeros((2, h, w), dtype=np.float32)
    mask = np.zeros((1, h, w), dtype=np.float32)
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
    for x0, y0, x1, y1 in np.asarray(boxes, dtype=np.float32).reshape(-1, 4):
        bw, bh = float(x1 - x0), float(y1 - y0)
        if bw <= 0 or bh <= 0:
            continue
        cx, cy = (x0 + x1) / 2 / stride, (y0 + y1) / 2 / stride
        ix, iy = int(np.clip(np.floor(cx), 0, w - 1)), int(np.clip(np.floor(cy), 0, h - 1))
        sigma = max(0.7, (bw + bh) / 2 / stride / 6)
        g = np.exp(-((xs - ix) ** 2 + (ys - iy) ** 2) / (2 * sigma**2))
        heat[0] = np.maximum(heat[0], g)
        size[:, iy, ix] = (bw, bh)
        mask[0, iy, ix] = 1.0
    return heat, size, mask


class ImageDataset(Dataset[dict[str, torch.Tensor]]):
    """A torch Dataset over a :class:`PreprocessedSet`, with optional training-time augmentation.

    Items are dicts: ``image`` ``[1, H, W]``, ``label`` ``[1]``, for ``task="detection"`` also
    ``heatmap``, ``size`` and ``mask`` (see :func:`centernet_targets`), and where the set has masks,
    ``where`` ``[1, H, W]`` (float 0/1), moved by the same geometric draw as the image.
    """

    def __init__(
        self,
        data: PreprocessedSet,
        task: str = "classification",
        stride: int = 4,
        augment: Augment | None = None,
        seed: int = 0,
    ) -> None:
        if task not in ("classification", "detection"):
            raise ValueError(f"unknown task {task!r}")
        self.data = data
        self.task = task
        self.stride = stride
        self.augment = augment
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Change the augmentation stream (a new epoch draws new transforms, reproducibly)."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        image = self.data.images[index]
        boxes = self.data.boxes[index]
        where = None if self.data.masks is None else self.data.masks[index].astype(np.float32)
        if self.augment is not None:
            rng = np.random.default_rng([self.seed, self.epoch, index])
            image, boxes = self.augment(image.copy(), boxes.copy(), rng)
            if where is not None:
                warp_label = self.augment.warp_label  # type: ignore[attr-defined]  # Augmenter's
                where = warp_label(where, np.random.default_rng([self.seed, self.epoch, index]))
        item = {
            "image": torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32)),
            "label": torch.tensor([self.data.labels[index]], dtype=torch.float32),
        }
        if where is not None:
            item["where"] = torch.from_numpy(np.ascontiguousarray(where, dtype=np.float32))
        if self.task == "detection":
            _, height, width = image.shape
            heat, size, mask = centernet_targets(boxes, height, width, self.stride)
            item.update(
                heatmap=torch.from_numpy(heat), size=torch.from_numpy(size), mask=torch.from_numpy(mask)
            )
        return item
