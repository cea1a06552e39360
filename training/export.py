"""ONNX export, torch-vs-ONNX Runtime parity, and the model card (``card.json`` for the service, ``card.md``
for people).

The exported graph has one input ``image`` ``[batch, 1, H, W]`` (dynamic batch) and the outputs the service
expects: ``probability`` for classifiers, ``heatmap`` and ``size`` for the CenterNet detector. Export is
checked, not trusted: the same 32 test inputs go through torch and ONNX Runtime and the largest absolute
difference must be ≤ 1e-4, or export fails (:class:`ParityError`). The card is built with the service's own
``ModelCard`` schema, so a card the registry cannot read cannot be written.
"""

from __future__ import annotations

import datetime as dt
import logging
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from service.inference.card import (
    DEMONSTRATION_NOTICE,
    AggregationSpec,
    Code,
    DetectionSpec,
    Eligibility,
    InputSpec,
    LabelSpec,
    ModelCard,
    sha256_file,
)
from service.inference.preprocess import PreprocessSpec

__all__ = [
    "CODES",
    "OPSET",
    "MAP_PARITY_TOLERANCE",
    "PARITY_TOLERANCE",
    "ParityError",
    "FreshExport",
    "build_card",
    "check_parity",
    "export_fresh",
    "export_onnx",
    "parity_report",
    "ort_predict",
    "ort_session",
    "write_card_md",
]

log = logging.getLogger(__name__)

OPSET = 18
PARITY_TOLERANCE = 1e-4
MAP_PARITY_TOLERANCE = 5e-4
"""For a model whose output is a per-pixel map (the U-net): the check takes the largest difference over 32
x 256 x 256 probabilities instead of 32, and float32 rounding in a deep network's two runtimes reached
1.04e-4 there (session 14; 7.3e-5 on the previous U-net) where the classifiers stay near 1e-7. An export
bug (a wrong operator, a transposed layout) differs by 1e-2 or more."""
PARITY_INPUTS = 32

CODES: dict[str, Code] = {
    "pneumothorax": Code(scheme="SCT", value="36118008", meaning="Pneumothorax"),
    "nodule": Code(scheme="SCT", value="786838002", meaning="Pulmonary nodule"),
    "hemorrhage": Code(scheme="SCT", value="1386000", meaning="Intracranial hemorrhage"),
}
"""SNOMED CT concepts of the shipped labels (scheme designator ``SCT`` as in DICOM PS3.16)."""


class ParityError(RuntimeError):
    """ONNX Runtime disagrees with torch by more than the tolerance: the export is not trustworthy."""


def output_names(model: nn.Module) -> list[str]:
    from training.models.detector import CenterNetDetector

    return ["heatmap", "size"] if isinstance(model, CenterNetDetector) else ["probability"]


def export_onnx(model: nn.Module, path: Path, height: int, width: int) -> list[str]:
    """Write ``model`` as ONNX (opset :data:`OPSET`, dynamic batch, one self-contained file)."""
    model.eval()
    names = output_names(model)
    dummy = torch.zeros(2, 1, height, width)
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        # torch.export's pytree emits this FutureWarning from copyreg (outside torch's own modules).
        warnings.filterwarnings("ignore", message=r".*LeafSpec.*", category=FutureWarning)
        torch.onnx.export(
            model,
            (dummy,),
            str(path),
            input_names=["image"],
            output_names=names,
            opset_version=OPSET,
            dynamic_shapes=({0: torch.export.Dim("batch")},),
            dynamo=True,
            external_data=False,
            verbose=False,
        )
    return names


