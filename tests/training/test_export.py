"""ONNX export of tiny models: names, dynamic batch, torch-vs-ORT parity, and a card the service can read."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from service.inference.card import ModelCard, sha256_file
from service.inference.preprocess import PreprocessSpec
from training import export as ex
from training.models.classifier import ResNetClassifier
from training.models.detector import CenterNetDetector
from training.ship import CT_ELIGIBILITY, CXR_ELIGIBILITY

SIZE = 32


def _inputs(n: int = 32) -> np.ndarray:
    return np.random.default_rng(0).normal(0, 1, (n, 1, SIZE, SIZE)).astype(np.float32)


@pytest.fixture(scope="module")
def classifier_onnx(tmp_path_factory):
    torch.manual_seed(0)
    model = ResNetClassifier(widths=(4, 8, 8, 16)).eval()
    path = tmp_path_factory.mktemp("cls") / "model.onnx"
    names = ex.export_onnx(model, path, SIZE, SIZE)
    return model, path, names


def test_classifier_export_names_and_dynamic_batch(classifier_onnx):
    _, path, names = classifier_onnx
    assert names == ["probability"]
    session = ex.ort_session(path)
    assert [i.name for i in session.get_inputs()] == ["image"]
    assert [o.name for o in session.get_outputs()] == ["probability"]
    for n in (1, 5):
        assert ex.ort_predict(session, _inputs(n))["probability"].shape == (n, 1)
    import onnx

    assert onnx.load(str(path)).opset_import[0].version >= 17


def test_parity_on_32_inputs(classifier_onnx):
    model, path, _ = classifier_onnx
    report = ex.check_parity(model, path, _inputs())
    assert report["n_inputs"] == 32 and report["passed"]
    assert report["max_abs_diff"] <= ex.PARITY_TOLERANCE


def test_parity_failure_is_loud(classifier_onnx):
    model, path, _ = classifier_onnx
    other = ResNetClassifier(widths=(4, 8, 8, 16)).eval()
    with torch.no_grad():
        other.head.bias.add_(1.0)
    other.backbone.load_state_dict(model.backbone.state_dict())
    other.head.weight.data.copy_(model.head.weight.data)
    with pytest.raises(ex.ParityError):
        ex.check_parity(other, path, _inputs())


def test_export_fresh_replaces_the_folder_and_checks_parity(tmp_path):
    torch.manual_seed(0)
    model = ResNetClassifier(widths=(4, 8, 8, 16)).eval()
    out = tmp_path / "cxr-test"
    out.mkdir()
    (out / "old_plot.png").write_bytes(b"the previous model's")
    fresh = ex.export_fresh(model, out, PreprocessSpec(height=SIZE, width=SIZE), _inputs(40))
    assert sorted(p.name for p in out.iterdir()) == ["model.onnx"]  # nothing of the previous model stays
    assert fresh.onnx_path == out / "model.onnx" and fresh.outputs == ["probability"]
    assert fresh.parity["passed"] and fresh.parity["n_inputs"] == ex.PARITY_INPUTS


def test_detector_export_parity(tmp_path):
    torch.manual_seed(0)
    model = CenterNetDetector(widths=(4, 8, 8, 16)).eval()
    path = tmp_path / "model.onnx"
    assert ex.export_onnx(model, path, SIZE, SIZE) == ["heatmap", "size"]
    report = ex.check_parity(model, path, _inputs())
    assert set(report["per_output"]) == {"heatmap", "size"}


@pytest.mark.parametrize(
    ("label", "task", "urgency", "eligibility"),
    [
        ("pneumothorax", "classification", "stat", CXR_ELIGIBILITY),
        ("nodule", "detection", "routine", CXR_ELIGIBILITY),
        ("hemorrhage", "series_classification", "stat", CT_ELIGIBILITY),
    ],
)
def test_card_validates_with_the_service_schema(classifier_onnx, tmp_path, label, task, urgency, eligibility):
    _, path, names = classifier_onnx
    card = ex.build_card(
        name=f"test-{label}",
        version="0.0.1",
        task=task,
        description="tiny",
        onnx_path=path,
        spec=PreprocessSpec(height=SIZE, width=SIZE),
        outputs=names,
        label=label,
        threshold=0.3,
        urgency=urgency,
        threshold_rule="test",
        eligibility=eligibility,
        metrics={"auc": 0.9},
        parity={"max_abs_diff": 0.0, "n_inputs": 32},
        training={"data": "none"},
        stride=4 if task == "detection" else None,
        aggregation_window=3 if task == "series_classification" else None,
    )
    card.write(tmp_path / "card.json")
    again = ModelCard.read(tmp_path / "card.json")
    assert again == card
    assert again.sha256 == sha256_file(path)
    assert again.labels[0].code == ex.CODES[label]
    assert again.intended_use == "demonstration model, not for clinical use"
    assert json.loads((tmp_path / "card.json").read_text())["input"]["shape"] == [None, 1, SIZE, SIZE]
    md = ex.write_card_md(again, tmp_path, [])
    assert "not for clinical use" in md.read_text()
