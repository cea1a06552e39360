"""Segmentation masks in the public formats: a DICOM SEG file, and NIfTI label volumes.

Why these two: DICOM SEG (PS3.3 A.51) is how a PACS or an annotation tool (3D Slicer, OHIF) stores a
mask against the very CT instances it was drawn on; NIfTI ``.nii``/``.nii.gz`` is how the public CT
hemorrhage sets ship theirs (PhysioNet CT-ICH, and segmentation releases made from RSNA 2019 cases). Both
end in the same shape the generator's ``hemorrhage_mask.npz`` has and :mod:`training.segment` consumes:
binary ``uint8`` per slice.

- :func:`read_seg_masks`: a SEG → ``{source SOP Instance UID: mask}`` (rows x columns), for the chosen
  segment numbers (default all, united), read through ``highdicom.seg.segread``; slices the SEG omits
  because they are empty are simply absent (treat them as zeros).
- :func:`read_nifti_mask`: a NIfTI label volume → ``[slices, rows, columns]`` in DICOM order: reoriented
  with nibabel to LPS (the DICOM patient axes, PS3.3 C.7.6.2.1.1), so for an axial series with
  ImageOrientationPatient ``[1, 0, 0, 0, 1, 0]`` columns run right→left, rows anterior→posterior and slices
  inferior→superior, i.e. ascending ImagePositionPatient z. ``labels`` keeps chosen label values (default:
  any non-zero value is blood).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from training.data.records import LabelError

__all__ = ["read_nifti_mask", "read_seg_masks"]


def read_seg_masks(path: Path, segment_numbers: Sequence[int] | None = None) -> dict[str, np.ndarray]:
    """Masks of a DICOM SEG by source instance; raises :class:`LabelError` for a file that is not one."""
    import highdicom as hd

    try:
        seg = hd.seg.segread(path)
    except Exception as exc:  # pydicom/highdicom raise many types for a file that is not a valid SEG
        raise LabelError(f"{path}: not a readable DICOM Segmentation ({exc})") from exc
    numbers = list(segment_numbers) if segment_numbers else list(seg.segment_numbers)
    unknown = sorted(set(numbers) - set(seg.segment_numbers))
    if unknown:
        raise LabelError(f"{path}: no segment number(s) {unknown}; it has {list(seg.segment_numbers)}")
    uids = sorted({str(uid) for _, _, uid in seg.get_source_image_uids()})
    referenced = [uid for uid in uids if _has_frames(seg, uid)]
    if not referenced:
        return {}
    pixels = seg.get_pixels_by_source_instance(
        source_sop_instance_uids=referenced, segment_numbers=numbers, combine_segments=False
    )
    return {uid: (pixels[i].max(axis=-1) > 0).astype(np.uint8) for i, uid in enumerate(referenced)}


def _has_frames(seg: object, uid: str) -> bool:
    """Whether any SEG frame is derived from ``uid`` (empty slices have none in a sparse SEG)."""
    for frame in seg.PerFrameFunctionalGroupsSequence:  # type: ignore[attr-defined]
        for derivation in frame.get("DerivationImageSequence", []):
            for source in derivation.get("SourceImageSequence", []):
                if str(source.ReferencedSOPInstanceUID) == uid:
                    return True
    return False


def read_nifti_mask(path: Path, labels: Sequence[int] | None = None) -> np.ndarray:
    """A NIfTI label volume as ``uint8 [slices, rows, columns]`` in DICOM (LPS) order (module docstring)."""
    import nibabel as nib
    from nibabel.orientations import apply_orientation, axcodes2ornt, io_orientation, ornt_transform
    from nibabel.spatialimages import SpatialImage

    try:
        image = nib.load(str(path))
    except Exception as exc:  # nibabel raises ImageFileError, OSError, EOFError for damaged files
        raise LabelError(f"{path}: not a readable NIfTI file ({exc})") from exc
    if not isinstance(image, SpatialImage):  # nib.load also opens non-volume formats (CIFTI, GIFTI surfaces)
        raise LabelError(f"{path}: not a NIfTI volume ({type(image).__name__})")
    try:
        data = np.asarray(image.dataobj)
    except Exception as exc:  # a truncated file fails only when its voxels are read
        raise LabelError(f"{path}: not a readable NIfTI file ({exc})") from exc
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise LabelError(f"{path}: a mask volume has 3 dimensions, this one {data.shape}")
    # nibabel.orientations has no annotations (nibabel 5): its calls are untyped.
    source = io_orientation(image.affine)  # type: ignore[no-untyped-call]
    transform = ornt_transform(source, axcodes2ornt(("L", "P", "S")))  # type: ignore[no-untyped-call]
    lps = apply_orientation(data, transform)  # type: ignore[no-untyped-call]
    inside = np.isin(lps, list(labels)) if labels else lps != 0
    return np.ascontiguousarray(inside.transpose(2, 1, 0)).astype(np.uint8)
