"""A classifier's ``cam`` output → the :class:`HeatMap` of each positive finding, on its key image.

The card's ``cam_output`` names an output ``[N, labels, h, w]``: for each model-input row, the
class-activation map of each label at the last feature map's resolution (Zhou et al. 2016, "Learning Deep
Features for Discriminative Localization"; for a global-average-pooled linear head it is Grad-CAM times
``h * w``, Selvaraju et al. 2017; training/explain.py adds it to the graph). ONNX Runtime computes it in
the same run as the probabilities, so no torch and no gradients are needed here.

Only positive findings keep a map, and only on their key image: for a series classifier that is the slice
that drove the series score (:func:`service.inference.postprocess.aggregate_series`), for an image
classifier the image with the highest probability. A negative study costs one ``positive`` test per
finding and nothing else. The map is sampled back onto the whole source frame through the preprocessing
geometry (the inverse of the resize and padding), bilinearly, on a grid of the source's aspect ratio
(:func:`service.results.heatmap.grid_shape`), and scaled to its peak.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy.ndimage import map_coordinates

from service.inference.card import ModelCard
from service.inference.postprocess import ModelImage
from service.inference.preprocess import Geometry
from service.results.heatmap import encode_heatmap, grid_shape
from service.results.schema import Finding, HeatMap

__all__ = ["attach_heatmaps", "cam_to_source"]


def cam_to_source(cam: np.ndarray, geometry: Geometry, height: int, width: int) -> np.ndarray:
    """A ``[h, w]`` map over the ``height x width`` model input → float32 on the source's grid.

    Each grid point is the centre of a block of source pixels; it is placed in the model input with the
    preprocessing geometry (``model = source * scale + offset``) and the map is interpolated there
    (cell centres at ``(i + 0.5) * height / h``; beyond the outer centres the edge value holds).
    """
    cam = np.asarray(cam, dtype=np.float32)
    h, w = cam.shape
    grid_rows, grid_columns = grid_shape(geometry.rows, geometry.columns)
    ys = (np.arange(grid_rows) + 0.5) * geometry.rows / grid_rows
    xs = (np.arange(grid_columns) + 0.5) * geometry.columns / grid_columns
    u = (ys * geometry.scale_y + geometry.offset_y) * h / height - 0.5
    v = (xs * geometry.scale_x + geometry.offset_x) * w / width - 0.5
    uu, vv = np.meshgrid(u, v, indexing="ij")
    mapped: np.ndarray = map_coordinates(cam, [uu, vv], order=1, mode="nearest")
    return mapped.astype(np.float32)


def attach_heatmaps(
    card: ModelCard, findings: Sequence[Finding], images: Sequence[ModelImage], outputs: dict[str, np.ndarray]
) -> list[Finding]:
    """``findings`` with a :class:`HeatMap` on each positive one whose key image has a map above zero.

    ``images`` and ``outputs`` are what :func:`service.inference.postprocess.findings_from_outputs` was
    given (rows stacked in that order, multi-frame instances one row per frame).
    """
    if card.cam_output is None or card.cam_output not in outputs:
        return list(findings)
    if not any(f.positive and f.key_instance_uid for f in findings):
        return list(findings)  # a negative series: nothing to map
    cams = outputs[card.cam_output]
    rows = {
        (img.sop_instance_uid, frame + 1): (row, img)
        for row, (img, frame) in enumerate((img, f) for img in images for f in range(img.pre.array.shape[0]))
    }
    columns = dict(zip((label.name for label in card.labels), card.label_columns(), strict=True))
    spec = card.preprocessing
    out = []
    for finding in findings:
        where = rows.get((finding.key_instance_uid or "", finding.key_frame or 1))
        if not finding.positive or where is None:
            out.append(finding)
            continue
        row, img = where
        cam = np.asarray(cams[row, columns[finding.label] if cams.shape[1] > 1 else 0])
        grid = cam_to_source(cam, img.pre.geometry, spec.height, spec.width)
        top = float(grid.max())
        if not top > 0:  # ReLU left nothing: no region speaks for the label on this image
            out.append(finding)
            continue
        heatmap = HeatMap(
            sop_instance_uid=img.sop_instance_uid,
            frame=finding.key_frame or 1,
            rows=grid.shape[0],
            columns=grid.shape[1],
            values=encode_heatmap(grid / top),
            peak=float(cam.max()),
            output=card.cam_output,
        )
        out.append(finding.model_copy(update={"heatmap": heatmap}))
    return out
