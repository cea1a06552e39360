"""``python -m training``: synthetic data, training, evaluation, export, and shipping the demo models.

Subcommands (each has its own ``--help``):

- ``synth``    write the synthetic chest radiograph and head CT sets (DICOM + labels.csv)
- ``train``    train one model on a DICOM folder + labels.csv (patient-level split, early stopping)
- ``evaluate`` re-measure an exported model folder (model.onnx + card.json) on a labelled DICOM folder
- ``export``   export a checkpoint to ONNX (parity-checked), evaluate it, write card.json/card.md/plots
- ``ship``     all of it for the shipped models (what ``scripts/retrain-models`` runs): the three classifiers,
               then ``domain``, then the ``ct-hemorrhage-seg`` U-net (:mod:`training.segment_ship`)
- ``domain``   add the embedding output, fit the input-domain gate, run the robustness battery and write
               the drift reference of the shipped models (no retraining)
- ``drift-reference`` only the drift reference (:mod:`training.drift_reference`): the held-out series'
               input and score values the service's drift monitor compares a site with
- ``domain``   add the embedding output, fit the input-domain gate and run the robustness battery of the
               shipped models (no retraining)
- ``explain``  add the class-activation map output ``cam`` to the shipped classifiers from their checkpoints,
               rerun parity for every output, plot t-SNE of the held-out embedding (no retraining;
               :mod:`training.explain`); ``ship`` runs it after ``domain``
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

log = logging.getLogger("training")

DEFAULT_DATA = Path("data/synthetic")
CXR_PATIENTS = 1600
CT_PATIENTS = 1400


def _setup(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def _synth(args: argparse.Namespace) -> dict[str, Path]:
    from training.data.synthetic import generate_ct, generate_cxr

    out: dict[str, Path] = {}
    began = time.monotonic()
    if args.cxr_patients > 0:
        out["cxr"] = generate_cxr(args.out / "cxr", args.cxr_patients, args.seed, workers=args.workers)
        log.info("cxr: %s (%.0f s)", out["cxr"], time.monotonic() - began)
    if args.ct_patients > 0:
        out["ct"] = generate_ct(args.out / "ct", args.ct_patients, args.seed + 1, workers=args.workers)
        log.info("ct: %s (%.0f s)", out["ct"], time.monotonic() - began)
    return out


def _split(folder: Path, labels: Path | None, label: str, seed: int, dataset: str) -> Any:
    from training.data.formats.generic import load_generic
    from training.data.split import check_no_leakage, patient_split
    from training.ship import SPLIT_FRACTIONS

    records = load_generic(folder, labels)
    split = patient_split(records, SPLIT_FRACTIONS[dataset], seed=seed, stratify_label=label)
    check_no_leakage(split)
    return split


def _plan(args: argparse.Namespace) -> Any:
    from dataclasses import replace

    from training.ship import PLANS

    plan = PLANS[args.plan]
    if getattr(args, "size", None):
        plan = replace(plan, spec=plan.spec.model_copy(update={"height": args.size, "width": args.size}))
    return plan


def cmd_synth(args: argparse.Namespace) -> int:
    for kind, path in _synth(args).items():
        print(f"{kind}: {path}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from training.data.augment import Augmenter
    from training.ship import prepare_sets
    from training.train import TrainConfig, train

    plan = _plan(args)
    overrides = {
        k: v
        for k, v in {
            "epochs": args.epochs,
            "batch_size": args.batch_size,
            "lr": args.lr,
            "patience": args.patience,
            "seed": args.seed,
            "init_from": str(args.init_from) if args.init_from else None,
            "freeze": args.freeze,
            "time_limit_s": args.time_limit,
        }.items()
        if v is not None
    }
    config = TrainConfig(
        **{**asdict(plan.config), "height": plan.spec.height, "width": plan.spec.width, **overrides}
    )
    sets = prepare_sets(plan, _split(args.data, args.labels, plan.label, config.seed, plan.dataset))
    augment = Augmenter(**plan.augment) if plan.augment and not args.no_augment else None
    result = train(config, sets["train"], sets["val"], args.out, augment=augment, resume=args.resume)
    print(
        json.dumps(
            {
                "best_checkpoint": str(result.best_path),
                "best_epoch": result.best_epoch,
                "best_validation_metric": result.best_metric,
                "epochs_run": result.epochs_run,
                "stopped_early": result.stopped_early,
                "seconds": round(result.seconds, 1),
            },
            indent=2,
        )
    )
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from training.data.formats.generic import load_generic
    from training.ship import remeasure

    metrics = remeasure(args.model, load_generic(args.data, args.labels), progress=True)
    print(json.dumps(metrics, indent=2, default=str))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from training.ship import export_and_card, prepare_sets

    plan = _plan(args)
    sets = prepare_sets(plan, _split(args.data, args.labels, plan.label, args.seed, plan.dataset))
    curve = args.checkpoint.parent / "training_curve.png"
    info = {"data": f"DICOM folder {args.data}", "exported_from": str(args.checkpoint)}
    card = export_and_card(plan, args.checkpoint, sets, args.out, info, [curve] if curve.exists() else [])
    print(json.dumps(card.metrics, indent=2, default=str))
    return 0


def cmd_ship(args: argparse.Namespace) -> int:
    from training.ship import PLANS, ship_model

    began = time.monotonic()
    if not args.skip_synth:
        _synth(args)
    from training.segment import SEG_PLAN

    names = args.only or [*PLANS, SEG_PLAN.name]
    seg = SEG_PLAN.name in names
    names = [n for n in names if n != SEG_PLAN.name]
    timings: dict[str, float] = {}
    for name in names:
        plan = PLANS[name]
        t0 = time.monotonic()
        folder = args.out / plan.dataset
        split = _split(folder, None, plan.label, 0, plan.dataset)
        patients = {"cxr": args.cxr_patients, "ct": args.ct_patients}[plan.dataset]
        description = (
            f"synthetic {'chest radiographs (CR/DX)' if plan.dataset == 'cxr' else 'head CT series'} from "
            f"training.data.synthetic, {patients} patients, seed {args.seed + (plan.dataset == 'ct')}; "
            "no real patient data"
        )
        overrides: dict[str, Any] = {}
        if args.epochs:
            overrides["epochs"] = args.epochs
        if args.time_limit:
            overrides["time_limit_s"] = args.time_limit
        read_mask = None
        if plan.config.aux_mask_weight > 0:
            from training.segment_ship import synthetic_mask_reader

            read_mask = synthetic_mask_reader(folder)
        ship_model(
            plan, split, args.models_dir, args.work_dir, description, not args.quiet, overrides, read_mask
        )
        timings[name] = round(time.monotonic() - t0, 1)
        log.info("%s done in %.0f s (total %.0f s)", name, timings[name], time.monotonic() - began)
    t0 = time.monotonic()
    if names:
        _domains(args.models_dir, args.work_dir / "domain", names)
    timings["domain"] = round(time.monotonic() - t0, 1)
    t0 = time.monotonic()
    if names:
        _explain(args.models_dir, args.work_dir, args.work_dir / "domain", names)
    timings["explain"] = round(time.monotonic() - t0, 1)
    if seg:
        t0 = time.monotonic()
        _ship_segmentation(args)
        timings[SEG_PLAN.name] = round(time.monotonic() - t0, 1)
    print(json.dumps({"seconds_per_model": timings, "total_seconds": round(time.monotonic() - began, 1)}))
    return 0


def _ship_segmentation(args: argparse.Namespace) -> None:
    """The U-net on the same head CT set and patient split as ct-hemorrhage."""
    from training.segment_ship import ship_segmentation

    folder = args.out / "ct"
    overrides: dict[str, Any] = {}
    if args.epochs:
        overrides["epochs"] = args.epochs
    if args.time_limit:
        overrides["time_limit_s"] = args.time_limit
    description = (
        f"synthetic head CT series from training.data.synthetic, {args.ct_patients} patients, seed "
        f"{args.seed + 1}, the generator's per-pixel masks; no real patient data"
    )
    split = _split(folder, None, "hemorrhage", 0, "ct")
    ship_segmentation(split, folder, args.models_dir, args.work_dir, description, overrides)


def _domains(models_dir: Path, work_dir: Path, names: list[str] | None) -> dict[str, Any]:
    """The input-domain reference, then the robustness battery (which judges with that reference)."""
    from training.domain_data import drift_all, robustness_all, ship_all

    reports = ship_all(models_dir, work_dir, names)
    robustness_all(models_dir, work_dir, names)
    drift_all(models_dir, work_dir, names)
    return reports


def cmd_domain(args: argparse.Namespace) -> int:
    reports = _domains(args.models_dir, args.work_dir, args.only)
    print(json.dumps({name: r.get("held_out") for name, r in reports.items()}))
    return 0


def cmd_drift_reference(args: argparse.Namespace) -> int:
    from training.domain_data import drift_all

    print(json.dumps(drift_all(args.models_dir, args.work_dir, args.only)))
    return 0


def _explain(models_dir: Path, runs_dir: Path, data_dir: Path, names: list[str] | None) -> dict[str, Any]:
    from training.explain import explain_all

    return explain_all(models_dir, runs_dir, data_dir, names)


def cmd_explain(args: argparse.Namespace) -> int:
    reports = _explain(args.models_dir, args.runs_dir, args.data_dir, args.only)
    print(json.dumps({name: r.get("tsne") for name, r in reports.items()}, default=str))
    return 0


def _add_synth_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", type=Path, default=DEFAULT_DATA, help="data folder (default: %(default)s)")
    p.add_argument("--cxr-patients", type=int, default=CXR_PATIENTS, help="default: %(default)s")
    p.add_argument("--ct-patients", type=int, default=CT_PATIENTS, help="default: %(default)s")
    p.add_argument(
        "--seed", type=int, default=0, help="generator seed; CT uses seed+1 (default: %(default)s)"
    )
    p.add_argument("--workers", type=int, default=2, help="generator processes (default: %(default)s)")


def _add_plan_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--plan", choices=["cxr-pneumothorax", "cxr-nodule", "ct-hemorrhage"], required=True,
                   help="which model recipe (label, task, preprocessing, augmentation)")  # fmt: skip
    p.add_argument("--data", type=Path, required=True, help="DICOM folder (generic format)")
    p.add_argument("--labels", type=Path, default=None, help="labels CSV (default: DATA/labels.csv)")
    p.add_argument("--size", type=int, default=None, help="model input size in pixels (square)")


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m training",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Demonstration models only: trained on synthetic images, not for clinical use.",
    )
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads (default: %(default)s)")
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("synth", help="write synthetic CXR and head CT DICOM sets with labels.csv")
    _add_synth_args(p)
    p.set_defaults(func=cmd_synth)

    p = sub.add_parser("train", help="train one model (patient split, early stopping, best checkpoint)")
    _add_plan_args(p)
    p.add_argument("--out", type=Path, required=True, help="run folder: best.pt, last.pt, training_curve.png")
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--patience", type=int, help="early-stopping patience in epochs (default 5)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--time-limit", type=float, help="stop after the epoch that passes this many seconds")
    p.add_argument("--resume", action="store_true", help="continue from OUT/last.pt")
    p.add_argument("--init-from", type=Path, help="checkpoint whose matching weights initialise the model")
    p.add_argument("--freeze", choices=["backbone"], help="train the head only (transfer learning)")
    p.add_argument("--no-augment", action="store_true")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("evaluate", help="re-measure an exported model folder on a labelled DICOM folder")
    p.add_argument("--model", type=Path, required=True, help="folder with model.onnx and card.json")
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--labels", type=Path, default=None)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("export", help="checkpoint → ONNX + parity + test metrics + card.json/card.md")
    _add_plan_args(p)
    p.add_argument("--checkpoint", type=Path, required=True, help="best.pt from `train`")
    p.add_argument("--out", type=Path, required=True, help="model folder, e.g. models/cxr-nodule")
    p.add_argument("--seed", type=int, default=0, help="split seed (must match training)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("ship", help="synth + train + export + evaluate the shipped models (and the U-net)")
    _add_synth_args(p)
    p.add_argument("--models-dir", type=Path, default=Path("models"), help="default: %(default)s")
    p.add_argument(
        "--work-dir", type=Path, default=Path("var/runs"), help="checkpoints (default: %(default)s)"
    )
    p.add_argument(
        "--only", nargs="+", choices=["cxr-pneumothorax", "cxr-nodule", "ct-hemorrhage", "ct-hemorrhage-seg"]
    )
    p.add_argument("--skip-synth", action="store_true", help="reuse the data already in --out")
    p.add_argument("--epochs", type=int, help="override every plan's maximum epochs (smoke runs)")
    p.add_argument("--time-limit", type=float, help="override every plan's training time limit (seconds)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_ship)

    p = sub.add_parser("domain", help="embedding output, input-domain reference, robustness battery")
    p.add_argument("--models-dir", type=Path, default=Path("models"), help="default: %(default)s")
    p.add_argument("--work-dir", type=Path, default=Path("var/domain"), help="data (default: %(default)s)")
    p.add_argument("--only", nargs="+", choices=["cxr-pneumothorax", "cxr-nodule", "ct-hemorrhage"])
    p.set_defaults(func=cmd_domain)

    p = sub.add_parser("drift-reference", help="write the drift monitor's reference into the shipped cards")
    p.add_argument("--models-dir", type=Path, default=Path("models"), help="default: %(default)s")
    p.add_argument("--work-dir", type=Path, default=Path("var/domain"), help="data (default: %(default)s)")
    p.add_argument("--only", nargs="+", choices=["cxr-pneumothorax", "cxr-nodule", "ct-hemorrhage"])
    p.set_defaults(func=cmd_drift_reference)

    p = sub.add_parser("explain", help="heat map output (cam) and t-SNE plot of the shipped classifiers")
    p.add_argument("--models-dir", type=Path, default=Path("models"), help="default: %(default)s")
    p.add_argument(
        "--runs-dir",
        type=Path,
        default=Path("var/runs"),
        help="checkpoints <name>/best.pt (default: %(default)s)",
    )
    p.add_argument(
        "--data-dir", type=Path, default=Path("var/domain"), help="held-out data (default: %(default)s)"
    )
    p.add_argument("--only", nargs="+", choices=["cxr-pneumothorax", "ct-hemorrhage"])
    p.set_defaults(func=cmd_explain)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    _setup(args.threads)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
