"""``pacs-triage models list | check | init``: bring a model of your own, and know it will load.

``list`` shows what the configured models folder would serve and why anything would not. ``check DIR``
runs the registry's own load (:func:`service.inference.registry.load_model`: card schema, file size and
sha256, the card against the graph) on one model folder or a folder of them, prints every problem on its
own line, then opens the model in ONNX Runtime on the CPU and runs a batch of two blank images, checking
the outputs' batch axis and score width; exit 1 on any problem. ``init MODEL.onnx --name NAME`` copies the
graph into ``--out/NAME/`` and writes a draft ``card.json`` and ``card.md``
(:mod:`service.inference.draft`), whose ``TODO`` placeholders ``check`` names until they are filled;
``--monai-bundle DIR`` takes the graph and much of the card from a MONAI bundle
(:mod:`service.inference.monai`).
"""

from __future__ import annotations

import argparse
import logging
import re
import shutil
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from service.inference.registry import LoadedModel

__all__ = ["add_models_parser"]


def _out(text: str) -> None:
    sys.stdout.write(text)  # looked up per call: tests and callers may swap sys.stdout


def _models_dir(args: argparse.Namespace) -> Path:
    if args.models_dir is not None:
        return Path(args.models_dir)
    from service.config import Settings

    return Settings().models_dir


def _list(args: argparse.Namespace) -> int:
    from service.inference.registry import ModelRegistry

    folder = _models_dir(args)
    logging.disable(logging.ERROR)  # each failure is a line below
    try:
        registry = ModelRegistry.from_directory(folder)
    finally:
        logging.disable(logging.NOTSET)
    for name, model in sorted(registry.models.items()):
        card = model.card
        status = f"ok, in shadow of {card.shadow_of}" if card.shadow_of else "ok"
        _out(f"{name}\t{card.version}\t{card.task}\tcard v{card.card_version}\t{status}\n")
    for name, why in sorted(registry.errors.items()):
        _out(f"{name}\t-\t-\t-\tnot loaded: {why}\n")
    _out(f"{len(registry.models)} model(s) would load from {folder}, {len(registry.errors)} would not\n")
    return 0 if registry.models and not registry.errors else 1


def _run_once(model: LoadedModel) -> list[str]:
    """Open the model on the CPU and run two blank images: what the card promises must come out."""
    import numpy as np
    import onnxruntime as ort

    card, spec = model.card, model.card.preprocessing
    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only: a failure is reported below, once
    try:
        session = ort.InferenceSession(str(model.onnx_path), options, providers=["CPUExecutionProvider"])
        images = np.zeros((2, spec.channels, spec.height, spec.width), dtype=np.float32)
        outputs = dict(zip(card.outputs, session.run(card.outputs, {card.input.name: images}), strict=True))
    except Exception as exc:  # ORT raises its own types for graphs it cannot load or run
        return [f"ONNX Runtime cannot run the model on 2 blank images: {exc}"]
    problems = [
        f"output {name!r} has shape {list(value.shape)} for a batch of 2"
        for name, value in outputs.items()
        if value.ndim == 0 or value.shape[0] != 2
    ]
    if card.task != "detection" and not problems:
        width = int(np.prod(outputs[card.scores_name].shape[1:]))
        if max(card.label_columns()) >= width:
            problems.append(f"score output {card.scores_name!r} has {width} column(s) at run time")
    return problems


def _check_one(folder: Path, run: bool) -> bool:
    from service.errors import ModelLoadError
    from service.inference.registry import CARD_FILE, load_model

    try:
        model = load_model(folder / CARD_FILE)
    except ModelLoadError as exc:
        _out(f"{folder}: FAILED\n" + "".join(f"  - {p}\n" for p in exc.problems))
        return False
    problems = _run_once(model) if run else []
    card = model.card
    if problems:
        _out(f"{folder}: FAILED\n" + "".join(f"  - {p}\n" for p in problems))
        return False
    ran = ", ran a batch of 2 on CPU" if run else ""
    _out(
        f"{folder}: ok ({card.name} {card.version}, {card.task}, card v{card.card_version}, "
        f"sha256 {card.sha256[:12]}…{ran})\n"
    )
    for field in card.unknown_fields:
        _out(f"  note: field {field!r} is not in the card schema; kept as is (a typo?)\n")
    return True


