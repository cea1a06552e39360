"""Mask loaders on fixtures written here: a DICOM SEG built with highdicom, NIfTI volumes in RAS and LPS."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from pydicom.uid import generate_uid

from service.results.seg import build_seg, series_segments
from tests.service.results.test_seg import ct_series, known_mask, segmented_result
from training.data.masks import read_nifti_mask, read_seg_masks
from training.data.records import LabelError


def _mask() -> np.ndarray:
    """[slices, rows, columns] with an asymmetric blob so any flip or transpose shows."""
    mask = np.zeros((4, 6, 5), np.uint8)
    mask[1, 0:2, 0:3] = 1
    mask[2, 4, 4] = 1
    return mask


class TestSeg:
    def test_masks_by_source_instance(self, tmp_path: Path) -> None:
        slices = ct_series()
        mask = known_mask(6, 32)
        result = segmented_result(slices, mask)
        seg = build_seg(
            result,
            series_segments(result)[0],
            {str(ds.SOPInstanceUID): ds for ds in slices},
            sop_instance_uid=generate_uid(),
            series_instance_uid=generate_uid(),
            series_number=9904,
        )
        path = tmp_path / "seg.dcm"
        seg.save_as(path, enforce_file_format=True)
        masks = read_seg_masks(path)
        uids = [str(ds.SOPInstanceUID) for ds in slices]
        assert sorted(masks) == sorted(uids[2:4])  # empty slices are absent
        for k in (2, 3):
            assert np.array_equal(masks[uids[k]], mask[k].astype(np.uint8))
        with pytest.raises(LabelError, match="segment number"):
            read_seg_masks(path, [7])

    def test_not_a_seg(self, tmp_path: Path) -> None:
        path = tmp_path / "x.dcm"
        path.write_bytes(b"not dicom")
        with pytest.raises(LabelError, match="Segmentation"):
            read_seg_masks(path)


class TestNifti:
    def test_lps_volume_is_read_as_is(self, tmp_path: Path) -> None:
        mask = _mask()
        affine = np.diag([-0.5, -0.5, 5.0, 1.0])  # RAS+ affine of LPS-ordered voxels (what DICOM stores)
        path = tmp_path / "lps.nii.gz"
        nib.save(nib.Nifti1Image(mask.transpose(2, 1, 0).copy(), affine), path)
        assert np.array_equal(read_nifti_mask(path), mask)

    def test_ras_volume_is_flipped_to_dicom_order(self, tmp_path: Path) -> None:
        mask = _mask()
        ras = mask.transpose(2, 1, 0)[::-1, ::-1, :].copy()  # x right-to-left reversed, y likewise
        path = tmp_path / "ras.nii"
        nib.save(nib.Nifti1Image(ras, np.diag([0.5, 0.5, 5.0, 1.0])), path)
        assert np.array_equal(read_nifti_mask(path), mask)

    def test_label_values(self, tmp_path: Path) -> None:
        volume = np.zeros((5, 6, 4), np.uint8)
        volume[1, 1, 1] = 1
        volume[2, 2, 2] = 3
        path = tmp_path / "labels.nii.gz"
        nib.save(nib.Nifti1Image(volume, np.diag([-1.0, -1.0, 1.0, 1.0])), path)
        assert read_nifti_mask(path).sum() == 2
        assert read_nifti_mask(path, labels=[3]).sum() == 1

    def test_not_nifti(self, tmp_path: Path) -> None:
        path = tmp_path / "bad.nii"
        path.write_bytes(b"nope")
        with pytest.raises(LabelError, match="NIfTI"):
            read_nifti_mask(path)
