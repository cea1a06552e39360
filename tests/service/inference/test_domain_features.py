"""What the input-domain gate measures (service/inference/domain_features.py): known answers on hand-made
images, and the fast arithmetic held to the definitions every shipped card's reference was fitted on.
"""

from __future__ import annotations

import numpy as np
import pytest

import service.inference.domain_features as features
from service.inference.domain_features import (
    INPUT_FEATURES,
    TEXTURE_FEATURES,
    gate_statistics,
    input_statistics,
    texture_statistics,
)
from service.inference.preprocess import PreprocessSpec

UNIT = PreprocessSpec(height=8, width=8, mean=0.0, std=1.0)


def test_input_statistics_of_constant_and_step_images():
    images = np.zeros((2, 1, 8, 8), dtype=np.float32)
    images[0] = 0.25
    images[1, 0, :, 4:] = 1.0  # left half black, right half white
    got = dict(zip(INPUT_FEATURES, input_statistics(images, UNIT).T, strict=True))
    assert len(INPUT_FEATURES) == input_statistics(images, UNIT).shape[1] == 28
    assert got["quantile_50"][0] == pytest.approx(0.25) and got["std"][0] == 0
    assert got["gradient"][0] == 0 and got["laplacian"][0] == 0 and got["laplacian_half"][0] == 0
    assert got["mean"][1] == 0.5 and got["fraction_black"][1] == 0.5 and got["fraction_white"][1] == 0.5
    assert got["gradient"][1] == pytest.approx(1 / 7)  # one step of 1 in 7 horizontal differences a row
    blocks = np.array([got[f"block_{r}_{c}"][1] for r in range(4) for c in range(4)]).reshape(4, 4)
    np.testing.assert_array_equal(blocks, [[0, 0, 1, 1]] * 4)


def test_input_statistics_undo_the_normalisation():
    unit = np.random.default_rng(0).random((3, 1, 16, 16)).astype(np.float32)
    spec = PreprocessSpec(height=16, width=16, mean=0.5, std=0.25)
    np.testing.assert_allclose(
        input_statistics((unit - 0.5) / 0.25, spec), input_statistics(unit, UNIT), atol=1e-5
    )


def test_texture_sees_noise_level_and_sharpening_not_ramps():
    """White noise of sd s gives E|u * N| = 6 s sqrt(2 / pi) (the mask's weights have norm 6): doubling
    the noise adds log 2 to both noise features; a ramp has no second differences at all."""
    spec = PreprocessSpec(height=128, width=128, mean=0.0, std=1.0)
    rng = np.random.default_rng(0)
    noise = rng.normal(0, 1, (1, 1, 128, 128)).astype(np.float32)
    base = np.full((1, 1, 128, 128), 0.5, dtype=np.float32)
    low, high = (
        texture_statistics(base + 0.01 * noise, spec)[0],
        texture_statistics(base + 0.02 * noise, spec)[0],
    )
    got = dict(zip(TEXTURE_FEATURES, low, strict=True))
    assert np.exp(got["log_noise_mean"]) == pytest.approx(0.01 * 6 * np.sqrt(2 / np.pi), rel=0.03)
    np.testing.assert_allclose((high - low)[:2], np.log(2), atol=0.01)
    ramp = np.tile(np.linspace(0, 1, 128, dtype=np.float32), (128, 1))[None, None]
    flat = dict(zip(TEXTURE_FEATURES, texture_statistics(ramp, spec)[0], strict=True))
    assert flat["log_noise_mean"] < np.log(1e-5) and flat["log_laplacian"] < np.log(1e-5)
    assert np.isfinite(texture_statistics(np.zeros((1, 1, 8, 8), np.float32), UNIT)).all()


def test_input_statistics_in_chunks_are_the_whole_series_numbers(monkeypatch: pytest.MonkeyPatch) -> None:
    """A long series is measured a chunk of images at a time (bounded temporaries); nothing is reduced
    across images, so the features are exactly those of one pass over the whole series."""
    spec = PreprocessSpec(version=2, height=64, width=48, mean=0.5, std=0.25)
    images = np.random.default_rng(0).normal(0, 1, (75, 1, 64, 48)).astype(np.float32)
    chunked = gate_statistics(images, spec, ("input", "texture"))
    monkeypatch.setattr(features, "_CHUNK", 10**6)
    whole = gate_statistics(images, spec, ("input", "texture"))
    assert np.array_equal(chunked["input"], whole["input"])
    assert np.array_equal(chunked["texture"], whole["texture"])


