"""A draft model card from an ONNX graph (``pacs-triage models init``), and ``card.md`` from any card.

Why: an engineer with a model trained elsewhere should not have to learn the card by trial and error.
Everything the graph says is filled in from it (input name and size, channels, outputs, opset, sha256,
whether the score output ends in a Softmax or Sigmoid); everything it cannot say (what the model finds,
the coded concept, the threshold's origin, which modality and body part) is a ``TODO`` placeholder that
``models check`` and the registry refuse until a person fills it (:mod:`service.inference.cardcheck`).
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from service.errors import DraftError
from service.inference.card import (
    CARD_VERSION,
    Activation,
    AggregationSpec,
    Code,
    DetectionSpec,
    Eligibility,
    InputSpec,
    LabelSpec,
    ModelCard,
    sha256_file,
)
from service.inference.cardcheck import PLACEHOLDER
from service.inference.graph import GraphInfo, TensorInfo
from service.inference.preprocess import PREPROCESS_VERSION, PreprocessSpec

__all__ = ["Task", "card_markdown", "draft_card"]

Task = Literal["classification", "detection", "series_classification"]


def _todo(what: str) -> str:
    return f"{PLACEHOLDER}: {what}"


def _image_input(graph: GraphInfo, size: tuple[int, int] | None) -> tuple[TensorInfo, int, int, int]:
    if len(graph.inputs) != 1:
        names = ", ".join(t.name for t in graph.inputs) or "none"
        raise DraftError(f"the graph has {len(graph.inputs)} inputs ({names}); the service feeds one image")
    tensor = graph.inputs[0]
    if tensor.dtype != "float32":
        raise DraftError(f"input {tensor.name!r} is {tensor.dtype}; the service feeds float32")
    if tensor.shape is None or len(tensor.shape) != 4:
        raise DraftError(f"input {tensor.name!r} must be [batch, channels, height, width] (NCHW)")
    channels = tensor.shape[1] if isinstance(tensor.shape[1], int) else 1
    if channels not in (1, 3):
        raise DraftError(f"input {tensor.name!r} has {channels} channels; the service gives 1 or 3")
    fixed = [d if isinstance(d, int) else None for d in tensor.shape[2:]]
    height, width = size or (fixed[0] or 0, fixed[1] or 0)
    if not height or not width:
        raise DraftError(f"input {tensor.name!r} has no fixed height and width: give --size HEIGHTxWIDTH")
    return tensor, channels, height, width


def _activation(graph: GraphInfo, scores: TensorInfo, width: int | None) -> Activation:
    """Probabilities when the graph ends in Softmax/Sigmoid, else logits: softmax over 2+ classes."""
    if graph.producers.get(scores.name) in ("Softmax", "Sigmoid"):
        return "probabilities"
    return "softmax" if width and width >= 2 else "sigmoid"


def _labels(
    names: list[str], columns: list[int], urgency: Literal["stat", "urgent", "routine"]
) -> list[LabelSpec]:
    return [
        LabelSpec(
            name=name or _todo(f"finding name of output column {column}"),
            index=column,
            code=Code(
                scheme=_todo("coding scheme, e.g. SCT"),
                value=_todo("code value"),
                meaning=_todo("code meaning"),
            ),
            threshold=0.5,
            urgency=urgency,
            threshold_rule=_todo("how the threshold was chosen, e.g. 'sensitivity >= 0.95 on validation'"),
        )
        for name, column in zip(names, columns, strict=True)
    ]


def draft_card(
    onnx_path: Path,
    graph: GraphInfo,
    *,
    name: str,
    task: Task = "classification",
    version: str = "0.1.0",
    size: tuple[int, int] | None = None,
    labels: list[str] | None = None,
    activation: Activation | None = None,
) -> ModelCard:
    """A version 2 card for ``onnx_path`` with ``TODO`` placeholders where the graph cannot tell."""
    tensor, channels, height, width = _image_input(graph, size)
    detection = None
    if task == "detection":
        heat, box = graph.output("heatmap"), graph.output("size")
        if heat is None or box is None or heat.shape is None or len(heat.shape) != 4:
            raise DraftError(
                "task detection needs CenterNet outputs 'heatmap' [N,1,h,w] and 'size' [N,2,h,w]"
            )
        cells = heat.shape[2]
        if not isinstance(cells, int) or height % cells:
            raise DraftError("the heatmap's height must be fixed and divide the input height (the stride)")
        detection = DetectionSpec(stride=height // cells)
        columns, score_output = [0], None
        chosen: Activation = activation or _activation(graph, heat, 1)
    else:
        score = next((t for t in graph.outputs if t.shape is not None and len(t.shape) == 2), None)
        if score is None:
            raise DraftError("no output of shape [N, classes] to read scores from")
        classes = score.shape[1] if score.shape and isinstance(score.shape[1], int) else None
        chosen = activation or _activation(graph, score, classes)
        wanted = len(labels) if labels else None
        softmax = chosen == "softmax" or graph.producers.get(score.name) == "Softmax"
        if softmax and classes == 2 and wanted in (None, 1):
            columns = [1]  # a 2-class softmax: class 0 is "no finding"
        else:
            columns = list(range(wanted or classes or 1))
        score_output = score.name
    names = labels or [""] * len(columns)
    if len(names) != len(columns):
        raise DraftError(f"{len(names)} label name(s) for {len(columns)} score column(s)")
    return ModelCard(
        card_version=CARD_VERSION,
        name=name,
        version=version,
        task=task,
        description=_todo("what the model finds, on which images"),
        intended_use=_todo("who uses it for what; 'demonstration model, not for clinical use' if so"),
        file="model.onnx",
        sha256=sha256_file(onnx_path),
        size_bytes=onnx_path.stat().st_size,
        opset=max(graph.opset or 17, 17),
        input=InputSpec(name=tensor.name, shape=[None, channels, height, width]),
        outputs=[t.name for t in graph.outputs],
        score_output=score_output,
        activation=chosen,
        preprocessing=PreprocessSpec(
            version=PREPROCESS_VERSION, height=height, width=width, channels=channels, window_source="dicom"
        ),
        eligibility=Eligibility(
            modalities=[_todo("DICOM Modality, e.g. CR")],
            body_parts=[_todo("BodyPartExamined, e.g. CHEST")],
        ),
        labels=_labels(names, columns, "routine"),
        detection=detection,
        aggregation=AggregationSpec() if task == "series_classification" else None,
        created=datetime.now(UTC).isoformat(timespec="seconds"),
        training={"source": _todo("where and on what data the model was trained")},
    )


def _table(data: dict[str, Any]) -> list[str]:
    return [f"- **{key}**: {value}" for key, value in data.items()]


def card_markdown(card: ModelCard) -> str:
    """``card.md``: the card for people, from the same data (sections after Mitchell et al. 2019)."""
    spec, elig = card.preprocessing, card.eligibility
    lines = [
        f"# {card.name} {card.version}",
        "",
        card.description,
        "",
        "## Intended use",
        "",
        card.intended_use,
        "",
        "## Model",
        "",
        f"- task: {card.task}; card version {card.card_version}",
        f"- file: `{card.file}`, {card.size_bytes} bytes, sha256 `{card.sha256}`, opset {card.opset}",
        f"- input `{card.input.name}` {card.input.shape}, {card.input.dtype}",
        f"- outputs: {', '.join(f'`{o}`' for o in card.outputs)}; scores from `{card.scores_name}`, "
        f"activation {card.activation}",
        f"- preprocessing v{spec.version}: {spec.height} x {spec.width}, {spec.channels} channel(s), window "
        f"{spec.window_source}, mean {spec.channel_mean or spec.mean}, std {spec.channel_std or spec.std}",
        f"- eligibility: {', '.join(elig.modalities)}; body parts {', '.join(elig.body_parts) or 'any'}; "
        f"at least {elig.min_slices} instance(s)",
        "",
        "## Labels",
        "",
        "| Label | Column | Code | Threshold | Urgency | Threshold rule |",
        "|---|---|---|---|---|---|",
    ]
    for column, label in zip(card.label_columns(), card.labels, strict=True):
        code = f"{label.code.scheme} {label.code.value} {label.code.meaning}"
        rule = label.threshold_rule
        lines.append(f"| {label.name} | {column} | {code} | {label.threshold:g} | {label.urgency} | {rule} |")
    docs = {
        "License": card.license,
        "Authors": ", ".join(card.authors) or None,
        "References": "; ".join(card.references) or None,
        "Limitations": card.limitations,
        "Out-of-scope use": card.out_of_scope_use,
        "Regulatory status": card.regulatory_status,
    }
    lines += ["", "## Documentation", "", *(_table({k: v for k, v in docs.items() if v}) or ["(none given)"])]
    for title, data in (
        ("Metrics", card.metrics),
        ("Subgroup results", card.subgroup_results or {}),
        ("Training", card.training),
    ):
        lines += ["", f"## {title}", "", *(_table(data) or ["(none given)"])]
    return "\n".join(lines) + "\n"
