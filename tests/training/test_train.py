"""A tiny training run whose loss falls; early stopping; best checkpoint; resume; frozen backbone."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from training import train as train_module
from training.data.records import BoxLabel, Record
from training.dataset import ImageDataset, PreprocessedSet, centernet_targets
from training.models.classifier import ResNetClassifier
from training.train import TrainConfig, load_checkpoint, train

SIZE = 32
WIDTHS = (4, 8, 8, 16)


def tiny_set(n: int, seed: int, size: int = SIZE) -> PreprocessedSet:
    """Noise images; positives carry a bright 6x6 square (label 1, with its box in model pixels)."""
    rng = np.random.default_rng(seed)
    images = rng.normal(0, 0.3, (n, 1, size, size)).astype(np.float32)
    labels = (np.arange(n) % 2).astype(np.float32)
    boxes = []
    records = []
    for i in range(n):
        if labels[i]:
            x, y = rng.integers(2, size - 8, 2)
            images[i, 0, y : y + 6, x : x + 6] += 1.5
            boxes.append(np.array([[x, y, x + 6, y + 6]], dtype=np.float32))
        else:
            boxes.append(np.zeros((0, 4), dtype=np.float32))
        records.append(
            Record(
                Path(f"img{i}.dcm"),
                f"p{i}",
                f"st{i}",
                f"se{i}",
                f"sop{i}",
                {"finding": int(labels[i])},
                tuple(
                    BoxLabel(float(x0), float(y0), float(x1), float(y1), "finding")
                    for x0, y0, x1, y1 in boxes[-1]
                ),
            )
        )
    return PreprocessedSet(records, images, labels, boxes)


def config(**kw) -> TrainConfig:
    base = {
        "task": "classification",
        "label": "finding",
        "height": SIZE,
        "width": SIZE,
        "widths": WIDTHS,
        "epochs": 6,
        "batch_size": 16,
        "lr": 5e-3,
        "patience": 5,
        "seed": 0,
    }
    return TrainConfig(**{**base, **kw})


Sets = tuple[PreprocessedSet, PreprocessedSet]  # (training, validation)


@pytest.fixture(scope="module")
def data() -> Sets:
    return tiny_set(128, 0), tiny_set(32, 1)


def test_classifier_loss_falls_and_best_checkpoint_kept(tmp_path, data: Sets):
    result = train(config(), *data, tmp_path, progress=False)
    losses = [h["train_loss"] for h in result.history]
    assert losses[-1] < 0.7 * losses[0]
    assert result.best_metric > 0.8
    ckpt = torch.load(result.best_path, weights_only=False)
    assert set(ckpt) >= {"model", "config", "epoch", "metric"}
    assert ckpt["epoch"] == result.best_epoch
    assert ckpt["metric"] == max(h["val_metric"] for h in result.history)
    assert (tmp_path / "training_curve.png").stat().st_size > 1000
    model, _ = load_checkpoint(result.best_path)
    assert not model.training


def test_deep_supervision_learns_where_and_is_not_exported(tmp_path, data: Sets):
    """aux_mask_weight: the aux map learns the square's cells; the exported forward is the classifier's."""
    from torch.nn import functional as F

    from training.dataset import attach_masks

    train_set, val_set = data
    where = {r.path: np.zeros((SIZE, SIZE), np.float32) for r in train_set.records}
    for r, b in zip(train_set.records, train_set.boxes, strict=True):
        for x0, y0, x1, y1 in b.astype(int):
            where[r.path][y0:y1, x0:x1] = 1
    spec = type("Spec", (), {"height": SIZE, "width": SIZE, "keep_aspect": True})()
    attach_masks(train_set, spec, lambda record: where[record.path])
    try:
        assert train_set.masks is not None and train_set.masks.sum() == 36 * int(train_set.labels.sum())
        result = train(config(aux_mask_weight=1.0, epochs=8), train_set, val_set, tmp_path, progress=False)
    finally:
        train_set.masks = None
    model, ckpt = load_checkpoint(result.best_path)
    assert isinstance(model, ResNetClassifier)
    assert ckpt["config"]["aux_mask_weight"] == 1.0 and model.aux is not None
    x = torch.from_numpy(train_set.images[:32])
    with torch.no_grad():
        _, cells = model.logits_and_map(x)
        assert cells is not None
        target = F.adaptive_max_pool2d(torch.from_numpy(where_stack(train_set, where)[:32]), cells.shape[-2:])
    predicted = torch.sigmoid(cells) > 0.5
    assert (predicted == (target > 0)).float().mean() > 0.9
    assert result.best_metric > 0.8
    import onnx

    from training.export import export_onnx

    export_onnx(model, tmp_path / "model.onnx", SIZE, SIZE)  # forward(): the aux head is not in the graph
    names = [t.name for t in onnx.load(str(tmp_path / "model.onnx")).graph.initializer]
    assert names and not [n for n in names if "aux" in n]


def where_stack(data: PreprocessedSet, where: dict) -> np.ndarray:
    return np.stack([where[r.path][None] for r in data.records]).astype(np.float32)


def test_detector_loss_falls(tmp_path, data: Sets):
    result = train(config(task="detection", epochs=5), *data, tmp_path, progress=False)
    losses = [h["train_loss"] for h in result.history]
    assert losses[-1] < 0.7 * losses[0]


def test_early_stopping_stops_and_keeps_the_best_epoch(tmp_path, data: Sets, monkeypatch):
    metrics = iter([0.5, 0.7, 0.6, 0.65, 0.6, 0.9, 0.9])
    monkeypatch.setattr(train_module, "validation_metric", lambda *a, **k: next(metrics))
    result = train(config(epochs=7, patience=3, lr=1e-3), *data, tmp_path, progress=False)
    assert result.stopped_early
    assert result.epochs_run == 5  # best at epoch 2, then 3 epochs without improvement
    assert result.best_epoch == 2
    best = torch.load(result.best_path, weights_only=False)
    last = torch.load(result.last_path, weights_only=False)
    assert best["epoch"] == 2 and best["metric"] == 0.7
    assert not torch.equal(best["model"]["head.weight"], last["model"]["head.weight"])


def test_resume_continues_to_the_same_weights(tmp_path, data: Sets):
    straight = train(config(epochs=4), *data, tmp_path / "a", progress=False)
    interrupted = train(config(epochs=4, time_limit_s=0.0), *data, tmp_path / "b", progress=False)
    assert interrupted.epochs_run == 1  # stands in for a run killed after epoch 1
    resumed = train(config(epochs=4), *data, tmp_path / "b", resume=True, progress=False)
    assert [h["epoch"] for h in resumed.history] == [1, 2, 3, 4]
    a = torch.load(straight.last_path, weights_only=False)["model"]
    b = torch.load(resumed.last_path, weights_only=False)["model"]
    for key in a:
        assert torch.allclose(a[key].float(), b[key].float(), atol=1e-6), key


def test_freeze_backbone_trains_the_head_only(tmp_path, data: Sets):
    first = train(config(epochs=2), *data, tmp_path / "src", progress=False)
    tuned = train(
        config(epochs=2, init_from=str(first.best_path), freeze="backbone", lr=1e-2),
        *data,
        tmp_path / "ft",
        progress=False,
    )
    src = torch.load(first.best_path, weights_only=False)["model"]
    out = torch.load(tuned.last_path, weights_only=False)["model"]
    backbone = [k for k in src if k.startswith("backbone.")]
    assert backbone
    for key in backbone:  # weights and batch-norm statistics alike
        assert torch.equal(src[key], out[key]), key
    assert not torch.equal(src["head.weight"], out["head.weight"])


def test_centernet_targets_peak_at_the_centre_cell():
    heat, size, mask = centernet_targets(np.array([[8, 4, 16, 12]]), 32, 32, 4)
    assert heat.shape == (1, 8, 8)
    assert heat[0, 2, 3] == 1.0  # centre (12, 8) → cell (x=3, y=2)
    assert mask.sum() == 1 and tuple(size[:, 2, 3]) == (8.0, 8.0)


def test_dataset_augments_only_when_asked(data: Sets):
    calls = []

    def augment(image, boxes, rng):
        calls.append(rng.integers(1000))
        return image[:, ::-1, :].copy(), boxes

    ds = ImageDataset(data[0], augment=augment, seed=3)
    first = ds[1]["image"]
    assert torch.equal(first, torch.from_numpy(data[0].images[1][:, ::-1, :].copy()))
    ds[1]
    assert calls[0] == calls[1]  # same (seed, epoch, index) → same draw
    ds.set_epoch(1)
    ds[1]
    assert calls[2] != calls[0] or len(calls) == 3
    assert torch.equal(ImageDataset(data[0])[1]["image"], torch.from_numpy(data[0].images[1]))


def test_series_window_selects_on_the_series_auc():
    """Two series of four slices: slice AUC favours one ranking, the series score (max of a moving average)
    the other; with ``series_window`` the metric is the series AUC the card reports."""
    records, labels, probs = [], [], []
    layout = {"pos": ([0, 0, 1, 0], [0.1, 0.1, 0.6, 0.1]), "neg": ([0, 0, 0, 0], [0.7, 0.7, 0.7, 0.0])}
    for sid, (labs, ps) in layout.items():
        for k, (lab, p) in enumerate(zip(labs, ps, strict=True)):
            records.append(Record(Path(f"{sid}{k}.dcm"), sid, "st", sid, f"{sid}{k}", {"finding": lab}, (),
                                  slice_index=k))  # fmt: skip
            labels.append(lab)
            probs.append(p)
    data = PreprocessedSet(records, np.zeros((8, 1, 4, 4), np.float32), np.array(labels, np.float32),
                           [np.zeros((0, 4), np.float32)] * 8)  # fmt: skip
    outputs = {"probability": np.array(probs, np.float32)[:, None]}
    slice_auc = train_module.validation_metric("classification", outputs, data, 0.05)
    series_auc = train_module.validation_metric("classification", outputs, data, 0.05, series_window=3)
    assert slice_auc == pytest.approx(4 / 7)  # the positive slice outranks the three 0.1s and the 0.0
    assert series_auc == 0.0  # 0.7 (negative series) > 0.27 (positive series)


def test_mixed_precision_trains_and_checkpoints_in_float32(tmp_path, data: Sets):
    """Autocast to bfloat16 where the CPU has it natively: the loss falls as in float32, the checkpoint holds
    float32 weights (what ONNX export and the parity check expect), and ``amp=False`` means float32."""
    assert train_module.autocast_dtype(torch.device("cpu"), amp=False) is None
    result = train(config(amp=True), *data, tmp_path, progress=False)
    losses = [h["train_loss"] for h in result.history]
    assert losses[-1] < 0.7 * losses[0]
    assert result.best_metric > 0.8
    state = torch.load(result.best_path, weights_only=True)["model"]
    assert {v.dtype for v in state.values() if v.is_floating_point()} == {torch.float32}