def test_one_pass_gives_each_vector_as_alone() -> None:
    """The gate measures both vectors over shared planes; each is what its own function gives."""
    spec = PreprocessSpec(version=2, height=40, width=56, mean=0.5, std=0.25)
    images = np.random.default_rng(1).normal(0, 1, (5, 1, 40, 56)).astype(np.float32)
    both = gate_statistics(images, spec, ("input", "texture"))
    assert np.array_equal(both["input"], input_statistics(images, spec))
    assert np.array_equal(both["texture"], texture_statistics(images, spec))
    assert set(gate_statistics(images, spec, ("texture",))) == {"texture"}


PIXELS = {
    "noise": lambda rng, shape: rng.normal(0, 1, shape),
    "quantised": lambda rng, shape: np.round(rng.normal(0, 1, shape) * 512) / 512,
    "flat": lambda rng, shape: np.full(shape, 0.25),
    "odd": lambda rng, shape: rng.normal(0, 1, shape),
}


def _images(pixels: str) -> tuple[np.ndarray, PreprocessSpec, np.ndarray]:
    rng = np.random.default_rng(3)
    shape = (4, 1, 33, 47) if pixels == "odd" else (4, 1, 64, 64)
    images = PIXELS[pixels](rng, shape).astype(np.float32)
    spec = PreprocessSpec(version=2, height=shape[2], width=shape[3], mean=0.5, std=0.25)
    return images, spec, images[:, 0] * spec.std + spec.mean


@pytest.mark.parametrize(
    "pixels", list(PIXELS), ids=["noise", "12-bit levels (ties)", "a flat image", "odd sizes"]
)
def test_quantiles_and_medians_by_radix_select_are_numpys_own(pixels: str) -> None:
    """Quantiles and medians take their order statistics by a radix select; they must be exactly
    ``np.percentile`` / ``np.median`` of the values (the definition the cards' references were fitted on)."""
    images, spec, u = _images(pixels)
    quantiles = np.percentile(u.reshape(len(u), -1), (1, 10, 50, 90, 99), axis=1).T
    assert np.array_equal(input_statistics(images, spec)[:, :5], quantiles)
    for plane in (u, features._half(u)):
        k = features._noise_kernel(plane).reshape(len(u), -1)
        assert np.array_equal(features._median(k), np.median(k, axis=1))


def test_order_statistics_are_the_sorted_rows_values() -> None:
    """Every rank of rows that span signs, zeros of both signs, infinities, subnormals, ties and buckets
    holding one value or thousands: the values ``np.sort`` puts there."""
    rng = np.random.default_rng(7)
    rows = np.stack(
        [
            rng.normal(0, 1, 4096),
            rng.normal(0, 1e-3, 4096),
            np.round(rng.normal(0, 1, 4096) * 8) / 8,
            np.concatenate([rng.random(4090), [0.0, -0.0, np.inf, -np.inf, 1e-40, -1e-40]]),
            np.full(4096, 0.25),
        ]
    ).astype(np.float32)
    ranks = [0, 1, 40, 409, 2047, 2048, 3686, 4055, 4094, 4095]
    got = features._order_statistics(rows, ranks)
    assert np.array_equal(got, np.sort(rows, axis=1)[:, ranks])
    odd = rows[:, :4095]
    assert np.array_equal(features._median(odd), np.median(odd, axis=1))
    assert np.array_equal(features._median(rows), np.median(rows, axis=1))


def test_rows_with_nan_give_nan_as_numpy_does() -> None:
    rows = np.array([[0.1, 0.2, np.nan, 0.4], [0.3, 0.1, 0.2, 0.4], [-np.nan, 0.1, 0.2, 0.3]], np.float32)
    assert np.isnan(features._quantiles(rows, (1, 50))[[0, 2]]).all()
    assert np.array_equal(
        features._quantiles(rows[1:2], (1, 50)), np.percentile(rows[1:2], (1, 50), axis=1).T
    )
    with np.errstate(invalid="ignore"):
        assert np.array_equal(features._median(rows), np.median(rows, axis=1), equal_nan=True)


