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
from service.inference.domain import assess_domain, domain_scores, mahalanobis
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
