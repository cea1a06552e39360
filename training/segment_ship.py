"""``ct-hemorrhage-seg`` from records to ``models/ct-hemorrhage-seg/``: split → train → export → card.

Called by ``python -m training ship`` (and so ``scripts/retrain-models``) after the three classifiers, on
the same synthetic head CT set and the same patient split as ``ct-hemorrhage``. Budget: about 10 min of the
60 on 2 CPU cores (128 px input, ~0.12 M parameters, balanced epochs, an 8-minute training limit).
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import replace
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from service.inference.card import ModelCard, SegmentationSpec
from training.data.records import Record
from training.data.synthetic import GENERATOR_VERSIONS
from training.export import MAP_PARITY_TOLERANCE, build_card, export_fresh, ort_session
from training.segment import SEG_PLAN, SegPlan, load_unet, prepare_masks, train_unet
from training.segment_eval import score_series, seg_metrics, write_seg_card_md

__all__ = ["ship_segmentation", "synthetic_mask_reader"]

log = logging.getLogger(__name__)

MAX_BYTES = 25 * 1024 * 1024
"""Issue 16: the shipped segmentation model stays under 25 MB."""


def synthetic_mask_reader(root: Path) -> Any:
    """``record → mask`` for the generator's per-series ``hemorrhage_mask.npz`` (each file read once)."""

    @lru_cache(maxsize=8)
    def volume(relpath: str) -> np.ndarray:
        with np.load(root / relpath) as data:
            mask: np.ndarray = np.asarray(data["mask"])
            return mask

    def read(record: Record) -> np.ndarray:
        mask_slice: np.ndarray = volume(str(record.extra["info_mask"]))[int(record.extra["info_slice"])]
        return mask_slice

    return read


def _plot(history: list[dict[str, float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3))
    epochs = [h["epoch"] for h in history]
    ax.plot(epochs, [h["train_loss"] for h in history], label="train loss (BCE + soft Dice)")
    ax.plot(epochs, [h["val_dice"] for h in history], label="validation Dice")
    ax.set_xlabel("epoch")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def ship_segmentation(
    split: Any,
    root: Path,
    models_dir: Path,
    work_dir: Path,
    data_description: str,
    overrides: dict[str, Any] | None = None,
    plan: SegPlan = SEG_PLAN,
) -> ModelCard:
    """Train, export (parity-checked), evaluate the ONNX model and write ``models_dir/<name>/``."""
    began = time.monotonic()
    config = replace(plan.config, **(overrides or {}))
    read_mask = synthetic_mask_reader(root)
    sets = {p: prepare_masks(getattr(split, p), plan.spec, read_mask) for p in ("train", "val")}
    run_dir = work_dir / plan.name
    if run_dir.exists():
        shutil.rmtree(run_dir)
    run = train_unet(config, sets["train"], sets["val"], run_dir)
    _plot(run["history"], run_dir / "training_curve.png")
    model, ckpt = load_unet(Path(run["best_checkpoint"]))
    out = models_dir / plan.name
    fresh = export_fresh(model, out, plan.spec, sets["val"].images, MAP_PARITY_TOLERANCE)
    onnx_path, outputs, parity = fresh.onnx_path, fresh.outputs, fresh.parity
    if onnx_path.stat().st_size > MAX_BYTES:
        raise RuntimeError(f"{plan.name} is {onnx_path.stat().st_size} bytes, over {MAX_BYTES}")
    session = ort_session(onnx_path)
    val_scores = score_series(session, plan.spec, split.val, read_mask)
    mean_dice = {t: float(np.mean([s.dice for s in v if s.true_ml > 0])) for t, v in val_scores.items()}
    threshold = max(mean_dice, key=lambda t: (mean_dice[t], -abs(t - 0.5)))  # ties: nearer 0.5
    test_scores = score_series(session, plan.spec, split.test, read_mask, (threshold,))[threshold]
    metrics = seg_metrics(test_scores, threshold, mean_dice[threshold])
    info = {
        "data": data_description,
        "generator_version": GENERATOR_VERSIONS["ct"],
        "split_rule": "by patient (patient_split), the ct-hemorrhage split (same fractions and seed)",
        "split": {p: {"slices": len(getattr(split, p))} for p in ("train", "val", "test")},
        "sampling": "every positive training slice plus as many random negatives per epoch; left-right flips",
        "loss": "BCE + soft Dice",
        "config": ckpt["config"],
        **{k: v for k, v in run.items() if k != "best_checkpoint"},
        "validation_dice_by_threshold": {str(t): round(v, 4) for t, v in mean_dice.items()},
        "hardware": f"{run['device']}, torch threads as set by `python -m training --threads`",
        "seconds": round(time.monotonic() - began, 1),
    }
    card = build_card(
        name=plan.name,
        version="1.0.0",
        task="segmentation",
        description=plan.description,
        onnx_path=onnx_path,
        spec=plan.spec,
        outputs=outputs,
        label=plan.label,
        threshold=threshold,
        urgency="stat",
        threshold_rule="pixel threshold with the best mean series Dice on validation",
        eligibility=plan.eligibility,
        metrics=metrics,
        parity=parity,
        training=json.loads(json.dumps(info, default=str)),
    )
    card = card.model_copy(update={"segmentation": SegmentationSpec(output=outputs[0], after=plan.after)})
    card = ModelCard.model_validate(card.model_dump())
    card.write(out / "card.json")
    write_seg_card_md(card, out, [run_dir / "training_curve.png"])
    log.info("%s shipped in %.0f s: %s", plan.name, time.monotonic() - began, json.dumps(metrics["dice"]))
    return card
