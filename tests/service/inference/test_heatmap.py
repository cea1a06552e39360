"""Heat maps: the cam output mapped onto the source image, kept for positive findings only, stored compactly
and drawn as a colour overlay (service/inference/heatmap.py, service/results/heatmap.py)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from service.inference.card import ModelCard
from service.inference.heatmap import attach_heatmaps, cam_to_source
from service.inference.postprocess import ModelImage, findings_from_outputs
from service.inference.preprocess import Geometry, Preprocessed
from service.results.heatmap import (
    FLOOR,
    MAX_SIDE,
    colour_map,
    decode_heatmap,
    encode_heatmap,
    grid_shape,
    overlay,
)
from tests.fixtures.tiny_models import write_tiny_model


def _card(tmp_path, task: str = "series_classification", cam: bool = True) -> ModelCard:
    name = "ct-hemorrhage" if task == "series_classification" else "cxr-pneumothorax"
    return ModelCard.read(write_tiny_model(tmp_path, name, task, cam=cam) / "card.json")  # type: ignore[arg-type]


def _image(uid: str, geometry: Geometry | None = None) -> ModelImage:
    geometry = geometry or Geometry(rows=64, columns=64, scale_y=1.0, scale_x=1.0, offset_y=0.0, offset_x=0.0)
    return ModelImage(uid, Preprocessed(np.zeros((1, 1, 64, 64), np.float32), geometry))


class TestCamToSource:
    def test_a_hot_cell_lands_on_its_source_pixels(self) -> None:
        cam = np.zeros((8, 8), np.float32)
        cam[2, 5] = 1.0  # model pixels rows 16-23, columns 40-47
        geometry = Geometry(rows=128, columns=128, scale_y=0.5, scale_x=0.5, offset_y=0.0, offset_x=0.0)
        grid = cam_to_source(cam, geometry, 64, 64)
        assert grid.shape == (128, 128)
        y, x = np.unravel_index(np.argmax(grid), grid.shape)
        assert 32 <= y < 48 and 80 <= x < 96  # the same block in source pixels (x2)
        assert grid.max() > 0.9  # sampled at source pixel centres, near but not on the cell centre

    def test_padding_of_a_tall_image_is_cut_away(self) -> None:
        """200 x 100 source into 64 x 64 keeping the aspect: scale 0.32, 16 model pixels of padding each
        side. A map hot only in the padding leaves the image cold; hot on the image's left edge stays left."""
        geometry = Geometry(rows=200, columns=100, scale_y=0.32, scale_x=0.32, offset_y=0.0, offset_x=16.0)
        padding = np.zeros((8, 8), np.float32)
        padding[:, 0] = 1.0  # model columns 0-7: padding only
        assert cam_to_source(padding, geometry, 64, 64).max() < 0.05
        left = np.zeros((8, 8), np.float32)
        left[:, 2] = 1.0  # model columns 16-23: the image's left quarter
        grid = cam_to_source(left, geometry, 64, 64)
        assert grid.shape == grid_shape(200, 100) == (MAX_SIDE, 64)
        assert grid[:, :16].mean() > 0.5 > grid[:, 40:].mean()


class TestAttach:
    def _outputs(self, probs: list[float], hot_row: int | None = None) -> dict[str, np.ndarray]:
        cams = np.zeros((len(probs), 1, 8, 8), np.float32)
        cams[:, 0, 4, 4] = 0.5
        if hot_row is not None:
            cams[hot_row, 0, 1, 6] = 3.0
        return {"probability": np.array(probs, np.float32)[:, None], "cam": cams}

    def test_a_positive_series_gets_the_map_of_the_slice_that_drove_it(self, tmp_path) -> None:
        card = _card(tmp_path)
        images = [_image(f"1.{i}") for i in range(5)]
        out = self._outputs([0.1, 0.7, 0.9, 0.8, 0.1], hot_row=2)
        found = findings_from_outputs(card, "9.9", images, out)
        (finding,) = attach_heatmaps(card, found, images, out)
        assert finding.positive and finding.key_instance_uid == "1.2"
        hm = finding.heatmap
        assert hm is not None and (hm.sop_instance_uid, hm.frame, hm.output) == ("1.2", 1, "cam")
        grid = decode_heatmap(hm.values, hm.rows, hm.columns)
        y, x = np.unravel_index(np.argmax(grid), grid.shape)
        assert 8 <= y < 16 and 48 <= x < 56 and grid.max() == 1.0  # cell (1, 6), scaled to its peak
        assert hm.peak == pytest.approx(3.0, rel=0.01)

    def test_negative_findings_and_cards_without_cam_get_none(self, tmp_path) -> None:
        card = _card(tmp_path)
        images = [_image(f"1.{i}") for i in range(3)]
        out = self._outputs([0.1, 0.2, 0.1], hot_row=1)
        found = findings_from_outputs(card, "9.9", images, out)
        assert not found[0].positive and attach_heatmaps(card, found, images, out) == found
        plain = _card(tmp_path / "plain", cam=False)
        positive = self._outputs([0.9, 0.9, 0.9], hot_row=1)
        found = findings_from_outputs(plain, "9.9", images, positive)
        assert attach_heatmaps(plain, found, images, positive)[0].heatmap is None

    def test_an_all_zero_map_is_not_shown(self, tmp_path) -> None:
        card = _card(tmp_path, "classification")
        images = [_image("1.1")]
        out = {"probability": np.array([[0.9]], np.float32), "cam": np.zeros((1, 1, 8, 8), np.float32)}
        found = findings_from_outputs(card, "9.9", images, out)
        assert found[0].positive and attach_heatmaps(card, found, images, out)[0].heatmap is None


class TestStorageAndOverlay:
    def test_round_trip_to_8_bits(self) -> None:
        values = np.linspace(0, 1, 12, dtype=np.float32).reshape(3, 4)
        back = decode_heatmap(encode_heatmap(values), 3, 4)
        np.testing.assert_allclose(back, values, atol=0.5 / 255)
        with pytest.raises(ValueError, match="holds 12 values"):
            decode_heatmap(encode_heatmap(values), 4, 4)
        with pytest.raises(ValueError, match="not base64"):
            decode_heatmap("not base64!", 3, 4)

    def test_colour_map_runs_blue_to_red(self) -> None:
        assert tuple(colour_map(np.array(0.0))) == (0, 0, 160)
        assert tuple(colour_map(np.array(1.0))) == (255, 0, 0)

    def test_overlay_colours_only_above_the_floor(self) -> None:
        image = Image.new("RGB", (40, 20), (100, 100, 100))
        values = np.zeros((2, 4), np.float32)
        values[:, 3] = 1.0  # right quarter hot
        out = np.asarray(overlay(image, values))
        assert tuple(out[10, 2]) == (100, 100, 100)  # cold: untouched grey
        r, g, b = (int(c) for c in out[10, 38])
        assert r > 150 and g < 80 and b < 80  # hot: red blended at MAX_ALPHA
        assert FLOOR > 0


def test_card_and_graph_must_agree_on_the_cam_output(tmp_path) -> None:
    from service.inference.cardcheck import contradictions
    from service.inference.graph import read_graph

    card = _card(tmp_path, "classification")
    graph = read_graph(tmp_path / card.name / card.file)
    assert contradictions(card, graph) == []
    wrong = card.model_copy(update={"outputs": ["probability", "cam"], "cam_output": "probability"})
    assert any("must be [N, labels, h, w]" in p for p in contradictions(wrong, graph))
