"""quantify: Dice, volume, diameter and lesions on hand-made masks whose answers are known by arithmetic."""

from __future__ import annotations

import math

import numpy as np
import pytest
from pydicom.dataset import Dataset
from scipy import ndimage

from service.results.quantify import (
    VoxelSize,
    decode_mask,
    dice,
    encode_mask,
    largest_axial_diameter,
    measure,
    voxel_size,
)

ISO = VoxelSize(1.0, 1.0, 1.0, "positions")


class TestDice:
    def test_known_overlap(self) -> None:
        a = np.zeros((4, 10), bool)
        b = np.zeros((4, 10), bool)
        a[:, :6] = True  # 24 pixels
        b[:, 3:] = True  # 28 pixels, 12 shared
        assert dice(a, b) == pytest.approx(2 * 12 / (24 + 28))

    def test_identical_disjoint_and_empty(self) -> None:
        a = np.eye(5, dtype=bool)
        assert dice(a, a) == 1.0
        assert dice(a, ~a) == 0.0
        assert dice(np.zeros((3, 3)), np.zeros((3, 3))) == 1.0

    def test_shapes_must_agree(self) -> None:
        with pytest.raises(ValueError, match="shape"):
            dice(np.zeros((2, 2)), np.zeros((2, 3)))


class TestMeasure:
    @pytest.mark.parametrize("seed", range(5))
    def test_lesions_are_those_of_the_whole_volume(self, seed: int) -> None:
        """Labelling only the mask's bounding box finds the same lesions, on the same slices, as
        labelling the whole volume (what measure did before)."""
        rng = np.random.default_rng(seed)
        mask = np.zeros((12, 64, 64), bool)
        for _ in range(4):
            z, r, c = rng.integers(1, 10), rng.integers(2, 50), rng.integers(2, 50)
            mask[z : z + rng.integers(1, 3), r : r + rng.integers(1, 9), c : c + rng.integers(1, 9)] = True
        whole, _ = ndimage.label(mask, structure=np.ones((3, 3, 3), bool))
        expected = sorted(
            (int((whole[where] == i).sum()), int(where[0].start))
            for i, where in enumerate(ndimage.find_objects(whole), start=1)
        )
        size = measure(mask, ISO)
        got = sorted((lesion.voxels, lesion.widest_slice) for lesion in size.lesions)
        assert [v for v, _ in got] == [v for v, _ in expected]
        for lesion in size.lesions:  # the widest slice is one the lesion is on
            assert mask[lesion.widest_slice].any()

    def test_box_volume_and_diameter(self) -> None:
        mask = np.zeros((6, 40, 40), np.uint8)
        mask[1:4, 10:20, 5:9] = 1  # 3 slices x 10 rows x 4 columns = 120 voxels
        size = measure(mask, VoxelSize(0.5, 0.5, 5.0, "positions"))
        assert len(size.lesions) == 1
        assert size.volume_ml == pytest.approx(120 * 0.5 * 0.5 * 5.0 / 1000)  # 0.15 mL
        assert size.max_axial_diameter_mm == pytest.approx(math.hypot(10 * 0.5, 4 * 0.5))
        assert size.lesions[0].voxels == 120
        assert size.lesions[0].widest_slice == 1

    def test_anisotropic_pixels(self) -> None:
        mask = np.zeros((1, 20, 20), bool)
        mask[0, 2:5, 2:12] = True  # 3 rows x 10 columns
        size = measure(mask, VoxelSize(2.0, 0.5, 3.0, "SliceThickness"))
        assert size.max_axial_diameter_mm == pytest.approx(math.hypot(3 * 2.0, 10 * 0.5))
        assert size.volume_ml == pytest.approx(30 * 2.0 * 0.5 * 3.0 / 1000)

    def test_two_lesions_largest_first(self) -> None:
        mask = np.zeros((4, 30, 30), bool)
        mask[0:2, 0:3, 0:3] = True  # 18 voxels
        mask[1:4, 20:25, 20:25] = True  # 75 voxels
        size = measure(mask, ISO)
        assert [lesion.voxels for lesion in size.lesions] == [75, 18]
        assert size.volume_ml == pytest.approx(93 / 1000)
        assert size.max_axial_diameter_mm == pytest.approx(math.hypot(5, 5))
        assert size.lesions[1].max_axial_diameter_mm == pytest.approx(math.hypot(3, 3))

    def test_diagonal_contact_across_slices_is_one_lesion(self) -> None:
        mask = np.zeros((2, 5, 5), bool)
        mask[0, 1, 1] = True
        mask[1, 2, 2] = True  # touches only at a corner: 26-connectivity joins them
        assert len(measure(mask, ISO).lesions) == 1

    def test_sphere_volume(self) -> None:
        r = 12
        z, y, x = np.mgrid[-16:17, -16:17, -16:17]
        sphere = (x**2 + y**2 + z**2) <= r * r
        size = measure(sphere, ISO)
        assert size.volume_ml == pytest.approx(4 / 3 * math.pi * r**3 / 1000, rel=0.03)
        assert size.max_axial_diameter_mm == pytest.approx(2 * r + 1, abs=1.0)

    def test_empty_mask(self) -> None:
        size = measure(np.zeros((3, 8, 8), bool), ISO)
        assert size.lesions == [] and size.volume_ml == 0.0 and size.max_axial_diameter_mm == 0.0

    def test_single_pixel_diameter_is_its_diagonal(self) -> None:
        one = np.zeros((4, 4), bool)
        one[1, 2] = True
        assert largest_axial_diameter(one, 0.6, 0.8) == pytest.approx(1.0)

    def test_needs_three_dimensions(self) -> None:
        with pytest.raises(ValueError, match="slices"):
            measure(np.zeros((4, 4)), ISO)


