"""The training loop: AdamW, early stopping on the validation metric, best checkpoint, resume, curves.

What radiology deep-learning guidance asks of a training run, and where it happens here:

- the split is by patient (``training.data.split.patient_split``, done by the caller) so no patient's
  images sit on both sides;
- the model is selected on the **validation** metric (AUC for classifiers, mean FROC sensitivity at
  0.5/1/2/4 FP per image for the detector); training stops after ``patience`` epochs without improvement and
  the **best** checkpoint, not the last, is what gets exported;
- a run is seeded (``torch.manual_seed``, a seeded shuffle per epoch, augmentation seeded per item) and can
  be resumed from ``last.pt`` after an interruption;
- transfer learning: ``init_from`` loads another checkpoint's weights, and ``freeze="backbone"`` trains the
  head only (backbone parameters get no gradient and its batch-norm statistics stay fixed);
- checkpoint selection must not happen at the metric's ceiling (issue 14): when two epochs tie on the
  validation metric (e.g. both at AUC 1.0), the one with the lower validation loss wins, and the card records
  whether the selected metric was at its ceiling;
- a GPU is used when torch sees one (``device="auto"``); checkpoints are always loaded with
  ``weights_only=True`` (plain tensors and containers, no pickled code);
- mixed precision (``amp``): ``torch.autocast`` to bfloat16 on a GPU and on a CPU that computes bfloat16
  natively (oneDNN on AVX512-BF16/AMX), with the weights, optimiser and loss reduction in float32. bfloat16
  keeps float32's exponent range, so no loss scaling is needed (float16 would underflow small gradients
  without a ``GradScaler``). Activations are laid out channels-last, the layout oneDNN's convolutions use
  natively. Measured on the 2-core CI machine (AMX): a training step of the classifier 414 → 120 ms, the
  detector's 455 → 149 ms per batch of 32. The exported ONNX model is float32 either way.

A checkpoint is a dict: ``model`` (state dict), ``config`` (the :class:`TrainConfig` as a dict), ``epoch``,
``metric``, plus ``optimizer``, ``history`` and the early-stopping state so ``--resume`` continues exactly.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader

from service.inference.postprocess import decode_detections
from training.dataset import Augment, ImageDataset, PreprocessedSet
from training.evaluate import froc, roc_auc
from training.held_out import series_units
from training.models.classifier import ResNetClassifier
from training.models.detector import STRIDE, CenterNetDetector

__all__ = [
    "TrainConfig",
    "TrainResult",
    "build_model",
    "centernet_loss",
    "load_checkpoint",
    "pick_device",
    "predict",
    "train",
    "validation_metric",
]

log = logging.getLogger(__name__)

Task = Literal["classification", "detection"]


@dataclass
class TrainConfig:
    """Hyper-parameters of one run; saved in every checkpoint and in the model card."""

    task: Task = "classification"
    label: str = "pneumothorax"
    height: int = 128
    width: int = 128
    widths: tuple[int, ...] = (16, 32, 64, 128)
    blocks_per_stage: int = 1
    epochs: int = 30
    batch_size: int = 32
    lr: float = 2e-3
    weight_decay: float = 1e-4
    patience: int = 5
    seed: int = 0
    init_from: str | None = None
    freeze: Literal["backbone"] | None = None
    time_limit_s: float | None = None
    detection_score_floor: float = 0.05
    device: str = "auto"
    amp: bool = True
    series_window: int = 0
    """Select the checkpoint on the **series** AUC (each series scored as the service scores it: the maximum
    of a ``series_window``-slice moving average, ``held_out.series_units``) instead of the slice AUC; 0: per
    image. Why: a series classifier is judged and served per series, and its slice AUC can rise while the
    series AUC falls (a few loud false slices in negative series)."""
    aux_mask_weight: float = 0.0
    """Weight of the deep-supervision loss on where the finding is (classifier ``aux``); 0 switches it off.
    Used where the training set carries per-pixel masks (the head CT generator's)."""
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        if "widths" in values:
            values["widths"] = tuple(values["widths"])
        return cls(**values)


@dataclass
class TrainResult:
    best_path: Path
    last_path: Path
    best_epoch: int
    best_metric: float
    epochs_run: int
    stopped_early: bool
    seconds: float
    history: list[dict[str, float]]


def build_model(config: TrainConfig) -> nn.Module:
    if config.task == "classification":
        return ResNetClassifier(config.widths, config.blocks_per_stage, aux_mask=config.aux_mask_weight > 0)
    return CenterNetDetector(config.widths, config.blocks_per_stage)


def pick_device(requested: str = "auto") -> torch.device:
    """``auto``: the first CUDA device when torch sees one, else the CPU; otherwise as named."""
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(requested)


def autocast_dtype(device: torch.device, amp: bool) -> torch.dtype | None:
    """The dtype to autocast to on ``device``, or ``None`` for plain float32 (see the module docstring)."""
    if not amp:
        return None
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    if device.type == "cpu" and torch.backends.mkldnn.is_available():  # type: ignore[no-untyped-call]
        return torch.bfloat16 if torch.ops.mkldnn._is_mkldnn_bf16_supported() else None
    return None


def load_checkpoint(path: Path) -> tuple[nn.Module, dict[str, Any]]:
    """The model of a checkpoint (on the CPU, in eval mode) and the checkpoint dict."""
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    model = build_model(TrainConfig.from_dict(ckpt["config"]))
    model.load_state_dict(ckpt["model"])
    model.eval()
    return model, ckpt


def centernet_loss(
    logits: torch.Tensor, size: torch.Tensor, target: dict[str, torch.Tensor], size_weight: float = 0.05
) -> torch.Tensor:
    """CenterNet's penalty-reduced focal loss (alpha 2, beta 4) on the heatmap plus masked L1 on sizes."""
    gt, mask = target["heatmap"], target["mask"]
    pos = gt.eq(1.0).float()
    log_p, log_1mp = F.logsigmoid(logits), F.logsigmoid(-logits)
    p = torch.sigmoid(logits)
    pos_loss = -(log_p * (1 - p) ** 2 * pos).sum()
    neg_loss = -(log_1mp * p**2 * (1 - gt) ** 4 * (1 - pos)).sum()
    n_pos = pos.sum().clamp(min=1.0)
    size_loss = (F.l1_loss(size, target["size"], reduction="none") * mask).sum() / mask.sum().clamp(min=1.0)
    return (pos_loss + neg_loss) / n_pos + size_weight * size_loss


def _raw(model: nn.Module, image: torch.Tensor, task: Task) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The model's outputs before their activation, in float32 (so every loss is reduced in float32 under
    autocast): ``(logit, aux map or None)`` for the classifier, ``(heatmap logits, sizes)`` for the
    detector."""
    if task == "classification":
        assert isinstance(model, ResNetClassifier)
        logit, where = model.logits_and_map(image)
        return logit.float(), None if where is None else where.float()
    assert isinstance(model, CenterNetDetector)
    logits, size = model.raw(image)
    return logits.float(), size.float()


def _loss_of(
    raw: tuple[torch.Tensor, torch.Tensor | None],
    batch: dict[str, torch.Tensor],
    task: Task,
    aux_weight: float = 0.0,
) -> torch.Tensor:
    """BCE on the label (classifier) or CenterNet's loss (detector), from :func:`_raw`'s outputs.

    With ``aux_weight`` and a batch carrying ``where`` (the finding's mask in model pixels), the classifier's
    ``aux`` map adds ``aux_weight`` x BCE against the mask max-pooled to that map: a cell is positive when
    any pixel of it is the finding.
    """
    first, second = raw
    if task == "classification":
        loss = F.binary_cross_entropy_with_logits(first, batch["label"])
        if aux_weight > 0 and second is not None and "where" in batch:
            target = F.adaptive_max_pool2d(batch["where"], second.shape[-2:])
            loss = loss + aux_weight * F.binary_cross_entropy_with_logits(second, target)
        return loss
    assert second is not None
    return centernet_loss(first, second, batch)


def _loss(
    model: nn.Module, batch: dict[str, torch.Tensor], task: Task, aux_weight: float = 0.0
) -> torch.Tensor:
    """The training loss of ``batch`` (see :func:`_loss_of`)."""
    return _loss_of(_raw(model, batch["image"], task), batch, task, aux_weight)


def _autocast(device: torch.device, dtype: torch.dtype | None) -> torch.autocast:
    """Autocast to ``dtype`` on ``device`` (:func:`autocast_dtype`); ``None``: a context that does nothing."""
    return torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None)


@torch.no_grad()
def predict(model: nn.Module, images: np.ndarray, batch_size: int = 64) -> dict[str, np.ndarray]:
    """Model outputs for float32 ``[N, 1, H, W]`` images, named as in the ONNX graph (run on its device)."""
    model.eval()
    device = next(model.parameters()).device
    outs: dict[str, list[np.ndarray]] = {}
    for start in range(0, len(images), batch_size):
        x = torch.from_numpy(np.ascontiguousarray(images[start : start + batch_size])).to(device)
        y = model(x)
        named = {"probability": y} if isinstance(y, torch.Tensor) else {"heatmap": y[0], "size": y[1]}
        for k, v in named.items():
            outs.setdefault(k, []).append(v.float().cpu().numpy())
    return {k: np.concatenate(v) for k, v in outs.items()}


@torch.no_grad()
def _validate(
    model: nn.Module, val_set: ImageDataset, task: Task, device: torch.device, dtype: torch.dtype | None
) -> tuple[float, dict[str, np.ndarray]]:
    """Mean validation loss and the outputs :func:`predict` would give, in one pass over the set.

    Under autocast the outputs are computed in bfloat16: the metric that selects the checkpoint is within
    bfloat16's rounding of float32's; the exported model is evaluated again in float32 by ONNX Runtime.
    """
    model.eval()
    total, count = 0.0, 0
    outs: dict[str, list[np.ndarray]] = {}
    for cpu_batch in DataLoader(val_set, batch_size=64):
        batch = _to_device(cpu_batch, device)
        with _autocast(device, dtype):
            raw = _raw(model, batch["image"], task)
        loss = _loss_of(raw, batch, task)
        first, second = raw
        named = {"probability": torch.sigmoid(first)}
        if task == "detection":
            assert second is not None
            named = {"heatmap": torch.sigmoid(first), "size": second}
        total += float(loss) * len(batch["image"])
        count += len(batch["image"])
        for k, v in named.items():
            outs.setdefault(k, []).append(v.cpu().numpy())
    return total / max(1, count), {k: np.concatenate(v) for k, v in outs.items()}


def _to_device(cpu_batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """A batch on ``device``, the images channels-last (the layout the model's weights are in)."""
    batch = {k: v.to(device, non_blocking=True) for k, v in cpu_batch.items()}
    batch["image"] = batch["image"].contiguous(memory_format=torch.channels_last)
    return batch


def validation_metric(
    task: Task, outputs: dict[str, np.ndarray], data: PreprocessedSet, floor: float, series_window: int = 0
) -> float:
    """AUC (classification; per series with ``series_window``) or mean FROC sensitivity at 0.5/1/2/4 FP per
    image (detection)."""
    if task == "classification":
        labels = data.labels
        ok = labels >= 0
        if len(np.unique(labels[ok])) < 2:
            return float("nan")
        if series_window > 0:  # scored as the card scores a series (training/held_out.py)
            _, series_labels, scores, _ = series_units(data, outputs["probability"][:, 0], series_window)
            return roc_auc(series_labels, scores)
        return roc_auc(labels[ok], outputs["probability"][ok, 0])
    dets = [
        decode_detections(outputs["heatmap"][i], outputs["size"][i], STRIDE, floor) for i in range(len(data))
    ]
    result = froc(dets, [[tuple(b) for b in boxes] for boxes in data.boxes])
    return float(np.mean(list(result.summary().values())))


def _cpu_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict on the CPU, so a checkpoint written on a GPU machine loads anywhere."""
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}


def _freeze_backbone(model: nn.Module) -> None:
    for p in model.backbone.parameters():  # type: ignore[union-attr]
        p.requires_grad_(False)


def _init_from(model: nn.Module, path: str) -> None:
    """Copy every tensor whose name and shape match (a different head shape is simply left as built)."""
    source = torch.load(path, map_location="cpu", weights_only=True)["model"]
    own = model.state_dict()
    matched = {k: v for k, v in source.items() if k in own and own[k].shape == v.shape}
    own.update(matched)
    model.load_state_dict(own)
    log.info("initialised %d/%d tensors from %s", len(matched), len(own), path)


def plot_curves(history: list[dict[str, float]], path: Path, metric_name: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    epochs = [h["epoch"] for h in history]
    fig, ax1 = plt.subplots(figsize=(6, 4), dpi=100)
    ax1.plot(epochs, [h["train_loss"] for h in history], label="train loss", color="tab:blue")
    ax1.plot(epochs, [h["val_loss"] for h in history], label="validation loss", color="tab:orange")
    ax1.set(xlabel="epoch", ylabel="loss")
    ax2 = ax1.twinx()
    ax2.plot(epochs, [h["val_metric"] for h in history], label=f"validation {metric_name}", color="tab:green")
    ax2.set_ylabel(f"validation {metric_name}")
    best = max(history, key=lambda h: h["val_metric"] if not math.isnan(h["val_metric"]) else -1)
    ax2.axvline(best["epoch"], ls=":", color="grey")
    lines = ax1.get_legend_handles_labels()
    lines2 = ax2.get_legend_handles_labels()
    ax1.legend(lines[0] + lines2[0], lines[1] + lines2[1], loc="center right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def train(
    config: TrainConfig,
    train_data: PreprocessedSet,
    val_data: PreprocessedSet,
    out_dir: Path,
    augment: Augment | None = None,
    resume: bool = False,
    progress: bool = True,
) -> TrainResult:
    """Train, keep ``best.pt`` (best validation metric) and ``last.pt``, write ``training_curve.png``."""
    from tqdm import tqdm

    out_dir.mkdir(parents=True, exist_ok=True)
    best_path, last_path = out_dir / "best.pt", out_dir / "last.pt"
    torch.manual_seed(config.seed)
    device = pick_device(config.device)
    dtype = autocast_dtype(device, config.amp)
    model = build_model(config)
    if config.init_from:
        _init_from(model, config.init_from)
    if config.freeze == "backbone":
        _freeze_backbone(model)
    model.to(device).to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, config.epochs))
    history: list[dict[str, float]] = []
    start_epoch, best_metric, best_epoch, bad_epochs, best_loss = 1, -math.inf, 0, 0, math.inf
    if resume and last_path.exists():
        ckpt = torch.load(last_path, map_location=device, weights_only=True)
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        history = ckpt["history"]
        start_epoch = ckpt["epoch"] + 1
        best_metric, best_epoch, bad_epochs = ckpt["best_metric"], ckpt["best_epoch"], ckpt["bad_epochs"]
        best_loss = ckpt.get("best_loss", math.inf)
        log.info("resumed from %s at epoch %d", last_path, start_epoch)

    stride = STRIDE
    train_set = ImageDataset(train_data, config.task, stride, augment, config.seed)
    val_set = ImageDataset(val_data, config.task, stride)
    metric_name = "AUC" if config.task == "classification" else "mean FROC sensitivity"
    began = time.monotonic()
    stopped_early = False
    epoch = start_epoch - 1
    for epoch in range(start_epoch, config.epochs + 1):
        train_set.set_epoch(epoch)
        generator = torch.Generator().manual_seed(config.seed * 1000 + epoch)
        loader = DataLoader(train_set, batch_size=config.batch_size, shuffle=True, generator=generator)
        model.train()
        if config.freeze == "backbone":
            model.backbone.eval()  # type: ignore[union-attr]  # keep its batch-norm statistics fixed
        losses: list[float] = []
        bar = tqdm(loader, desc=f"epoch {epoch}/{config.epochs}", leave=False, disable=not progress)
        for cpu_batch in bar:
            batch = _to_device(cpu_batch, device)
            with _autocast(device, dtype):
                loss = _loss(model, batch, config.task, config.aux_mask_weight)
            optimizer.zero_grad()
            torch.autograd.backward(loss)
            optimizer.step()
            losses.append(loss.item())
            bar.set_postfix(loss=f"{np.mean(losses):.4f}")
        scheduler.step()
        val_loss, outputs = _validate(model, val_set, config.task, device, dtype)
        metric = validation_metric(
            config.task, outputs, val_data, config.detection_score_floor, config.series_window
        )
        entry = {
            "epoch": float(epoch),
            "train_loss": float(np.mean(losses)),
            "val_loss": val_loss,
            "val_metric": metric,
            "seconds": time.monotonic() - began,
        }
        history.append(entry)
        tied = not math.isnan(metric) and abs(metric - best_metric) <= 1e-9 and entry["val_loss"] < best_loss
        improved = not math.isnan(metric) and (metric > best_metric + 1e-9 or tied)
        if improved:
            best_metric, best_epoch, bad_epochs, best_loss = metric, epoch, 0, entry["val_loss"]
            torch.save(
                {
                    "model": _cpu_state(model),
                    "config": asdict(config),
                    "epoch": epoch,
                    "metric": metric,
                    "val_loss": entry["val_loss"],
                },
                best_path,
            )
        else:
            bad_epochs += 1
        torch.save(
            {
                "model": _cpu_state(model),
                "config": asdict(config),
                "epoch": epoch,
                "metric": metric,
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "history": history,
                "best_metric": best_metric,
                "best_epoch": best_epoch,
                "bad_epochs": bad_epochs,
                "best_loss": best_loss,
            },
            last_path,
        )
        log.info(
            "epoch %d: train loss %.4f, val loss %.4f, val %s %.4f%s (%.0f s)",
            epoch, entry["train_loss"], entry["val_loss"], metric_name, metric,
            " *best*" if improved else "", entry["seconds"],
        )  # fmt: skip
        if bad_epochs >= config.patience:
            log.info("early stop: no improvement for %d epochs (best epoch %d)", bad_epochs, best_epoch)
            stopped_early = True
            break
        if config.time_limit_s is not None and time.monotonic() - began > config.time_limit_s:
            log.info("time limit of %.0f s reached after epoch %d", config.time_limit_s, epoch)
            break
    if not best_path.exists():  # every metric was NaN: keep the last weights as the best we have
        torch.save(
            {"model": _cpu_state(model), "config": asdict(config), "epoch": epoch, "metric": float("nan")},
            best_path,
        )
    if history:
        plot_curves(history, out_dir / "training_curve.png", metric_name)
    return TrainResult(
        best_path=best_path,
        last_path=last_path,
        best_epoch=best_epoch,
        best_metric=best_metric,
        epochs_run=len(history),
        stopped_early=stopped_early,
        seconds=time.monotonic() - began,
        history=history,
    )
