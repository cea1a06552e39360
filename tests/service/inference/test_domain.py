"""The input-domain gate's arithmetic and verdicts on hand-made references with known answers.

Whether the shipped references catch real out-of-domain images is tests/training/test_domain.py's job;
here every number is computed by hand.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydantic import ValidationError

from service.inference.card import DomainSpec, ModelCard, decode_floats, encode_floats
from service.inference.domain import (
    INPUT_FEATURES,
    TEXTURE_FEATURES,
    assess_domain,
    domain_scores,
    input_statistics,
    mahalanobis,
    texture_statistics,
)
from service.inference.preprocess import PreprocessSpec

MODELS = Path(__file__).resolve().parents[3] / "models"
UNIT = PreprocessSpec(height=8, width=8, mean=0.0, std=1.0)


def embedding_card(unit: str, threshold: float = 2.0, dim: int = 2) -> ModelCard:
    """The shipped pneumothorax card with an ``embedding`` output: mean 0, identity precision."""
    data: dict[str, Any] = ModelCard.read(MODELS / "cxr-pneumothorax" / "card.json").model_dump(mode="json")
    data["outputs"] = ["probability", "embedding", *([data["cam_output"]] if data.get("cam_output") else [])]
    data["domain"] = {
        "unit": unit,
        "scores": [
            {
                "name": "embedding",
                "source": "output",
                "output": "embedding",
                "dim": dim,
                "mean": encode_floats(np.zeros(dim)),
                "precision": encode_floats(np.eye(dim)),
                "threshold": threshold,
            }
        ],
    }
    return ModelCard.model_validate(data)


class TestArithmetic:
    def test_mahalanobis_known_answers(self):
        precision = np.diag([0.25, 1.0])  # variances 4 and 1
        got = mahalanobis(np.array([[2.0, 0.0], [0.0, 3.0], [2.0, 3.0], [1.0, 1.0]]), np.zeros(2), precision)
        np.testing.assert_allclose(got, [1.0, 3.0, np.sqrt(10.0), np.sqrt(1.25)])

    def test_encode_decode_round_trip(self):
        values = np.array([1.5, -2.25, 1e-7, 3e5], dtype=np.float32)
        np.testing.assert_array_equal(decode_floats(encode_floats(values)), values)

    def test_input_statistics_of_constant_and_step_images(self):
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

    def test_input_statistics_undo_the_normalisation(self):
        unit = np.random.default_rng(0).random((3, 1, 16, 16)).astype(np.float32)
        spec = PreprocessSpec(height=16, width=16, mean=0.5, std=0.25)
        np.testing.assert_allclose(
            input_statistics((unit - 0.5) / 0.25, spec), input_statistics(unit, UNIT), atol=1e-5
        )

    def test_texture_sees_noise_level_and_sharpening_not_ramps(self):
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


class TestVerdicts:
    def test_per_image(self):
        """Instances of 1, 2 and 1 rows; the second has scores 4 and 3, median 3.5 > 2: out."""
        card = embedding_card("image")
        embedding = np.array([[1.0, 0.0], [4.0, 0.0], [0.0, 3.0], [0.0, 0.5]])
        outputs = {"probability": np.array([[0.1], [0.9], [0.8], [0.2]]), "embedding": embedding}
        inputs = np.zeros((4, 1, 128, 128), np.float32)
        verdict = assess_domain(card, inputs, outputs, [1, 2, 1])
        assert verdict.kept == (0, 2)
        [(index, reason)] = verdict.rejected
        assert index == 1
        assert reason == "outside the model's validated input domain (embedding score 3.5 > threshold 2)"
        np.testing.assert_array_equal(verdict.select(outputs)["probability"], [[0.1], [0.2]])

    def test_per_series_uses_the_median_slice(self):
        card = embedding_card("series")
        inputs = np.zeros((5, 1, 128, 128), np.float32)
        few_out = {"embedding": np.array([[9.0, 0], [9.0, 0], [0, 0], [0, 0], [0, 1]])}  # median 1.0
        assert assess_domain(card, inputs, few_out, [1] * 5).kept == (0, 1, 2, 3, 4)
        most_out = {"embedding": np.array([[9.0, 0], [9.0, 0], [3.0, 0], [0, 0], [0, 1]])}  # median 3.0
        verdict = assess_domain(card, inputs, most_out, [1] * 5)
        assert verdict.kept == () and [i for i, _ in verdict.rejected] == [None]
        assert verdict.select(most_out)["embedding"].shape == (0, 2)

    def test_non_finite_embedding_is_outside(self):
        card = embedding_card("image")
        outputs = {"embedding": np.array([[np.nan, 0.0], [0.0, 0.0]])}
        scores = domain_scores(card, np.zeros((2, 1, 128, 128), np.float32), outputs)
        assert scores["embedding"][0] == np.inf and scores["embedding"][1] == 0

    def test_missing_embedding_output_is_not_judged_so_not_analysed(self):
        verdict = assess_domain(embedding_card("image"), np.zeros((2, 1, 128, 128), np.float32), {}, [1, 1])
        assert verdict.kept == ()
        assert verdict.rejected == tuple(
            (i, "the input-domain gate cannot judge: the model returned no 'embedding' output")
            for i in (0, 1)
        )

    def test_card_without_domain_keeps_everything(self):
        card = ModelCard.read(MODELS / "cxr-pneumothorax" / "card.json").model_copy(update={"domain": None})
        verdict = assess_domain(card, np.zeros((3, 1, 128, 128), np.float32), {}, [2, 1])
        assert verdict.kept == (0, 1) and verdict.rejected == ()


class TestSchema:
    def test_dimension_mismatch_is_refused(self):
        with pytest.raises(ValidationError, match="dim"):
            DomainSpec.model_validate(
                {
                    "unit": "image",
                    "scores": [
                        {
                            "name": "e",
                            "source": "output",
                            "output": "embedding",
                            "dim": 3,
                            "mean": encode_floats(np.zeros(2)),
                            "precision": encode_floats(np.eye(2)),
                            "threshold": 1.0,
                        }
                    ],
                }
            )

    def test_score_output_must_be_a_card_output(self):
        data = embedding_card("image").model_dump(mode="json")
        data["outputs"] = ["probability"]
        with pytest.raises(ValidationError, match="not in outputs"):
            ModelCard.model_validate(data)


def test_input_statistics_in_chunks_are_the_whole_series_numbers(monkeypatch: pytest.MonkeyPatch) -> None:
    """A long series is measured a chunk of images at a time (bounded temporaries); nothing is reduced
    across images, so the features are exactly those of one pass over the whole series."""
    import service.inference.domain as domain_module

    spec = PreprocessSpec(version=2, height=64, width=48, mean=0.5, std=0.25)
    images = np.random.default_rng(0).normal(0, 1, (75, 1, 64, 48)).astype(np.float32)
    chunked = domain_module.input_statistics(images, spec)
    monkeypatch.setattr(domain_module, "_CHUNK", 10**6)
    assert np.array_equal(chunked, domain_module.input_statistics(images, spec))


@pytest.mark.parametrize(
    "pixels",
    ["noise", "quantised", "flat", "odd"],
    ids=["noise", "12-bit levels (ties)", "a flat image", "odd sizes"],
)
def test_quantiles_and_medians_from_sorted_rows_are_numpys_own(pixels: str) -> None:
    """The gate sorts each row before taking its quantiles and medians (faster than numpy's selection);
    the features must be exactly ``np.percentile`` / ``np.median`` of the unsorted values, or every card's
    reference, fitted on those, would be off."""
    import service.inference.domain as domain_module

    rng = np.random.default_rng(3)
    shape = (4, 1, 33, 47) if pixels == "odd" else (4, 1, 64, 64)
    images = {
        "noise": rng.normal(0, 1, shape),
        "quantised": np.round(rng.normal(0, 1, shape) * 512) / 512,
        "flat": np.full(shape, 0.25),
        "odd": rng.normal(0, 1, shape),
    }[pixels].astype(np.float32)
    spec = PreprocessSpec(version=2, height=shape[2], width=shape[3], mean=0.5, std=0.25)
    u = images[:, 0] * spec.std + spec.mean
    quantiles = np.percentile(u.reshape(len(u), -1), (1, 10, 50, 90, 99), axis=1).T
    assert np.array_equal(input_statistics(images, spec)[:, :5], quantiles)
    k = domain_module._noise_kernel(u).reshape(len(u), -1)
    assert np.array_equal(domain_module._sorted_median(k), np.median(k, axis=1))
    k_half = domain_module._noise_kernel(domain_module._half(u)).reshape(len(u), -1)
    assert np.array_equal(domain_module._sorted_median(k_half), np.median(k_half, axis=1))