def _check(args: argparse.Namespace) -> int:
    from service.inference.registry import CARD_FILE

    folder = Path(args.dir)
    if (folder / CARD_FILE).is_file():
        folders = [folder]
    else:
        folders = sorted(p.parent for p in folder.glob(f"*/{CARD_FILE}"))
        if not folders:
            sys.stderr.write(f"models check: no {CARD_FILE} in {folder} or its sub-folders\n")
            return 1
    logging.disable(logging.ERROR)
    try:
        results = [_check_one(f, run=args.run) for f in folders]
    finally:
        logging.disable(logging.NOTSET)
    return 0 if all(results) else 1


def _size(text: str) -> tuple[int, int]:
    match = re.fullmatch(r"(\d+)x(\d+)", text)
    if not match:
        raise argparse.ArgumentTypeError("expected HEIGHTxWIDTH, e.g. 224x224")
    return int(match[1]), int(match[2])


def _init(args: argparse.Namespace) -> int:
    from service.errors import DraftError, GraphError
    from service.inference.card import NAME_PATTERN
    from service.inference.draft import card_markdown, draft_card
    from service.inference.graph import read_graph
    from service.inference.monai import NOT_EXPRESSED, ONNX_EXPORT, apply_bundle, read_metadata
    from service.inference.registry import CARD_FILE

    bundle = Path(args.monai_bundle) if args.monai_bundle else None
    if args.model is None and bundle is None:
        sys.stderr.write("models init: give MODEL.onnx or --monai-bundle DIR\n")
        return 1
    source = Path(args.model) if args.model else bundle / ONNX_EXPORT  # type: ignore[operator]
    if bundle is not None and not source.is_file():
        sys.stderr.write(
            f"models init: {source} missing: export the bundle to ONNX first "
            "(python -m monai.bundle onnx_export)\n"
        )
        return 1
    folder = Path(args.out) / args.name
    if (folder / CARD_FILE).exists() and not args.force:
        sys.stderr.write(f"models init: {folder / CARD_FILE} exists (--force replaces it)\n")
        return 1
    if not re.fullmatch(NAME_PATTERN, args.name):
        sys.stderr.write("models init: --name must be lower-case letters, digits and '-' (at most 64)\n")
        return 1
    try:
        graph = read_graph(source)
        labels = [n.strip() for n in args.labels.split(",")] if args.labels else None
        card = draft_card(
            source,  # the bytes copied below: same sha256 and size
            graph,
            name=args.name,
            task=args.task,
            version=args.version,
            size=args.size,
            labels=labels,
            activation=args.activation,
        )
        if bundle is not None:
            card = apply_bundle(card, bundle, read_metadata(bundle))
    except (GraphError, DraftError) as exc:
        sys.stderr.write(f"models init: {exc}\n")
        return 1
    folder.mkdir(parents=True, exist_ok=True)  # only now: a refused graph leaves nothing behind
    target = folder / card.file
    if source.resolve() != target.resolve():
        shutil.copyfile(source, target)
    card.write(folder / CARD_FILE)
    (folder / "card.md").write_text(card_markdown(card), encoding="utf-8")
    _out(
        f"wrote {folder / CARD_FILE} and card.md: input {card.input.name} {card.input.shape}, scores from "
        f"{card.scores_name} ({card.activation}); fill the TODO fields, then run "
        f"'pacs-triage models check {folder}'\n"
    )
    if bundle is not None:
        _out(f"from the MONAI bundle {bundle}: metadata.json read; not carried over: {NOT_EXPRESSED}\n")
    return 0


def _fraction(text: str) -> float:
    value = float(text)
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError("must be between 0 and 1 (exclusive)")
    return value