def ort_session(path: Path) -> Any:
    """A CPU ONNX Runtime session (the served numbers are CPU numbers; CUDA would only add noise here)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def ort_predict(session: Any, images: np.ndarray, batch_size: int = 64) -> dict[str, np.ndarray]:
    """Named ONNX Runtime outputs for float32 ``[N, 1, H, W]`` images."""
    names = [o.name for o in session.get_outputs()]
    parts: dict[str, list[np.ndarray]] = {n: [] for n in names}
    for start in range(0, len(images), batch_size):
        x = np.ascontiguousarray(images[start : start + batch_size], dtype=np.float32)
        for name, value in zip(names, session.run(names, {"image": x}), strict=True):
            parts[name].append(value)
    return {n: np.concatenate(v) for n, v in parts.items()}


@torch.no_grad()
def check_parity(
    model: nn.Module, onnx_path: Path, inputs: np.ndarray, tolerance: float = PARITY_TOLERANCE
) -> dict[str, Any]:
    """Max absolute difference of every output, torch vs ONNX Runtime; raises :class:`ParityError` above
    ``tolerance``."""
    model.eval()
    inputs = np.ascontiguousarray(inputs[:PARITY_INPUTS], dtype=np.float32)
    ort_out = ort_predict(ort_session(onnx_path), inputs, batch_size=8)
    torch_out = model(torch.from_numpy(inputs))
    torch_named = (
        {"probability": torch_out}
        if isinstance(torch_out, torch.Tensor)
        else dict(zip(output_names(model), torch_out, strict=True))
    )
    diffs = {k: float(np.max(np.abs(ort_out[k] - v.numpy()))) for k, v in torch_named.items()}
    return parity_report(diffs, len(inputs), tolerance)


def parity_report(
    diffs: dict[str, float], n_inputs: int, tolerance: float = PARITY_TOLERANCE
) -> dict[str, Any]:
    """The card's parity record of per-output max differences; raises :class:`ParityError` above
    ``tolerance`` (one rule for the export's check and the heat-map graph's, training/explain.py)."""
    worst = max(diffs.values())
    if worst > tolerance:
        raise ParityError(f"torch vs ONNX Runtime max abs diff {worst:.3g} > {tolerance} ({diffs})")
    return {
        "n_inputs": n_inputs,
        "max_abs_diff": worst,
        "per_output": diffs,
        "tolerance": tolerance,
        "runtime": "onnxruntime CPUExecutionProvider",
        "passed": True,
    }


@dataclass(frozen=True)
class FreshExport:
    """What :func:`export_fresh` wrote: the graph, its output names and the torch-vs-ORT parity report."""

    onnx_path: Path
    outputs: list[str]
    parity: dict[str, Any]


def export_fresh(
    model: nn.Module,
    out: Path,
    spec: PreprocessSpec,
    parity_inputs: np.ndarray,
    tolerance: float = PARITY_TOLERANCE,
) -> FreshExport:
    """Empty ``out`` (a model folder being shipped), export ``model`` to ``out/model.onnx`` and check parity.

    Why empty it: a folder that is shipped again must not keep a plot or card.md of the previous model
    beside the new graph. Raises :class:`ParityError` when ONNX Runtime disagrees with torch.
    """
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    onnx_path = out / "model.onnx"
    outputs = export_onnx(model, onnx_path, spec.height, spec.width)
    return FreshExport(onnx_path, outputs, check_parity(model, onnx_path, parity_inputs, tolerance))


def build_card(
    *,
    name: str,
    version: str,
    task: str,
    description: str,
    onnx_path: Path,
    spec: PreprocessSpec,
    outputs: list[str],
    label: str,
    threshold: float,
    urgency: str,
    threshold_rule: str,
    eligibility: Eligibility,
    metrics: dict[str, Any],
    parity: dict[str, Any],
    training: dict[str, Any],
    stride: int | None = None,
    aggregation_window: int | None = None,
) -> ModelCard:
    """A validated :class:`ModelCard` for an exported model (sha256 and size read from the file)."""
    return ModelCard(
        name=name,
        version=version,
        task=task,
        description=description,
        intended_use=DEMONSTRATION_NOTICE,
        file=onnx_path.name,
        sha256=sha256_file(onnx_path),
        size_bytes=onnx_path.stat().st_size,
        opset=OPSET,
        input=InputSpec(shape=[None, 1, spec.height, spec.width]),
        outputs=outputs,
        preprocessing=spec,
        eligibility=eligibility,
        labels=[
            LabelSpec(
                name=label,
                code=CODES[label],
                threshold=float(np.clip(threshold, 0.0, 1.0)),
                urgency=urgency,
                threshold_rule=threshold_rule,
            )
        ],
        detection=DetectionSpec(stride=stride) if stride is not None else None,
        aggregation=AggregationSpec(window=aggregation_window) if aggregation_window is not None else None,
        metrics=metrics,
        parity=parity,
        training=training,
        created=dt.datetime.now(dt.UTC).replace(microsecond=0).isoformat(),
    )


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3f}"
    if isinstance(value, list | tuple) and all(isinstance(v, float) for v in value):
        return "–".join(f"{v:.3f}" for v in value)
    return str(value)


def _flatten(prefix: str, value: Any, rows: list[tuple[str, str]]) -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            _flatten(f"{prefix}.{k}" if prefix else str(k), v, rows)
    else:
        rows.append((prefix, _fmt(value)))


def _pct(value: Any) -> str:
    return "–" if value is None else f"{100 * value:.1f} %"


def _honesty_md(card: ModelCard) -> list[str]:
    """The aim band, the positives against the aim of 200, and the shortcut check, in words (issue 14)."""
    m = card.metrics
    aim, positives, shortcut = m.get("aim"), m.get("positives"), m.get("shortcut")
    lines = []
    if aim:
        lines.append(
            f"- Aim: {aim['metric']} in [{aim['band'][0]}, {aim['band'][1]}]; measured {aim['value']:.3f}: "
            f"**{aim['verdict']} the band**"
            + ("" if aim.get("ci_excludes_ceiling", True) else " (its CI reaches the ceiling)")
        )
    if positives:
        counts = ", ".join(f"{k} {v}" for k, v in positives.items() if k != "aim_per_set")
        counted = ("validation", "test", "validation_images", "test_images")
        short = [k for k, v in positives.items() if k in counted and v < positives["aim_per_set"]]
        lines.append(
            f"- Positives: {counts} (aim: {positives['aim_per_set']} per set"
            + (f"; **not met** for {', '.join(short)}" if short else "; met")
            + ")"
        )
    if shortcut:
        lines.append(
            f"- Shortcut check: {shortcut['feature']} alone reaches AUC {shortcut['auc']:.3f}; "
            f"the model {shortcut['model_auc']:.3f}"
        )
    return ["## Honest summary", "", *lines, ""] if lines else []


def _domain_md(card: ModelCard) -> list[str]:
    """The input-domain gate's section of card.md (empty for a card without one)."""
    if card.domain is None:
        return []
    report = card.domain.report
    lines = [
        "## Validated input domain (the gate in front of the findings)",
        "",
        f"{report.get('method', '')}. Judged per {card.domain.unit}; one outside gets "
        '"not analysed: outside the model\'s validated input domain (score S > threshold T)" and no finding.',
        "",
        "| score | dimensions | threshold |",
        "|---|---|---|",
        *[f"| {s.name} | {s.dim} | {s.threshold:.3g} |" for s in card.domain.scores],
        "",
        "| in-domain set (fresh generator seeds) | n | rejected | positives rejected | negatives rejected |",
        "|---|---|---|---|---|",
    ]
    for part in ("calibration", "held_out"):
        r = report.get(part, {})
        lines.append(
            f"| {part} | {r.get('n')} | {_pct(r.get('rejected'))} | {_pct(r.get('rejected_positive'))} | "
            f"{_pct(r.get('rejected_negative'))} |"
        )
    lines += ["", "| constructed out-of-domain set | n | caught |", "|---|---|---|"]
    for name, r in report.get("out_of_domain_caught", {}).items():
        lines.append(f"| {name} | {r.get('n')} | {_pct(r.get('caught'))} |")
    return [*lines, ""]


