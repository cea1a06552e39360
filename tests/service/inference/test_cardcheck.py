"""Card against graph: each contradiction is named, at load and by ``models check``; good models serve."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import onnx
import pytest

from service.errors import ModelLoadError
from service.inference.card import ModelCard, sha256_file
from service.inference.cardcheck import contradictions, placeholders
from service.inference.graph import read_graph
from service.inference.registry import CARD_FILE, ModelRegistry, load_model
from tests.fixtures.foreign_model import foreign_graph
from tests.fixtures.tiny_models import write_tiny_model, write_tiny_models

SHIPPED = sorted((Path(__file__).resolve().parents[3] / "models").glob(f"*/{CARD_FILE}"))

Edit = Callable[[dict[str, Any]], None]


def refused(folder: Path, edit: Edit) -> list[str]:
    """Edit the card JSON, load the model, return the problems it is refused for."""
    path = folder / CARD_FILE
    card = json.loads(path.read_text())
    edit(card)
    path.write_text(json.dumps(card))
    with pytest.raises(ModelLoadError) as info:
        load_model(path)
    return info.value.problems


@pytest.fixture
def classifier(tmp_path: Path) -> Path:
    return write_tiny_model(tmp_path, "cxr-pneumothorax", "classification", 64, 64)


@pytest.fixture
def detector(tmp_path: Path) -> Path:
    return write_tiny_model(tmp_path, "cxr-nodule", "detection", 64, 64)


@pytest.mark.parametrize("card_path", SHIPPED, ids=lambda p: p.parent.name)
def test_shipped_models_agree_with_their_graphs(card_path: Path) -> None:
    card = ModelCard.read(card_path)
    assert contradictions(card, read_graph(card_path.parent / card.file)) == []


def test_tiny_models_agree(tmp_path: Path) -> None:
    for folder in write_tiny_models(tmp_path).values():
        assert load_model(folder / CARD_FILE).card.unknown_fields == []


def _set(path: str, value: object) -> Edit:
    def edit(card: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        target: Any = card
        for key in parents:
            target = target[int(key)] if key.isdigit() else target[key]
        target[int(last) if last.isdigit() else last] = value

    return edit


@pytest.mark.parametrize(
    ("edit", "needle"),
    [
        (_set("input.name", "pixels"), "input.name is 'pixels'; the graph's input is 'image'"),
        (_set("opset", 18), "opset is 18; the graph imports ai.onnx opset 17"),
        (_set("outputs", ["probability", "logits"]), "outputs lists 'logits'"),
        (_set("labels.0.index", 3), "labels[].index 3 is past score output 'probability' [N, 1]"),
        (_set("activation", "softmax"), "activation softmax over 1 column(s) is always 1"),
        (_set("description", "TODO: say what it does"), "description is a placeholder to fill"),
        (_set("labels.0.code.value", "TODO"), "labels[0].code.value is a placeholder"),
    ],
)
def test_each_contradiction_is_named(classifier: Path, edit: Edit, needle: str) -> None:
    problems = refused(classifier, edit)
    assert any(needle in p for p in problems), problems


def test_preprocessing_size_against_card_and_graph(classifier: Path) -> None:
    def edit(card: dict[str, Any]) -> None:
        card["preprocessing"]["height"] = 128
        card["input"]["shape"] = [None, 1, 64, 64]

    problems = refused(classifier, edit)
    assert "input.shape[2] is 64; preprocessing.height is 128" in problems
    assert "preprocessing.height is 128; the graph's input has height 64" in problems
    assert len(problems) == 2, problems


def test_three_channels_claimed_for_a_one_channel_graph(classifier: Path) -> None:
    def edit(card: dict[str, Any]) -> None:
        card["input"]["shape"][1] = 3
        card["preprocessing"]["channels"] = 3

    assert refused(classifier, edit) == ["preprocessing.channels is 3; the graph's input has 1 channel(s)"]


def test_channels_of_card_and_preprocessing_must_agree(classifier: Path) -> None:
    problems = refused(classifier, _set("input.shape", [None, 3, 64, 64]))
    assert any("input.shape has 3 channel(s), preprocessing.channels is 1" in p for p in problems)


def test_two_labels_for_one_column(classifier: Path) -> None:
    def edit(card: dict[str, Any]) -> None:
        card["labels"].append({**card["labels"][0], "name": "second"})

    problems = refused(classifier, edit)
    assert any("2 label(s) but score output 'probability' [N, 1] has 1 column(s)" in p for p in problems)


def test_detector_stride_and_outputs(detector: Path) -> None:
    problems = refused(detector, _set("detection.stride", 8))
    assert any("is 16 x 16; preprocessing 64 x 64 at detection.stride 8 gives 8 x 8" in p for p in problems)
    problems = refused(detector, _set("detection.size_output", "boxes"))
    assert "detection.size_output 'boxes' is not an output of the graph" in problems


def _replace_graph(folder: Path, model: onnx.ModelProto, edit: Edit | None = None) -> list[str]:
    onnx.save(model, folder / "model.onnx")

    def rehash(card: dict[str, Any]) -> None:
        _rehash(folder, card)
        if edit is not None:
            edit(card)

    return refused(folder, rehash)


def test_fixed_batch_dtype_and_extra_inputs(classifier: Path) -> None:
    def card_for_foreign(card: dict[str, Any]) -> None:
        card["input"] = {"name": "input", "shape": [None, 3, 64, 64]}
        card["preprocessing"]["channels"] = 3
        card["outputs"] = ["logits"]

    problems = _replace_graph(classifier, foreign_graph(size=64, batch=1), card_for_foreign)
    assert any("batch axis is fixed at 1" in p for p in problems), problems
    model = foreign_graph(size=64)
    model.graph.input[0].type.tensor_type.elem_type = onnx.TensorProto.UINT8
    model.graph.input.append(onnx.helper.make_tensor_value_info("mask", onnx.TensorProto.FLOAT, [1]))
    problems = _replace_graph(classifier, model, card_for_foreign)
    assert "input.dtype is float32; the graph's input 'input' is uint8" in problems
    assert "the graph needs more inputs than the image ('mask'); one is fed" in problems


def test_not_an_onnx_file(classifier: Path) -> None:
    (classifier / "model.onnx").write_bytes(b"\x0f" * 10)
    problems = refused(classifier, lambda card: _rehash(classifier, card))
    assert problems[0].startswith("model.onnx: unexpected protobuf wire type")


def _rehash(folder: Path, card: dict[str, Any]) -> None:
    card["sha256"] = sha256_file(folder / "model.onnx")
    card["size_bytes"] = (folder / "model.onnx").stat().st_size


def test_bad_model_is_refused_at_load_and_the_others_serve(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    folders = write_tiny_models(tmp_path)
    path = folders["cxr-nodule"] / CARD_FILE
    card = json.loads(path.read_text())
    card["input"]["shape"][1] = 3
    card["preprocessing"]["channels"] = 3
    path.write_text(json.dumps(card))
    with caplog.at_level(logging.ERROR, logger="service.inference.registry"):
        registry = ModelRegistry.from_directory(tmp_path)
    assert set(registry.models) == {"cxr-pneumothorax", "ct-hemorrhage"}
    assert registry.errors["cxr-nodule"] == (
        "card contradicts the model (1): preprocessing.channels is 3; the graph's input has 1 channel(s)"
    )
    assert any("cxr-nodule" in r.getMessage() and "channels" in r.getMessage() for r in caplog.records)


def test_placeholders_found_anywhere(classifier: Path) -> None:
    card = ModelCard.read(classifier / CARD_FILE)
    drafted = card.model_copy(update={"training": {"data": {"source": "TODO: where"}}, "authors": ["TODO"]})
    assert placeholders(drafted) == [
        "training.data.source is a placeholder to fill: 'TODO: where'",
        "authors[0] is a placeholder to fill: 'TODO'",
    ]
