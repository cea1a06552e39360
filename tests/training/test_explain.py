"""The class-activation map output and the t-SNE plot (training/explain.py, training/tsne.py) on a tiny
classifier trained for six epochs here: the ONNX ``cam`` equals Grad-CAM computed with autograd, the old
outputs stay bit-identical, every output passes parity, and the card and card.md say so."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from service.inference.card import ModelCard, sha256_file
from service.inference.preprocess import PreprocessSpec
from tests.training.test_train import config, tiny_set
from training import export as ex
from training.domain import EMBEDDING_OUTPUT, add_embedding_output
from training.explain import CAM_OUTPUT, add_cam_output, explain_model, grad_cam
from training.export import ParityError
from training.models.detector import CenterNetDetector
from training.ship import CXR_ELIGIBILITY
from training.train import load_checkpoint, train
from training.tsne import knn_agreement

SIZE = 32


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny classifier trained 6 epochs on bright squares, exported, with a card (no cam yet)."""
    root = tmp_path_factory.mktemp("explain")
    result = train(config(epochs=6), tiny_set(96, 0), tiny_set(32, 1), root / "run", progress=False)
    model, _ = load_checkpoint(result.best_path)
    folder = root / "cxr-test"
    onnx_path = folder / "model.onnx"
    outputs = ex.export_onnx(model, onnx_path, SIZE, SIZE)
    card = ex.build_card(
        name="cxr-test", version="0.0.1", task="classification", description="tiny", onnx_path=onnx_path,
        spec=PreprocessSpec(height=SIZE, width=SIZE), outputs=outputs, label="pneumothorax", threshold=0.5,
        urgency="stat", threshold_rule="test", eligibility=CXR_ELIGIBILITY, metrics={"auc": 0.9},
        parity=ex.check_parity(model, onnx_path, tiny_set(32, 2).images), training={"data": "squares"},
    )  # fmt: skip
    card.write(folder / "card.json")
    return model, result.best_path, folder


