"""Training plan of ``ct-hemorrhage-seg``: a 2-D U-net on the generator's per-pixel hemorrhage masks.

The life of the model, in order (the same as :mod:`training.ship` for the classifiers):

1. the CT records are split **by patient** (``patient_split``, the classifier's fractions and seed), leakage
   checked; the masks come from the generator's ``hemorrhage_mask.npz`` (or any loader of
   :mod:`training.data.masks`) and are resized into the model input exactly as the pixels are;
2. each epoch sees every positive training slice and as many negative ones, drawn afresh (blood is in ~10 %
   of slices; without the balance the net learns "empty"); loss = BCE + soft Dice (Milletari 2016);
3. **early stopping on validation Dice** (mean over validation series with blood, at the model
   resolution), best checkpoint kept (``torch.load(weights_only=True)`` on reload), GPU when torch sees one;
4. ONNX export with torch-vs-ONNX Runtime parity (:mod:`training.export`), then the exported model is
   scored by :mod:`training.segment_eval` on validation (pixel threshold) and test (the card's numbers).
"""

from __future__ import annotations

import logging
import math
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn import functional as F

from service.inference.card import Eligibility, ModelCard, SegmentationSpec
from service.inference.preprocess import PreprocessSpec, preprocess_dataset, resize_keep_aspect
from training.data.formats.images import read_image_dataset
from training.data.records import Record
from training.models.unet import UNet
from training.train import pick_device

__all__ = ["SEG_PLAN", "MaskSet", "SegConfig", "SegPlan", "load_unet", "prepare_masks", "train_unet"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SegConfig:
    base: int = 8
    levels: int = 3
    epochs: int = 10
    steps_per_epoch: int = 40
    batch_size: int = 24
    crop: int = 64
    lr: float = 3e-3
    patience: int = 4
    seed: int = 0
    time_limit_s: float = 480.0
    device: str = "auto"


@dataclass(frozen=True)
class SegPlan:
    name: str
    label: str
    after: str
    description: str
    spec: PreprocessSpec
    eligibility: Eligibility
    config: SegConfig


SEG_PLAN = SegPlan(
    name="ct-hemorrhage-seg",
    label="hemorrhage",
    after="ct-hemorrhage",
    description=(
        "Head CT slice → per-pixel probability of intracranial hemorrhage (2-D U-net, 3 levels). Run only on "
        "series the ct-hemorrhage classifier flags; the mask at source resolution gives the bleed's volume "
        "(mL) and largest axial diameter (mm), a DICOM SEG and TID 1500 measurements."
    ),
    spec=PreprocessSpec(
        version=2,
        height=128,
        width=128,
        window_source="model",
        window_center=40.0,
        window_width=80.0,
        mean=0.3,
        std=0.3,
    ),  # fmt: skip
    eligibility=Eligibility(modalities=["CT"], body_parts=["HEAD"], min_slices=8),
    config=SegConfig(),
)


@dataclass
class MaskSet:
    """Preprocessed slices and their masks in model pixels, in record order (series slices contiguous)."""

    records: list[Record]
    images: np.ndarray  # float32 [N, 1, H, W]
    masks: np.ndarray  # uint8 [N, 1, H, W]

    def __len__(self) -> int:
        return len(self.records)

    def series(self) -> dict[str, list[int]]:
        """Row indices of each series, in record order."""
        out: dict[str, list[int]] = {}
        for i, record in enumerate(self.records):
            out.setdefault(record.series_uid, []).append(i)
        return out


def prepare_masks(
    records: Sequence[Record], spec: PreprocessSpec, read_mask: Any, reader: Any = read_image_dataset
) -> MaskSet:
    """Preprocess every record's pixels and resize its mask the same way (coverage > 0.5 is blood)."""
    images = np.zeros((len(records), 1, spec.height, spec.width), np.float32)
    masks = np.zeros((len(records), 1, spec.height, spec.width), np.uint8)
    for i, record in enumerate(records):
        pre = preprocess_dataset(reader(record.path), spec)
        images[i] = pre.array[0]
        mask = np.asarray(read_mask(record), np.float32)
        resized, _ = resize_keep_aspect(mask, spec.height, spec.width, spec.keep_aspect)
        masks[i, 0] = resized > 0.5
    return MaskSet(list(records), images, masks)


def _loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """BCE plus soft Dice over the batch (Dice alone is unstable on empty slices, BCE alone favours empty)."""
    bce = F.binary_cross_entropy_with_logits(logits, target)
    prob = torch.sigmoid(logits)
    inter = (prob * target).sum()
    soft_dice = (2 * inter + 1) / (prob.sum() + target.sum() + 1)
    return bce + (1 - soft_dice)


@torch.no_grad()
def _predict(model: UNet, images: np.ndarray, device: torch.device, batch: int = 64) -> np.ndarray:
    model.eval()
    parts = [
        model(torch.from_numpy(images[i : i + batch]).to(device)).float().cpu().numpy()
        for i in range(0, len(images), batch)
    ]
    return np.concatenate(parts) if parts else np.zeros_like(images)


VALIDATION_THRESHOLDS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7)
"""Pixel thresholds tried on validation: early stopping and the shipped threshold both take the best one
(balanced crops leave the net's probabilities low, ~0.3 inside blood after a few epochs, so a fixed 0.5
would read a useful model as Dice 0)."""