def _calibrate(args: argparse.Namespace) -> int:
    """Pick a site threshold for ``args.sensitivity`` (service/lifecycle/calibrate.py) and write it to the
    site-thresholds file (service/lifecycle/site_thresholds.py); the card is never edited."""
    import hashlib
    from datetime import UTC, datetime

    from service.config import Settings
    from service.errors import LabelsError
    from service.inference.registry import ModelRegistry
    from service.lifecycle.calibrate import calibrate, read_labels, study_scores
    from service.lifecycle.site_thresholds import write_site_threshold
    from service.store.database import Database

    settings = Settings()
    folder = Path(args.models_dir) if args.models_dir else settings.models_dir
    registry = ModelRegistry.from_directory(folder)
    loaded = registry.models.get(args.name)
    if loaded is None:
        why = registry.errors.get(args.name, "no such model")
        _out(f"model {args.name} is not loaded from {folder}: {why}\n")
        return 1
    labels = [lab.name for lab in loaded.card.labels]
    label = args.label or labels[0]
    if label not in labels or (args.label is None and len(labels) > 1):
        _out(f"name one label of {args.name} with --label: {', '.join(labels)}\n")
        return 2
    try:
        truth = read_labels(Path(args.labels), label)
    except LabelsError as exc:
        _out(f"{exc}\n")
        return 2
    url = settings.database_url
    if url.startswith("sqlite:///") and not Path(url.removeprefix("sqlite:///")).is_file():
        _out(f"no database at {url}: calibration reads the results the service stored\n")
        return 1
    db = Database(url)
    try:
        scores = db.read_blocking(study_scores, args.name, loaded.card.sha256, label, truth)
    finally:
        db.close()
    pos = [scores[uid] for uid, positive in truth.items() if positive and uid in scores]
    neg = [scores[uid] for uid, positive in truth.items() if not positive and uid in scores]
    missing = len(truth) - len(pos) - len(neg)
    _out(
        f"{len(truth)} labelled studies: {len(pos)} positive and {len(neg)} negative with a stored result of "
    )
    _out(f"{args.name} (sha256 {loaded.card.sha256[:12]}…); {missing} without one, not counted\n")
    if len(pos) < args.min_positives:
        _out(f"refused: {len(pos)} positive studies, fewer than --min-positives {args.min_positives}\n")
        return 1
    c = calibrate(pos, neg, args.sensitivity, confidence=args.confidence, replicates=args.replicates)
    card_threshold = next(lab.threshold for lab in loaded.card.labels if lab.name == label)
    pct = f"{c.confidence:.0%}"
    _out(f"threshold {c.threshold:.4f} (card: {card_threshold:.4f}) ")
    _out(f"for sensitivity >= {c.target_sensitivity}\n")
    _out(f"  threshold {pct} CI {c.threshold_ci[0]:.4f} - {c.threshold_ci[1]:.4f} ")
    _out(f"(percentile bootstrap, {c.bootstrap_replicates} replicates of the positive studies)\n")
    lo, hi = c.sensitivity_ci
    _out(f"  sensitivity {c.sensitivity:.3f}, {pct} CI {lo:.3f} - {hi:.3f} (Wilson)\n")
    if c.specificity is not None and c.specificity_ci is not None:
        lo, hi = c.specificity_ci
        _out(f"  specificity {c.specificity:.3f}, {pct} CI {lo:.3f} - {hi:.3f} (Wilson)\n")
    now = datetime.now(UTC)
    entry = {
        "threshold": c.threshold,  # not rounded: rounding up would drop the lowest positive counted
        "rule": f"site calibration: sensitivity >= {c.target_sensitivity} on {c.positives} positive "
        f"studies ({now.date().isoformat()})",
        "card_threshold": card_threshold,
        "target_sensitivity": c.target_sensitivity,
        "positives": c.positives,
        "negatives": c.negatives,
        "sensitivity": round(c.sensitivity, 4),
        "sensitivity_ci_wilson": [round(v, 4) for v in c.sensitivity_ci],
        "specificity": None if c.specificity is None else round(c.specificity, 4),
        "specificity_ci_wilson": None
        if c.specificity_ci is None
        else [round(v, 4) for v in c.specificity_ci],
        "threshold_ci_bootstrap": list(c.threshold_ci),
        "confidence": c.confidence,
        "labels_csv_sha256": hashlib.sha256(Path(args.labels).read_bytes()).hexdigest(),
        "calibrated_at": now.isoformat(timespec="seconds"),
    }
    if args.dry_run:
        _out("--dry-run: nothing written\n")
        return 0
    path = Path(args.out) if args.out else settings.site_thresholds_path
    write_site_threshold(path, args.name, loaded.card.sha256, label, entry)
    _out(f"written to {path}; the service applies it at its next start (the card is not edited)\n")
    return 0