def test_onnx_cam_is_grad_cam_times_the_feature_map_area(trained, tmp_path):
    model, _, folder = trained
    path = tmp_path / "cam.onnx"
    labels, h, w = add_cam_output(folder / "model.onnx", path)
    assert (labels, h, w) == (1, SIZE // 16, SIZE // 16)
    held_out = tiny_set(40, 4)
    got = ex.ort_predict(ex.ort_session(path), held_out.images)[CAM_OUTPUT]
    assert got.shape == (40, 1, h, w)
    reference = grad_cam(model, torch.from_numpy(held_out.images)).numpy()
    assert reference.max() > 0  # a map that is not all zero, so the comparison means something
    np.testing.assert_allclose(got[:, 0] / (h * w), reference, rtol=1e-4, atol=1e-6)
    declared = onnx.load(str(path)).graph.output[-1]
    assert [d.dim_value for d in declared.type.tensor_type.shape.dim][1:] == [1, h, w]
    with pytest.raises(ValueError, match="already has"):
        add_cam_output(path, tmp_path / "twice.onnx")


def test_a_deeply_supervised_classifier_maps_with_its_aux_head(tmp_path):
    """With an aux head the cam is Sigmoid(aux(A)); the other cam is rebuilt, outputs kept."""
    from training.dataset import attach_masks
    from training.explain import AUX_METHOD, remove_cam_output, torch_outputs

    data = tiny_set(96, 0)
    where = {r.path: np.zeros((SIZE, SIZE), np.float32) for r in data.records}
    for r, b in zip(data.records, data.boxes, strict=True):
        for x0, y0, x1, y1 in b.astype(int):
            where[r.path][y0:y1, x0:x1] = 1
    spec = PreprocessSpec(height=SIZE, width=SIZE)
    attach_masks(data, spec, lambda record: where[record.path])
    result = train(
        config(epochs=4, aux_mask_weight=1.0), data, tiny_set(32, 1), tmp_path / "run", progress=False
    )
    model, _ = load_checkpoint(result.best_path)
    folder = tmp_path / "ct-test"
    onnx_path = folder / "model.onnx"
    outputs = ex.export_onnx(model, onnx_path, SIZE, SIZE)
    add_cam_output(onnx_path, tmp_path / "plain_cam.onnx")  # the class-activation map, as an older export
    onnx_path.write_bytes((tmp_path / "plain_cam.onnx").read_bytes())
    card = ex.build_card(
        name="ct-test", version="0.0.1", task="classification", description="tiny", onnx_path=onnx_path,
        spec=spec, outputs=[*outputs, CAM_OUTPUT], label="hemorrhage", threshold=0.5, urgency="stat",
        threshold_rule="test", eligibility=CXR_ELIGIBILITY, metrics={"auc": 0.9},
        parity=ex.check_parity(model, onnx_path, tiny_set(32, 2).images), training={"data": "squares"},
    )  # fmt: skip
    card.write(folder / "card.json")
    held_out = tiny_set(40, 4)
    before = ex.ort_predict(ex.ort_session(onnx_path), held_out.images)
    final = explain_model(folder, result.best_path, held_out)
    assert final.explanations is not None and final.explanations["cam"]["method"] == AUX_METHOD
    after = ex.ort_predict(ex.ort_session(onnx_path), held_out.images)
    np.testing.assert_array_equal(after["probability"], before["probability"])
    expected = torch_outputs(model)(torch.from_numpy(held_out.images))[CAM_OUTPUT].numpy()
    np.testing.assert_allclose(after[CAM_OUTPUT], expected, rtol=1e-4, atol=1e-6)
    assert np.all((after[CAM_OUTPUT] > 0) & (after[CAM_OUTPUT] < 1))
    assert not np.allclose(after[CAM_OUTPUT], before[CAM_OUTPUT])
    remove_cam_output(onnx_path, tmp_path / "stripped.onnx")
    assert CAM_OUTPUT not in ex.ort_predict(ex.ort_session(tmp_path / "stripped.onnx"), held_out.images[:2])


def test_old_outputs_are_checked_against_the_shipped_file(trained, tmp_path, monkeypatch):
    """An intermediate step (adding the embedding) that nudged the probability within the parity tolerance
    is caught: the candidate is compared with the file it replaces, not with the intermediate graph."""
    import training.explain

    _, checkpoint, folder = trained
    work = tmp_path / "cxr-test"
    work.mkdir()
    for name in ("model.onnx", "card.json"):
        (work / name).write_bytes((folder / name).read_bytes())

    def nudging(src: Path, dst: Path) -> int:
        width = add_embedding_output(src, dst)  # the real one, which explain imported
        graph = onnx.load(str(dst))
        (bias,) = [i for i in graph.graph.initializer if i.name == "head.bias"]
        nudged = onnx.numpy_helper.to_array(bias) + np.float32(1e-5)  # far inside parity's 1e-4
        bias.CopyFrom(onnx.numpy_helper.from_array(nudged, bias.name))
        onnx.save(graph, str(dst))
        return width

    monkeypatch.setattr(training.explain, "add_embedding_output", nudging)
    shipped = (work / "model.onnx").read_bytes()
    with pytest.raises(AssertionError, match="'probability' changed"):
        explain_model(work, checkpoint, tiny_set(24, 5))
    assert (work / "model.onnx").read_bytes() == shipped  # the shipped file is left as it was


def test_re_export_keeps_old_outputs_bit_identical_and_rechecks_parity(trained, tmp_path):
    model, checkpoint, folder = trained
    work = tmp_path / "cxr-test"
    work.mkdir()
    for name in ("model.onnx", "card.json"):
        (work / name).write_bytes((folder / name).read_bytes())
    held_out = tiny_set(24, 5)
    before = ex.ort_predict(ex.ort_session(folder / "model.onnx"), held_out.images)
    card = explain_model(work, checkpoint, held_out)

    after = ex.ort_predict(ex.ort_session(work / "model.onnx"), held_out.images)
    assert np.array_equal(after["probability"], before["probability"])  # bit-identical, not close
    assert card.outputs == ["probability", EMBEDDING_OUTPUT, CAM_OUTPUT] and card.cam_output == CAM_OUTPUT
    assert card.sha256 == sha256_file(work / "model.onnx")
    assert card.size_bytes == (work / "model.onnx").stat().st_size
    assert set(card.parity["per_output"]) == {"probability", EMBEDDING_OUTPUT, CAM_OUTPUT}
    assert card.parity["passed"] and card.parity["max_abs_diff"] <= ex.PARITY_TOLERANCE
    assert card.explanations is not None
    tsne = card.explanations["tsne"]
    assert tsne["points"] == 24 and tsne["positives"] == 12 and (work / tsne["plot"]).stat().st_size > 5000
    assert card.explanations["cam"]["shape"] == ["N", 1, 2, 2]
    md = (work / "card.md").read_text()
    assert "## Explanations" in md and "![t-SNE](tsne.png)" in md and "Grad-CAM" in md
    assert ModelCard.model_validate(json.loads((work / "card.json").read_text())) == card

    again = explain_model(work, checkpoint, held_out)  # idempotent: nothing added twice
    assert again.outputs == card.outputs and again.sha256 == card.sha256


def test_a_checkpoint_that_is_not_the_graphs_fails_parity(trained, tmp_path):
    _, checkpoint, folder = trained
    work = tmp_path / "cxr-test"
    work.mkdir()
    for name in ("model.onnx", "card.json"):
        (work / name).write_bytes((folder / name).read_bytes())
    other = torch.load(checkpoint, weights_only=True)
    other["model"]["head.weight"] = other["model"]["head.weight"] + 0.5
    torch.save(other, tmp_path / "other.pt")
    with pytest.raises(ParityError, match="max abs diff"):
        explain_model(work, tmp_path / "other.pt", tiny_set(16, 6))
    assert ModelCard.read(work / "card.json").cam_output is None  # nothing written on failure


def test_detector_has_no_head_to_map(tmp_path):
    torch.manual_seed(0)
    old = tmp_path / "det.onnx"
    ex.export_onnx(CenterNetDetector((4, 8, 8, 16)).eval(), old, SIZE, SIZE)
    add_embedding_output(old, tmp_path / "emb.onnx")
    with pytest.raises(ValueError, match="no classifier head"):
        add_cam_output(tmp_path / "emb.onnx", tmp_path / "cam.onnx")


def test_knn_agreement_known_answers():
    points = np.array([[0.0], [0.1], [0.2], [10.0], [10.1], [10.2]])
    assert knn_agreement(points, np.array([0, 0, 0, 1, 1, 1]), k=2) == 1.0
    assert knn_agreement(points, np.array([0, 1, 0, 1, 0, 1]), k=1) == 0.0


def test_card_field_is_checked():
    card = ModelCard.read(Path(__file__).resolve().parents[2] / "models" / "cxr-pneumothorax" / "card.json")
    data = card.model_dump(mode="json")
    without = [o for o in card.outputs if o != "cam"]  # the shipped card may already carry the output
    with pytest.raises(ValueError, match="cam_output 'cam' is not in outputs"):
        ModelCard.model_validate({**data, "outputs": without, "cam_output": "cam"})
    assert ModelCard.model_validate({**data, "outputs": [*without, "cam"], "cam_output": "cam"}).cam_output