def series_dice(data: MaskSet, probabilities: np.ndarray) -> float:
    """Mean Dice over series with blood (model pixels) at the best of :data:`VALIDATION_THRESHOLDS`."""
    best = 0.0
    for threshold in VALIDATION_THRESHOLDS:
        scores = []
        for rows in data.series().values():
            truth = data.masks[rows] > 0
            if truth.any():
                pred = probabilities[rows] >= threshold
                scores.append(2 * np.logical_and(pred, truth).sum() / (pred.sum() + truth.sum()))
        best = max(best, float(np.mean(scores)) if scores else 0.0)
    return best


def _crops(data: MaskSet, rows: np.ndarray, size: int, rng: np.random.Generator) -> tuple[np.ndarray, ...]:
    """``size`` x ``size`` crops: centred near a random blood pixel on positive slices, anywhere otherwise.

    The U-net is fully convolutional, so it trains on crops and runs on the whole slice: a 64 px crop
    costs a quarter of the slice, which is what makes enough optimiser steps fit in the CPU budget.
    """
    height, width = data.images.shape[-2:]
    xs, ys = [], []
    for row in rows:
        blood = np.argwhere(data.masks[row, 0] > 0)
        if len(blood):
            cy, cx = blood[rng.integers(len(blood))] + rng.integers(-size // 4, size // 4 + 1, 2)
        else:
            cy, cx = (
                rng.integers(size // 2, height - size // 2 + 1),
                rng.integers(size // 2, width - size // 2 + 1),
            )
        top = int(np.clip(cy - size // 2, 0, height - size))
        left = int(np.clip(cx - size // 2, 0, width - size))
        xs.append(data.images[row, :, top : top + size, left : left + size])
        ys.append(data.masks[row, :, top : top + size, left : left + size])
    return np.stack(xs), np.stack(ys).astype(np.float32)


def train_unet(config: SegConfig, train_set: MaskSet, val_set: MaskSet, out_dir: Path) -> dict[str, Any]:
    """Train, keep ``best.pt`` (best validation Dice) and ``last.pt``; returns the run's summary.

    An epoch is ``steps_per_epoch`` batches, half positive slices; validation scores the series with blood
    (the early-stopping metric needs no others, and skipping them halves the CPU time per epoch).
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    device = pick_device(config.device)
    model = UNet(config.base, config.levels).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=1e-4)
    positive = np.flatnonzero(train_set.masks.reshape(len(train_set), -1).any(axis=1))
    negative = np.setdiff1d(np.arange(len(train_set)), positive)
    val_rows = [r for r in val_set.series().values() if val_set.masks[r].any()]
    val_blood = MaskSet(
        [val_set.records[i] for rows in val_rows for i in rows],
        val_set.images[sum(val_rows, [])],
        val_set.masks[sum(val_rows, [])],
    )
    best, best_epoch, bad, history = -math.inf, 0, 0, []
    began, stopped_early, epoch = time.monotonic(), False, 0
    half = config.batch_size // 2
    for epoch in range(1, config.epochs + 1):
        model.train()
        losses = []
        for _ in range(config.steps_per_epoch):
            rows = np.concatenate(
                [rng.choice(positive, half), rng.choice(negative, config.batch_size - half)]
            )
            xs, ys = _crops(train_set, rows, config.crop, rng)
            x, y = torch.from_numpy(xs).to(device), torch.from_numpy(ys).to(device)
            if rng.random() < 0.5:  # left-right flip: blood is on either side
                x, y = x.flip(-1), y.flip(-1)
            loss = _loss(model.logits(x), y)
            optimizer.zero_grad()
            torch.autograd.backward(loss)
            optimizer.step()
            losses.append(loss.item())
        metric = series_dice(val_blood, _predict(model, val_blood.images, device))
        history.append({"epoch": epoch, "train_loss": float(np.mean(losses)), "val_dice": metric})
        log.info("seg epoch %d: loss %.4f, validation Dice %.4f", epoch, np.mean(losses), metric)
        state = {
            "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
            "config": asdict(config),
            "epoch": epoch,
            "metric": metric,
        }
        torch.save(state, out_dir / "last.pt")
        if metric > best:
            best, best_epoch, bad = metric, epoch, 0
            shutil.copy2(out_dir / "last.pt", out_dir / "best.pt")
        else:
            bad += 1
        if bad >= config.patience or time.monotonic() - began > config.time_limit_s:
            stopped_early = epoch < config.epochs
            break
    return {
        "best_checkpoint": str(out_dir / "best.pt"),
        "best_epoch": best_epoch,
        "best_validation_dice": best,
        "epochs_run": epoch,
        "stopped_early": stopped_early,
        "train_seconds": round(time.monotonic() - began, 1),
        "device": device.type,
        "history": history,
    }


def load_unet(path: Path) -> tuple[UNet, dict[str, Any]]:
    """The U-net of a checkpoint (CPU, eval mode); ``weights_only=True``: a checkpoint cannot run code."""
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    model = UNet(ckpt["config"]["base"], ckpt["config"]["levels"])
    model.load_state_dict(ckpt["model"])
    model.eval()
    return model, ckpt


def segmentation_spec(plan: SegPlan) -> SegmentationSpec:
    return SegmentationSpec(output="probability", after=plan.after)


def card_is_segmentation(card: ModelCard) -> bool:
    return card.task == "segmentation" and card.segmentation is not None
