"""How big is the bleed: volume in mL and largest axial diameter in mm, per lesion and in total.

Pure numpy/scipy on a binary mask ``[slices, rows, columns]`` in scan order (the order of
:func:`service.study_inputs.order_slices`) plus the voxel size read from the headers:

- **in-plane spacing**: PixelSpacing (PS3.3 C.7.6.2.1.1, row spacing then column spacing, mm);
- **slice spacing**: the median distance between consecutive ImagePositionPatient projected on the slice
  normal (the cross product of the ImageOrientationPatient cosines), which is what the voxels really are;
  when positions are missing or garbled, SpacingBetweenSlices, else SliceThickness (PS3.3 C.7.6.2: the
  thickness equals the spacing only for contiguous slices, so the result says which source it used).

A **lesion** is a 3-D connected component with full (26-) connectivity: blood that touches across a slice
boundary, even diagonally, is one collection. Its **largest axial diameter** is the greatest distance
between two points of its pixels (the corners of the pixel squares, so a single pixel measures its
diagonal) on any one slice, in mm, the way a reader measures the long axis on the axial image. Volume is
voxel count x row spacing x column spacing x slice spacing / 1000 (mm^3 → mL).

:func:`dice` is the overlap metric the segmentation model is trained and judged by (Dice 1945). Masks travel
inside the :class:`~service.results.schema.StudyResult` as :func:`encode_mask` strings (bit-packed, zlib,
base64): a 512 x 512 slice with a bleed is a few hundred bytes.
"""

from __future__ import annotations

import base64
import zlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from pydicom.dataset import Dataset
from scipy import ndimage
from scipy.spatial import ConvexHull

__all__ = [
    "LesionSize",
    "MaskSize",
    "VoxelSize",
    "decode_mask",
    "dice",
    "encode_mask",
    "largest_axial_diameter",
    "measure",
    "voxel_size",
]


@dataclass(frozen=True)
class VoxelSize:
    """Voxel edges in mm and where the slice spacing came from (``positions``, ``SpacingBetweenSlices``,
    ``SliceThickness``)."""

    row_mm: float
    column_mm: float
    slice_mm: float
    slice_source: str

    @property
    def ml(self) -> float:
        """One voxel in mL (1 mL = 1000 mm^3)."""
        return self.row_mm * self.column_mm * self.slice_mm / 1000.0


@dataclass(frozen=True)
class LesionSize:
    """One 3-D connected component: volume, largest axial diameter, the slice index it is widest on."""

    volume_ml: float
    max_axial_diameter_mm: float
    widest_slice: int
    voxels: int


@dataclass(frozen=True)
class MaskSize:
    """All lesions, largest first, and the totals (total diameter = the largest lesion diameter)."""

    lesions: list[LesionSize]
    volume_ml: float
    max_axial_diameter_mm: float


def dice(predicted: np.ndarray, truth: np.ndarray) -> float:
    """Dice coefficient ``2|A∩B| / (|A| + |B|)`` of two binary masks; 1.0 when both are empty."""
    a, b = np.asarray(predicted, bool), np.asarray(truth, bool)
    if a.shape != b.shape:
        raise ValueError(f"masks differ in shape: {a.shape} vs {b.shape}")
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int(np.logical_and(a, b).sum()) / total


def _float(ds: Dataset, keyword: str) -> float | None:
    try:
        value = float(ds.get(keyword))
    except (TypeError, ValueError):
        return None
    return value if np.isfinite(value) and value > 0 else None


def _positions_spacing(datasets: Sequence[Dataset]) -> float | None:
    try:
        iop = np.asarray([float(v) for v in datasets[0].ImageOrientationPatient], dtype=np.float64)
        normal = np.cross(iop[:3], iop[3:])
        keys = np.sort([float(np.dot(normal, [float(v) for v in d.ImagePositionPatient])) for d in datasets])
    except Exception:  # absent or garbled geometry: pydicom raises many types on access
        return None
    steps = np.diff(keys)
    steps = steps[steps > 1e-3]
    return float(np.median(steps)) if steps.size else None


