"""The U-net, its training loop (early stopping on validation Dice, weights-only checkpoints) and its ONNX
export with parity, on small hand-made data whose answers are known."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from training.data.records import Record
from training.export import check_parity, export_onnx
from training.models.unet import UNet
from training.segment import SEG_PLAN, MaskSet, load_unet, series_dice, train_unet


def _records(n: int, series: str) -> list[Record]:
    return [
        Record(
            path=Path(f"{series}-{i}.dcm"),
            patient_id=series,
            study_uid="1.2",
            series_uid=series,
            sop_uid=f"1.2.{i}",
            labels={},
        )
        for i in range(n)
    ]


def square_set(n: int = 8, series: str = "s1") -> MaskSet:
    """Bright squares on a dark background, the mask is the square: a U-net learns it in a few steps."""
    rng = np.random.default_rng(len(series))
    images = rng.normal(0, 0.1, (n, 1, 64, 64)).astype(np.float32)
    masks = np.zeros((n, 1, 64, 64), np.uint8)
    for i in range(0, n, 2):
        top, left = rng.integers(4, 40, 2)
        masks[i, 0, top : top + 16, left : left + 16] = 1
        images[i, 0, top : top + 16, left : left + 16] += 2.0
    return MaskSet(_records(n, series), images, masks)


class TestUNet:
    def test_shape_and_range(self) -> None:
        model = UNet(base=4, levels=3).eval()
        with torch.no_grad():
            out = model(torch.zeros(2, 1, 64, 48))
        assert out.shape == (2, 1, 64, 48)
        assert float(out.min()) >= 0 and float(out.max()) <= 1

    def test_needs_a_level(self) -> None:
        with pytest.raises(ValueError, match="level"):
            UNet(base=4, levels=0)

    def test_onnx_export_matches_torch(self, tmp_path: Path) -> None:
        model = UNet(base=4, levels=2).eval()
        path = tmp_path / "unet.onnx"
        assert export_onnx(model, path, 64, 64) == ["probability"]
        report = check_parity(model, path, square_set(4).images)
        assert report["passed"] and report["max_abs_diff"] <= 1e-4


class TestSeriesDice:
    def test_known_answer(self) -> None:
        data = square_set(4)
        perfect = data.masks.astype(np.float32)
        assert series_dice(data, perfect) == pytest.approx(1.0)
        assert series_dice(data, np.zeros_like(perfect)) == 0.0
        half = perfect.copy()
        half[..., :, 32:] = 0  # keeps only squares left of column 32: Dice = 2|A∩B|/(|A|+|B|)
        inter = (half > 0).sum()
        assert series_dice(data, half) == pytest.approx(2 * inter / (inter + data.masks.sum()))


class TestTrain:
    def test_learns_squares_and_keeps_the_best_checkpoint(self, tmp_path: Path) -> None:
        torch.set_num_threads(1)
        config = replace(
            SEG_PLAN.config, base=4, levels=2, epochs=6, steps_per_epoch=10, batch_size=4, crop=32,
            patience=6, time_limit_s=1e9, device="cpu",
        )  # fmt: skip
        run = train_unet(config, square_set(8, "train"), square_set(4, "validation"), tmp_path)
        assert run["epochs_run"] == 6 and not run["stopped_early"]
        assert run["best_validation_dice"] == max(h["val_dice"] for h in run["history"])
        assert run["best_validation_dice"] > 0.5
        model, ckpt = load_unet(Path(run["best_checkpoint"]))
        assert ckpt["epoch"] == run["best_epoch"]
        assert isinstance(model, UNet) and not model.training
