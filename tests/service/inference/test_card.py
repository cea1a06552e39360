"""ModelCard v2: old cards keep loading, new fields are checked, unknown fields are kept and listed."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydantic import ValidationError

from service.inference.card import ModelCard
from service.inference.preprocess import PreprocessSpec, preprocess_dataset
from tests.fixtures.tiny_models import write_tiny_model
from tests.service.dicom_factory import make_dataset

SHIPPED = sorted((Path(__file__).resolve().parents[3] / "models").glob("*/card.json"))


@pytest.fixture
def card_json(tmp_path: Path) -> dict[str, Any]:
    folder = write_tiny_model(tmp_path, "cxr-pneumothorax", "classification")
    return json.loads((folder / "card.json").read_text())


def errors(data: dict[str, Any]) -> str:
    with pytest.raises(ValidationError) as info:
        ModelCard.model_validate(data)
    return str(info.value)


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.parent.name)
def test_shipped_cards_read_as_version_1(path: Path) -> None:
    card = ModelCard.read(path)
    assert card.card_version == 1 and card.activation == "probabilities"
    assert card.scores_name == card.outputs[0] and card.label_columns() == list(range(len(card.labels)))
    assert card.unknown_fields == []


def test_unknown_fields_are_kept_and_written_back(card_json: dict[str, Any], tmp_path: Path) -> None:
    card_json["exported_by"] = {"tool": "a newer exporter"}
    card = ModelCard.model_validate(card_json)
    assert card.unknown_fields == ["exported_by"]
    card.write(tmp_path / "again.json")
    assert json.loads((tmp_path / "again.json").read_text())["exported_by"] == {"tool": "a newer exporter"}


def test_documentation_fields(card_json: dict[str, Any]) -> None:
    card_json |= {
        "card_version": 2,
        "license": "CC-BY-4.0",
        "authors": ["A. Person"],
        "references": ["doi:10.1145/3287560.3287596"],
        "limitations": "adults only",
        "out_of_scope_use": "paediatric images",
        "subgroup_results": {"female": {"auc": 0.9}},
        "regulatory_status": "not cleared for clinical use",
    }
    card = ModelCard.model_validate(card_json)
    assert card.unknown_fields == [] and card.authors == ["A. Person"]


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        ({"score_output": "logits"}, "score_output 'logits' is not in outputs"),
        ({"activation": "tanh"}, "activation"),
        ({"card_version": 3}, "card_version"),
        ({"shadow_of": "cxr-pneumothorax"}, "a model cannot be its own shadow"),
    ],
)
def test_v2_fields_are_checked(card_json: dict[str, Any], change: dict[str, Any], needle: str) -> None:
    assert needle in errors(card_json | change)


def test_two_labels_on_one_column(card_json: dict[str, Any]) -> None:
    card_json["labels"] = [card_json["labels"][0] | {"index": 1}, card_json["labels"][0] | {"name": "b"}]
    card_json["labels"][1]["index"] = 1
    assert "two labels read the same output column ([1, 1])" in errors(card_json)


def test_detection_cannot_take_softmax(tmp_path: Path) -> None:
    folder = write_tiny_model(tmp_path, "cxr-nodule", "detection")
    data = json.loads((folder / "card.json").read_text())
    assert "not softmax" in errors(data | {"activation": "softmax"})


class TestChannels:
    def test_per_channel_values_must_match_channels(self) -> None:
        with pytest.raises(ValidationError, match="channel_mean has 1 values for 3 channel"):
            PreprocessSpec(height=8, width=8, channels=3, channel_mean=[0.5])
        with pytest.raises(ValidationError, match="channel_std values must be > 0"):
            PreprocessSpec(height=8, width=8, channels=3, channel_std=[1, 0, 1])

    def test_three_channels_copy_the_gray_image_and_normalise_each(self) -> None:
        ds = make_dataset(rows=8, columns=8, pixels=np.tile(np.arange(8, dtype=np.uint16) * 500, (8, 1)))
        gray = preprocess_dataset(ds, PreprocessSpec(height=8, width=8, window_source="percentile"))
        spec = PreprocessSpec(
            height=8,
            width=8,
            window_source="percentile",
            channels=3,
            channel_mean=[0.485, 0.456, 0.406],
            channel_std=[0.229, 0.224, 0.225],
        )
        rgb = preprocess_dataset(ds, spec)
        assert gray.array.shape == (1, 1, 8, 8) and rgb.array.shape == (1, 3, 8, 8)
        assert rgb.array.dtype == np.float32
        for c, (mean, std) in enumerate(zip(spec.channel_mean or [], spec.channel_std or [], strict=True)):
            np.testing.assert_allclose(rgb.array[0, c], (gray.array[0, 0] - mean) / std, rtol=1e-6, atol=1e-6)

    def test_one_channel_output_is_unchanged_by_the_v2_fields(self) -> None:
        ds = make_dataset(rows=8, columns=8, value=1200)
        plain = preprocess_dataset(ds, PreprocessSpec(height=8, width=8, mean=0.3, std=0.2))
        listed = preprocess_dataset(
            ds, PreprocessSpec(height=8, width=8, channel_mean=[0.3], channel_std=[0.2])
        )
        np.testing.assert_array_equal(plain.array, listed.array)