def voxel_size(datasets: Sequence[Dataset]) -> VoxelSize:
    """The voxel of a series (all slices, any order) from its headers; raises ValueError if unknowable."""
    if not datasets:
        raise ValueError("no slices")
    try:
        row_mm, column_mm = (float(v) for v in datasets[0].PixelSpacing)
    except Exception as exc:  # missing, one value, not numbers
        raise ValueError("PixelSpacing is missing or not two numbers") from exc
    if not (row_mm > 0 and column_mm > 0 and np.isfinite(row_mm * column_mm)):
        raise ValueError("PixelSpacing is not positive")
    spacing = _positions_spacing(datasets) if len(datasets) > 1 else None
    if spacing is not None:
        return VoxelSize(row_mm, column_mm, spacing, "positions")
    for keyword in ("SpacingBetweenSlices", "SliceThickness"):
        value = _float(datasets[0], keyword)
        if value is not None:
            return VoxelSize(row_mm, column_mm, value, keyword)
    raise ValueError("no slice spacing: no positions, SpacingBetweenSlices or SliceThickness")


def largest_axial_diameter(slice_mask: np.ndarray, row_mm: float, column_mm: float) -> float:
    """Greatest distance (mm) between two corners of the mask's pixels on one slice; 0.0 when empty."""
    rows, cols = np.nonzero(slice_mask)
    if rows.size == 0:
        return 0.0
    corners = np.concatenate(
        [np.stack([rows + dr, cols + dc], axis=1) for dr in (0, 1) for dc in (0, 1)]
    ).astype(np.float64)
    points = np.unique(corners, axis=0) * np.array([row_mm, column_mm])
    if len(points) > 8:
        points = points[ConvexHull(points).vertices]  # the farthest pair lies on the hull
    gaps = points[:, None, :] - points[None, :, :]
    return float(np.sqrt((gaps**2).sum(axis=-1)).max())


def _bounds(volume: np.ndarray) -> tuple[slice, slice, slice] | None:
    """The smallest box holding every set voxel of a 3-D boolean array; None when none is set."""
    spans = []
    for axis in range(3):
        present = np.flatnonzero(volume.any(axis=tuple(a for a in range(3) if a != axis)))
        if present.size == 0:
            return None
        spans.append(slice(int(present[0]), int(present[-1]) + 1))
    return spans[0], spans[1], spans[2]


def measure(mask: np.ndarray, voxel: VoxelSize) -> MaskSize:
    """Lesions (26-connected components) of a ``[slices, rows, columns]`` mask, with their sizes."""
    volume = np.asarray(mask, bool)
    if volume.ndim != 3:
        raise ValueError(f"mask must be [slices, rows, columns], not {volume.shape}")
    # Labelled within the mask's bounding box only (nothing outside it is set, so the components are the
    # same): labelling a whole 32 x 256 x 256 head CT took 14-30 ms for a bleed of a few hundred voxels.
    box = _bounds(volume)
    if box is None:
        return MaskSize(lesions=[], volume_ml=0.0, max_axial_diameter_mm=0.0)
    labels, count = ndimage.label(volume[box], structure=np.ones((3, 3, 3), dtype=bool))
    lesions: list[LesionSize] = []
    for index, where in enumerate(ndimage.find_objects(labels), start=1):
        if where is None:
            continue
        part = labels[where] == index
        diameters = [largest_axial_diameter(s, voxel.row_mm, voxel.column_mm) for s in part]
        widest = int(np.argmax(diameters))
        voxels = int(part.sum())
        lesions.append(
            LesionSize(
                volume_ml=voxels * voxel.ml,
                max_axial_diameter_mm=diameters[widest],
                widest_slice=box[0].start + int(where[0].start) + widest,
                voxels=voxels,
            )
        )
    lesions.sort(key=lambda lesion: (-lesion.voxels, lesion.widest_slice))
    return MaskSize(
        lesions=lesions,
        volume_ml=sum(lesion.volume_ml for lesion in lesions),
        max_axial_diameter_mm=max((lesion.max_axial_diameter_mm for lesion in lesions), default=0.0),
    )


def encode_mask(mask: np.ndarray) -> str:
    """A 2-D binary mask → base64 of zlib-compressed packed bits (row-major, as DICOM SEG frames)."""
    return base64.b64encode(zlib.compress(np.packbits(np.asarray(mask, bool).ravel()).tobytes(), 9)).decode()


def decode_mask(text: str, rows: int, columns: int) -> np.ndarray:
    """The inverse of :func:`encode_mask`: a ``rows x columns`` uint8 mask; ValueError if it does not fit."""
    try:
        packed = np.frombuffer(zlib.decompress(base64.b64decode(text, validate=True)), dtype=np.uint8)
    except (ValueError, zlib.error) as exc:
        raise ValueError("mask is not base64 zlib packed bits") from exc
    bits = np.unpackbits(packed)
    if bits.size < rows * columns or bits.size - rows * columns >= 8:
        raise ValueError(f"mask holds {bits.size} bits, not {rows} x {columns}")
    return bits[: rows * columns].reshape(rows, columns)