def _slice(z: float | None, **extra: object) -> Dataset:
    ds = Dataset()
    ds.PixelSpacing = [0.45, 0.5]
    if z is not None:
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [0, 0, z]
    for key, value in extra.items():
        setattr(ds, key, value)
    return ds


class TestVoxelSize:
    def test_from_positions_in_any_order(self) -> None:
        voxel = voxel_size([_slice(z, SliceThickness=5.0) for z in (10.0, 0.0, 2.5, 7.5, 5.0)])
        assert (voxel.row_mm, voxel.column_mm, voxel.slice_mm) == (0.45, 0.5, 2.5)
        assert voxel.slice_source == "positions"
        assert voxel.ml == pytest.approx(0.45 * 0.5 * 2.5 / 1000)

    def test_falls_back_to_spacing_then_thickness(self) -> None:
        no_positions = [_slice(None, SpacingBetweenSlices=4.0, SliceThickness=5.0) for _ in range(3)]
        assert voxel_size(no_positions).slice_mm == 4.0
        assert voxel_size(no_positions).slice_source == "SpacingBetweenSlices"
        only_thickness = [_slice(None, SliceThickness=5.0) for _ in range(3)]
        assert voxel_size(only_thickness).slice_source == "SliceThickness"

    def test_unknowable_spacing_is_an_error(self) -> None:
        with pytest.raises(ValueError, match="slice spacing"):
            voxel_size([_slice(None) for _ in range(2)])
        no_pixels = Dataset()
        with pytest.raises(ValueError, match="PixelSpacing"):
            voxel_size([no_pixels])


class TestMaskCodec:
    def test_round_trip(self) -> None:
        rng = np.random.default_rng(0)
        mask = (rng.random((37, 29)) > 0.7).astype(np.uint8)
        text = encode_mask(mask)
        assert np.array_equal(decode_mask(text, 37, 29), mask)
        assert len(encode_mask(np.zeros((512, 512)))) < 200

    def test_wrong_size_or_garbage(self) -> None:
        text = encode_mask(np.ones((8, 8)))
        with pytest.raises(ValueError, match="bits"):
            decode_mask(text, 16, 16)
        with pytest.raises(ValueError, match="base64"):
            decode_mask("not base64!", 8, 8)