def add_models_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """The ``models`` command and its sub-commands, on the main parser's sub-parsers."""
    models = sub.add_parser(
        "models",
        help="models: list, check a model folder, draft a card for an ONNX file, calibrate a threshold",
    )
    cmd = models.add_subparsers(dest="models_command", required=True)
    lst = cmd.add_parser("list", help="what the models folder would serve, and why not for the others")
    lst.add_argument("--models-dir", help="default: the inference.models_dir setting")
    lst.set_defaults(func=_list)
    chk = cmd.add_parser(
        "check",
        help="check a model folder (or a folder of them): card, sha256, card against graph, a test run",
        description="Exits 1 and names every problem if any model would be refused at load.",
    )
    chk.add_argument("dir", metavar="DIR", help="a model folder with card.json, or a folder of them")
    chk.add_argument(
        "--run",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also run 2 blank images through ONNX Runtime on the CPU (default: yes)",
    )
    chk.set_defaults(func=_check)
    ini = cmd.add_parser("init", help="draft card.json and card.md for an ONNX model trained elsewhere")
    ini.add_argument("model", metavar="MODEL.onnx", nargs="?", help="default with --monai-bundle: its export")
    ini.add_argument(
        "--monai-bundle",
        metavar="DIR",
        help="a MONAI bundle: configs/metadata.json fills version, description, authors, license, labels; "
        "models/model.onnx is the graph (its pre-processing transforms are not carried over)",
    )
    ini.add_argument("--name", required=True, help="model name and folder name (lower case, digits, -)")
    ini.add_argument("--out", default="models", help="the models folder; writes OUT/NAME/ (default: models)")
    ini.add_argument(
        "--task", choices=("classification", "series_classification", "detection"), default="classification"
    )
    ini.add_argument("--version", default="0.1.0", help="the model's version (default: 0.1.0)")
    ini.add_argument("--labels", help="comma-separated finding names, one per score column used")
    ini.add_argument(
        "--activation",
        choices=("probabilities", "sigmoid", "softmax"),
        help="what the score output holds (default: guessed from the graph's last operator)",
    )
    ini.add_argument("--size", type=_size, help="HEIGHTxWIDTH when the graph's input size is not fixed")
    ini.add_argument("--force", action="store_true", help="replace an existing card.json")
    ini.set_defaults(func=_init)
    cal = cmd.add_parser(
        "calibrate",
        help="pick a site threshold for a target sensitivity on the site's own labelled, stored studies",
        description="Reads CSV rows study_uid,positive[,label]; the score of each study is its newest stored "
        "result from the installed model file. Writes the site-thresholds file, never the card.",
    )
    cal.add_argument("name", metavar="NAME", help="the model")
    cal.add_argument(
        "--labels", required=True, metavar="CSV", help="study_uid,positive[,label] with a header"
    )
    cal.add_argument("--label", help="the label to calibrate (needed when the model has several)")
    cal.add_argument("--sensitivity", type=_fraction, default=0.95, help="target sensitivity (default 0.95)")
    cal.add_argument("--confidence", type=_fraction, default=0.95, help="interval level (default 0.95)")
    cal.add_argument("--replicates", type=int, default=2000, help="bootstrap replicates (default 2000)")
    cal.add_argument("--min-positives", type=int, default=10, help="refuse with fewer positives (default 10)")
    cal.add_argument("--models-dir", help="default: the models_dir setting")
    cal.add_argument("--out", help="default: the site_thresholds setting (<data_dir>/site-thresholds.yaml)")
    cal.add_argument("--dry-run", action="store_true", help="report only; write nothing")
    cal.set_defaults(func=_calibrate)
