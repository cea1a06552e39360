"""inference.postprocess: a model's outputs on a series → findings keyed to the right image and frame."""

from __future__ import annotations

import numpy as np
import pytest

from service.inference.card import ModelCard
from service.inference.postprocess import (
    ModelImage,
    activate,
    aggregate_series,
    decode_detections,
    findings_from_outputs,
    source_mask,
)
from service.inference.preprocess import Geometry, Preprocessed
from tests.fixtures.tiny_models import STRIDE, write_tiny_model


def _card(tmp_path, name: str, task: str) -> ModelCard:
    return ModelCard.read(write_tiny_model(tmp_path, name, task) / "card.json")  # type: ignore[arg-type]


def _image(uid: str, frames: int = 1, scale: float = 1.0) -> ModelImage:
    geometry = Geometry(rows=64, columns=64, scale_y=scale, scale_x=scale, offset_y=0.0, offset_x=0.0)
    return ModelImage(uid, Preprocessed(np.zeros((frames, 1, 64, 64), np.float32), geometry))


def test_classification_keys_the_best_row_to_its_instance_and_frame(tmp_path) -> None:
    card = _card(tmp_path, "cxr-pneumothorax", "classification")
    images = [_image("1.1"), _image("1.2", frames=2)]
    probs = np.array([[0.2], [0.3], [0.8]], np.float32)  # rows: 1.1, 1.2 frame 1, 1.2 frame 2
    (finding,) = findings_from_outputs(card, "9.9", images, {"probability": probs})
    assert (finding.key_instance_uid, finding.key_frame) == ("1.2", 2)
    assert finding.probability == pytest.approx(0.8) and finding.positive
    assert finding.series_uid == "9.9" and finding.model == "cxr-pneumothorax"


def test_detection_maps_boxes_back_to_source_pixels(tmp_path) -> None:
    card = _card(tmp_path, "cxr-nodule", "detection")
    heat = np.zeros((1, 1, 64 // STRIDE, 64 // STRIDE), np.float32)
    heat[0, 0, 4, 6] = 0.9  # one peak
    size = np.full((1, 2, 64 // STRIDE, 64 // STRIDE), 8.0, np.float32)
    (finding,) = findings_from_outputs(
        card, "9.9", [_image("1.1", scale=0.5)], {"heatmap": heat, "size": size}
    )
    (box,) = finding.detections
    cx, cy = (6 + 0.5) * STRIDE / 0.5, (4 + 0.5) * STRIDE / 0.5  # model pixels / scale
    assert (box.x0 + box.x1) / 2 == pytest.approx(cx) and (box.y0 + box.y1) / 2 == pytest.approx(cy)
    assert box.sop_instance_uid == "1.1" and finding.probability == pytest.approx(0.9)


def test_a_negative_detection_still_carries_its_best_score(tmp_path) -> None:
    card = _card(tmp_path, "cxr-nodule", "detection")
    heat = np.full((1, 1, 16, 16), 0.05, np.float32)
    size = np.ones((1, 2, 16, 16), np.float32)
    (finding,) = findings_from_outputs(card, "9.9", [_image("1.1")], {"heatmap": heat, "size": size})
    assert finding.detections == [] and not finding.positive
    assert finding.probability == pytest.approx(0.05)


def test_series_classification_smooths_over_adjacent_slices(tmp_path) -> None:
    card = _card(tmp_path, "ct-hemorrhage", "series_classification")
    images = [_image(f"1.{i}") for i in range(5)]
    probs = np.array([[0.1], [0.1], [0.9], [0.1], [0.1]], np.float32)  # one noisy slice
    (finding,) = findings_from_outputs(card, "9.9", images, {"probability": probs})
    assert finding.probability == pytest.approx(aggregate_series(probs[:, 0], 3)[0])
    assert finding.key_instance_uid == "1.2"


def test_decode_detections_keeps_local_maxima_above_threshold() -> None:
    heat = np.zeros((1, 8, 8), np.float32)
    heat[0, 2, 2], heat[0, 2, 3], heat[0, 6, 6] = 0.9, 0.8, 0.2
    boxes = decode_detections(heat, np.full((2, 8, 8), 4.0), 4, 0.5)
    assert [round(b.score, 2) for b in boxes] == [0.9]


class TestActivation:
    """Card v2 ``activation``: logits from models trained elsewhere become probabilities here."""

    def test_sigmoid_and_softmax_match_their_definitions(self) -> None:
        logits = np.array([[-2.0, 0.0, 3.0], [1000.0, -1000.0, 0.0]])
        sig = activate(logits, "sigmoid")
        assert sig[0] == pytest.approx(1 / (1 + np.exp(-logits[0])))
        assert sig[1].tolist() == [1.0, 0.0, 0.5]  # no overflow at +-1000
        soft = activate(logits, "softmax")
        assert soft[0] == pytest.approx(np.exp(logits[0]) / np.exp(logits[0]).sum())
        assert soft.sum(axis=1) == pytest.approx([1.0, 1.0]) and np.isfinite(soft).all()
        assert activate(logits, "probabilities") is logits

    def test_softmax_card_reads_its_label_column(self, tmp_path) -> None:
        card = _card(tmp_path, "cxr-pneumothorax", "classification")
        label = card.labels[0].model_copy(update={"index": 1})
        card = card.model_copy(update={"activation": "softmax", "labels": [label], "outputs": ["logits"]})
        logits = np.array([[2.0, 0.0], [0.0, 2.0]], np.float32)
        (finding,) = findings_from_outputs(card, "9.9", [_image("1.1"), _image("1.2")], {"logits": logits})
        assert finding.key_instance_uid == "1.2"
        assert finding.probability == pytest.approx(np.exp(2) / (1 + np.exp(2)))

    def test_sigmoid_detection_heatmap(self, tmp_path) -> None:
        card = _card(tmp_path, "cxr-nodule", "detection").model_copy(update={"activation": "sigmoid"})
        heat = np.full((1, 1, 64 // STRIDE, 64 // STRIDE), -8.0, np.float32)
        heat[0, 0, 3, 5] = 4.0  # a logit: sigmoid 0.982
        size = np.full((1, 2, 64 // STRIDE, 64 // STRIDE), 8.0, np.float32)
        (finding,) = findings_from_outputs(card, "9.9", [_image("1.1")], {"heatmap": heat, "size": size})
        assert finding.probability == pytest.approx(1 / (1 + np.exp(-4.0)))
        assert len(finding.detections) == 1


@pytest.mark.parametrize("scale", [0.5, 2.0])
def test_source_mask_skips_the_resize_only_where_nothing_can_reach_the_threshold(scale: float) -> None:
    """A probability map whose maximum is under the threshold is an empty mask without being resized
    (bilinear weights are convex); one above it is resized, then thresholded, as before."""
    from PIL import Image

    rows = columns = int(64 * scale)
    geometry = Geometry(
        rows=rows, columns=columns, scale_y=64 / rows, scale_x=64 / columns, offset_y=0, offset_x=0
    )
    rng = np.random.default_rng(3)
    for peak in (0.49, 0.51, 0.9):
        probability = (rng.random((64, 64)) * peak).astype(np.float32)
        got = source_mask(probability, geometry, 0.5)
        resized = np.asarray(
            Image.fromarray(probability, mode="F").resize((columns, rows), Image.Resampling.BILINEAR)
        )
        assert got.shape == (rows, columns) and np.array_equal(got, resized >= 0.5), peak