def _reference_features(images: np.ndarray, spec: PreprocessSpec) -> np.ndarray:
    """The textbook form of both vectors, as the shipped cards' references were fitted (session 11 and
    before): ``np.percentile`` / ``np.median``, the nine-term noise mask, the five-dimensional 2 x 2 mean."""
    u = images[:, 0].astype(np.float32) * spec.std + spec.mean
    n, h, w = u.shape
    flat = u.reshape(n, -1)

    def half(v: np.ndarray) -> np.ndarray:
        return (
            v[:, : v.shape[1] // 2 * 2, : v.shape[2] // 2 * 2]
            .reshape(n, v.shape[1] // 2, 2, v.shape[2] // 2, 2)
            .mean(axis=(2, 4))
        )

    def lap(v: np.ndarray) -> np.ndarray:
        return np.abs(
            4 * v[:, 1:-1, 1:-1] - v[:, :-2, 1:-1] - v[:, 2:, 1:-1] - v[:, 1:-1, :-2] - v[:, 1:-1, 2:]
        ).mean(axis=(1, 2))

    def noise(v: np.ndarray) -> np.ndarray:
        k = (
            v[:, :-2, :-2] - 2 * v[:, :-2, 1:-1] + v[:, :-2, 2:]
            - 2 * v[:, 1:-1, :-2] + 4 * v[:, 1:-1, 1:-1] - 2 * v[:, 1:-1, 2:]
            + v[:, 2:, :-2] - 2 * v[:, 2:, 1:-1] + v[:, 2:, 2:]
        )  # fmt: skip
        return np.abs(k).reshape(n, -1)

    hv = half(u)
    blocks = (
        u[:, : h // 4 * 4, : w // 4 * 4].reshape(n, 4, h // 4, 4, w // 4).mean(axis=(2, 4)).reshape(n, -1)
    )
    gradient = np.abs(np.diff(u, axis=1)).mean(axis=(1, 2)) + np.abs(np.diff(u, axis=2)).mean(axis=(1, 2))
    l1, l2 = lap(u) + 1e-6, lap(hv) + 1e-6
    k, kh = noise(u), noise(hv)
    return np.concatenate(
        [
            np.percentile(flat, (1, 10, 50, 90, 99), axis=1).T,
            flat.mean(axis=1, keepdims=True),
            flat.std(axis=1, keepdims=True),
            (flat <= 0.005).mean(axis=1, keepdims=True),
            (flat >= 0.995).mean(axis=1, keepdims=True),
            gradient[:, None],
            (l1 - 1e-6)[:, None],
            (l2 - 1e-6)[:, None],
            blocks,
            np.stack(
                [
                    np.log(k.mean(axis=1) + 1e-6),
                    np.log(np.median(k, axis=1) + 1e-6),
                    np.log(l1),
                    np.log(l2),
                    np.log(l1 / l2),
                    np.log(np.median(kh, axis=1) + 1e-6),
                ],
                axis=1,
            ),
        ],
        axis=1,
    ).astype(np.float64)


@pytest.mark.parametrize("size", [(128, 128), (256, 256), (33, 47)])
def test_the_fast_arithmetic_is_the_cards_definition(size: tuple[int, int]) -> None:
    """Strided 2 x 2 means and a separable noise mask change only float32 rounding: every feature within
    2e-5 of the textbook form (relative, or absolute near zero), far below any reference's spread, so the
    shipped cards' references and thresholds still hold."""
    rng = np.random.default_rng(5)
    smooth = np.cumsum(np.cumsum(rng.normal(0, 1, (3, 1, *size)), axis=2), axis=3)
    smooth = (smooth - smooth.min()) / (smooth.max() - smooth.min())
    images = ((smooth + rng.normal(0, 0.01, smooth.shape) - 0.5) / 0.25).astype(np.float32)
    spec = PreprocessSpec(version=2, height=size[0], width=size[1], mean=0.5, std=0.25)
    both = gate_statistics(images, spec, ("input", "texture"))
    got = np.concatenate([both["input"], both["texture"]], axis=1)
    np.testing.assert_allclose(got, _reference_features(images, spec), rtol=2e-5, atol=1e-7)
