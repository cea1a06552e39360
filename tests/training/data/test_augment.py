"""Augmenter: seeded, identity when switched off, boxes follow the pixels."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from training.data.augment import Augmenter


def _square_image(x0: int, y0: int, x1: int, y1: int, size: int = 64) -> np.ndarray:
    image = np.zeros((1, size, size), np.float32)
    image[0, y0:y1, x0:x1] = 1.0
    return image


def _bright_box(image: np.ndarray) -> tuple[float, float, float, float]:
    ys, xs = np.nonzero(image[0] > 0.5)
    return float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)


def _full_augmenter() -> Augmenter:
    """Every transform on, at the ranges a chest or head model trains with."""
    return Augmenter(
        hflip=True, rotation_deg=7, translate_frac=0.05, zoom_range=(0.9, 1.1), brightness=0.1, contrast=0.15
    )


class TestAugmenter:
    def test_same_seed_same_output(self) -> None:
        aug = _full_augmenter()
        image = np.random.default_rng(0).random((1, 96, 80), dtype=np.float32)
        boxes = np.array([[10, 12, 30, 40]], np.float32)
        a = aug(image, boxes, np.random.default_rng(42))
        b = aug(image, boxes, np.random.default_rng(42))
        c = aug(image, boxes, np.random.default_rng(43))
        assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
        assert not np.array_equal(a[0], c[0])

    def test_identity_when_all_ranges_are_zero(self) -> None:
        image = np.random.default_rng(1).random((2, 32, 48), dtype=np.float32)
        boxes = np.array([[1, 2, 10, 12], [20, 5, 40, 30]], np.float32)
        out, out_boxes = Augmenter()(image, boxes, np.random.default_rng(3))
        assert np.array_equal(out, image) and out is not image
        assert np.array_equal(out_boxes, boxes)

    def test_box_follows_square_through_translation(self) -> None:
        image = _square_image(20, 24, 30, 34)
        aug = Augmenter(translate_frac=0.2)
        for seed in range(5):
            out, boxes = aug(image, np.array([[20, 24, 30, 34]], np.float32), np.random.default_rng(seed))
            assert boxes.shape == (1, 4)
            params = aug.sample(np.random.default_rng(seed))
            expected = np.array([20, 24, 30, 34]) + np.array([params.shift_x, params.shift_y] * 2) * 64
            assert np.allclose(boxes[0], expected, atol=1e-4)
            assert np.allclose(_bright_box(out), boxes[0], atol=1.0)

    def test_label_map_moves_with_the_image_and_keeps_no_intensity_change(self) -> None:
        """warp_label under a generator seeded as the image's: the same square, still exactly 0/1."""
        aug = _full_augmenter()
        image = _square_image(20, 24, 36, 40)
        for seed in range(6):
            out, _ = aug(image, np.zeros((0, 4), np.float32), np.random.default_rng(seed))
            label = aug.warp_label(image, np.random.default_rng(seed))
            assert set(np.unique(label)) <= {0.0, 1.0}
            bright = _bright_box(out - out.min())  # brightness and contrast moved the image, not the label
            assert np.allclose(bright, _bright_box(label), atol=1.0)

    def test_box_follows_square_through_flip(self) -> None:
        image = _square_image(5, 10, 15, 20)
        aug = Augmenter(hflip=True)
        seed = next(s for s in range(50) if aug.sample(np.random.default_rng(s)).flip)
        out, boxes = aug(image, np.array([[5, 10, 15, 20]], np.float32), np.random.default_rng(seed))
        assert np.allclose(boxes[0], [49, 10, 59, 20])
        assert _bright_box(out) == (49.0, 10.0, 59.0, 20.0)
        assert np.array_equal(out[0], image[0][:, ::-1])

    def test_box_follows_square_through_rotation_and_zoom(self) -> None:
        image = _square_image(36, 36, 48, 48)
        aug = Augmenter(rotation_deg=20, zoom_range=(0.8, 1.2), box_envelope="corners")
        for seed in range(5):
            out, boxes = aug(image, np.array([[36, 36, 48, 48]], np.float32), np.random.default_rng(seed))
            bx = _bright_box(out)
            # the bright pixels lie inside the corner envelope, and fill most of it
            assert boxes[0][0] - 1 <= bx[0] and boxes[0][1] - 1 <= bx[1]
            assert bx[2] <= boxes[0][2] + 1 and bx[3] <= boxes[0][3] + 1

    def test_ellipse_envelope_keeps_round_lesion_size_under_rotation(self) -> None:
        aug = Augmenter(rotation_deg=30, box_envelope="ellipse")
        _, boxes = aug(
            np.zeros((1, 64, 64), np.float32),
            np.array([[20, 20, 30, 30]], np.float32),
            np.random.default_rng(0),
        )
        assert np.allclose(boxes[0, 2] - boxes[0, 0], 10, atol=1e-3)

    def test_box_mostly_outside_is_dropped(self) -> None:
        aug = Augmenter(translate_frac=0.5)
        rng_seed = next(s for s in range(100) if aug.sample(np.random.default_rng(s)).shift_x > 0.4)
        boxes = np.array([[50, 10, 60, 20], [2, 10, 12, 20]], np.float32)
        _, out_boxes, keep = aug.apply(
            np.zeros((1, 64, 64), np.float32), boxes, np.random.default_rng(rng_seed)
        )
        assert keep.tolist() == [False, True] and out_boxes.shape == (1, 4)

    def test_fill_defaults_to_channel_minimum(self) -> None:
        image = np.full((1, 32, 32), 3.0, np.float32)
        image[0, 0, 0] = -2.0
        out, _ = Augmenter(translate_frac=0.3)(image, np.zeros((0, 4), np.float32), np.random.default_rng(5))
        assert out.min() == pytest.approx(-2.0)

    def test_intensity_is_relative_to_value_range(self) -> None:
        image = np.linspace(0, 1, 64 * 64, dtype=np.float32).reshape(1, 64, 64)
        aug = Augmenter(brightness=0.1, contrast=0.15)
        out, _ = aug(image, np.zeros((0, 4)), np.random.default_rng(9))
        params = aug.sample(np.random.default_rng(9))
        assert out.mean() == pytest.approx(image.mean() + params.brightness, abs=1e-4)

    def test_processing_known_answers(self) -> None:
        """Tone curve, unsharp masking and noise each do what their parameters say, over the value range."""
        from scipy.ndimage import gaussian_filter

        from training.data.augment import AugmentParams, _processing

        image = np.linspace(0, 2, 32 * 32, dtype=np.float32).reshape(1, 32, 32)
        rng = np.random.default_rng(0)
        base = AugmentParams(
            flip=False, angle_deg=0.0, zoom=1.0, shift_x=0.0, shift_y=0.0, brightness=0.0, contrast=1.0
        )
        toned = _processing(image, replace(base, gamma=2.0), rng)
        np.testing.assert_allclose(toned, 2 * (image / 2) ** 2, atol=1e-5)
        eye = np.eye(32, dtype=np.float32)[None]
        sharp = _processing(eye, replace(base, unsharp_amount=1.0, unsharp_sigma=1 / 32), rng)
        np.testing.assert_allclose(
            sharp[0], 2 * eye[0] - gaussian_filter(eye[0], 1.0, mode="reflect"), atol=1e-5
        )
        noisy = _processing(image, replace(base, noise_sd=0.1), rng)
        assert (noisy - image).std() == pytest.approx(0.1 * 2, rel=0.1)
        assert _processing(image, base, rng) is image  # switched off: untouched

    def test_processing_is_drawn_half_the_time_within_its_ranges(self) -> None:
        aug = Augmenter(unsharp=2.0, gamma=2.0, noise=0.02)
        rng = np.random.default_rng(3)
        draws = [aug.sample(rng) for _ in range(2000)]
        for on in ([d.unsharp_amount > 0 for d in draws], [d.gamma != 1 for d in draws],
                   [d.noise_sd > 0 for d in draws]):  # fmt: skip
            assert 0.45 < np.mean(on) < 0.55
        assert max(d.unsharp_amount for d in draws) <= 2.0 and max(d.noise_sd for d in draws) <= 0.02
        gammas = [d.gamma for d in draws if d.gamma != 1]
        assert 0.5 <= min(gammas) < 0.52 and 1.95 < max(gammas) <= 2.0
        assert all(0.01 <= d.unsharp_sigma <= 0.03 for d in draws)

    def test_rejects_bad_ranges(self) -> None:
        with pytest.raises(ValueError, match="gamma"):
            Augmenter(gamma=0.5)
        with pytest.raises(ValueError, match="unsharp"):
            Augmenter(unsharp=-1)
        with pytest.raises(ValueError, match="zoom_range"):
            Augmenter(zoom_range=(1.2, 0.9))
        with pytest.raises(ValueError, match="rotation_deg"):
            Augmenter(rotation_deg=-1)