def _robustness_md(card: ModelCard) -> list[str]:
    """The robustness battery's section of card.md (empty for a card without one)."""
    if not card.robustness:
        return []
    r = card.robustness
    base = r.get("baseline", {})
    lines = [
        "## Robustness battery (routine processing and acquisition changes)",
        "",
        f"{r.get('data', '')}; per {r.get('unit')}. Rule: {r.get('rule', '')}. Unperturbed: sensitivity "
        f"{_pct(base.get('sensitivity'))}, specificity {_pct(base.get('specificity'))}, gate rejects "
        f"{_pct(base.get('rejected'))}.",
        "",
        "Sensitivity and specificity: on the images the gate analyses both ways, before → after the "
        "perturbation.",
        "",
        "| perturbation | gate rejects | analysed | sensitivity | specificity | verdict |",
        "|---|---|---|---|---|---|",
    ]
    for name, row in r.get("perturbations", {}).items():
        verdict = row.get("verdict")
        before = row.get("unperturbed", {})
        rates = [
            f"{_pct(before.get(key))} → {_pct(row.get(key))}" if row.get(key) is not None else "–"
            for key in ("sensitivity", "specificity")
        ]
        lines.append(
            f"| {name} | {_pct(row.get('rejected'))} | {row.get('n', '–')} | {rates[0]} | {rates[1]} | "
            f"{'**NEITHER**' if verdict == 'neither' else verdict} |"
        )
    neither = [n for n, row in r.get("perturbations", {}).items() if row.get("verdict") == "neither"]
    if neither:
        lines += ["", f"Neither held nor caught (known weaknesses of this model): {'; '.join(neither)}."]
    return [*lines, ""]


def _drift_md(card: ModelCard) -> list[str]:
    """The drift reference's line in card.md (empty for a card without one)."""
    ref = card.drift_reference
    if ref is None:
        return []
    return [
        "## Drift reference",
        "",
        f"The service's drift monitor compares each site's latest series with {ref.series} series of "
        f"{ref.source}, feature by feature (population stability index): {', '.join(sorted(ref.features))}.",
        "",
    ]


def _explanations_md(card: ModelCard) -> list[str]:
    """The heat map and t-SNE section of card.md (empty for a card without them; training/explain.py)."""
    if not card.explanations:
        return []
    cam, tsne = card.explanations.get("cam", {}), card.explanations.get("tsne", {})
    lines = ["## Explanations", ""]
    if card.cam_output:
        lines.append(
            f"- Heat map: output `{card.cam_output}` {cam.get('shape')}: {cam.get('method', '')}. "
            "The service keeps it for positive findings only (the key image), overlaid on the preview."
        )
    if tsne:
        lines.append(
            f"- t-SNE of the held-out embedding ({tsne.get('points')} images, {tsne.get('positives')} "
            f"positive, perplexity {tsne.get('perplexity', 0):.0f}): 5-nearest-neighbour label agreement "
            f"{_pct(tsne.get('knn5_label_agreement_2d'))} in the map, "
            f"{_pct(tsne.get('knn5_label_agreement_embedding'))} in the embedding. "
            f"![t-SNE]({tsne.get('plot')})"
        )
    return [*lines, ""]


def write_card_md(card: ModelCard, folder: Path, plots: list[Path]) -> Path:
    """``card.md``: the card's facts for people, with the plots copied next to it and linked."""
    folder.mkdir(parents=True, exist_ok=True)
    for plot in plots:
        if plot.resolve().parent != folder.resolve():
            shutil.copy2(plot, folder / plot.name)
    label = card.labels[0]
    metric_rows: list[tuple[str, str]] = []
    _flatten("", card.metrics, metric_rows)
    training_rows: list[tuple[str, str]] = []
    _flatten("", card.training, training_rows)
    spec = card.preprocessing
    lines = [
        f"# {card.name} {card.version}",
        "",
        f"**{card.intended_use.capitalize()}.** Trained and tested on synthetic images only.",
        "",
        card.description,
        "",
        "## What it does",
        "",
        f"- Task: {card.task}; input `{card.input.name}` {card.input.shape} float32; outputs "
        + ", ".join(f"`{o}`" for o in card.outputs),
        f'- Finding: {label.name} ({label.code.scheme} {label.code.value} "{label.code.meaning}"), '
        f"urgency **{label.urgency}** when positive",
        f"- Threshold: {label.threshold:.4f} ({label.threshold_rule})",
        f"- Eligible: modalities {card.eligibility.modalities}, body parts {card.eligibility.body_parts}, "
        f"at least {card.eligibility.min_slices} slice(s)",
        f"- Preprocessing: version {spec.version}, {spec.height}x{spec.width}, window {spec.window_source}"
        + (f" {spec.window_center:g}/{spec.window_width:g}" if spec.window_source == "model" else "")
        + f", keep aspect {spec.keep_aspect}, mean {spec.mean:g}, std {spec.std:g}",
        f"- File: `{card.file}`, {card.size_bytes / 1e6:.2f} MB, opset {card.opset}, sha256 `{card.sha256}`",
        f"- Export parity (torch vs ONNX Runtime, {card.parity.get('n_inputs')} test inputs): max abs diff "
        f"{card.parity.get('max_abs_diff', float('nan')):.2e}",
        "",
        *_honesty_md(card),
        "## Held-out test metrics (ONNX Runtime outputs, test set scored once)",
        "",
        "| metric | value |",
        "|---|---|",
        *[f"| {k} | {v} |" for k, v in metric_rows],
        "",
        *_domain_md(card),
        *_robustness_md(card),
        *_drift_md(card),
        *_explanations_md(card),
        "## Training",
        "",
        "| item | value |",
        "|---|---|",
        *[f"| {k} | {v} |" for k, v in training_rows],
        "",
        "## Plots",
        "",
        *[f"![{p.stem}]({p.name})" for p in plots],
        "",
    ]
    path = folder / "card.md"
    path.write_text("\n".join(lines), encoding="utf-8")
    return path
