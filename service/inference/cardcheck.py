"""A model card checked against its ONNX graph: every contradiction named, before anything runs.

Why: a card that claims 3 channels, or an output the graph does not have, used to load, warm up (with the
card's own shape, which could even succeed) and then fail on every study. The registry runs
:func:`contradictions` when it loads a model, before the engine opens a session and warms it up, so a bad
model is refused with a reason on ``/v1/models`` and in the log while the others serve;
``pacs-triage models check`` prints the same list for an engineer about to ship a model.

What is compared (the card field first, then what the graph declares, :mod:`service.inference.graph`):
the input's name, element type, rank, channels, height and width against ``input.shape`` and
``preprocessing``; a dynamic batch axis (the engine batches images); every listed output; the score
output's width against the labels (``LabelSpec.index``) and the activation; detection maps against the
stride; segmentation maps against the input size; the default-domain opset. A dimension the graph
leaves symbolic agrees with anything.
Placeholders that ``models init`` writes (text starting with ``TODO``) are contradictions too: a draft card
does not serve.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from service.inference.card import ModelCard
from service.inference.graph import Dim, GraphInfo, TensorInfo

__all__ = ["PLACEHOLDER", "contradictions", "placeholders"]

PLACEHOLDER = "TODO"
"""Text that starts a value ``models init`` could not know; ``models check`` refuses it until replaced."""


def _fixed(dim: Dim) -> int | None:
    return dim if isinstance(dim, int) and dim > 0 else None


def _differs(graph_dim: Dim, want: int | None) -> bool:
    fixed = _fixed(graph_dim)
    return fixed is not None and want is not None and fixed != want


def _input(card: ModelCard, graph: GraphInfo) -> Iterator[str]:
    feeds = [t.name for t in graph.inputs]
    tensor = graph.input(card.input.name)
    if tensor is None:
        listed = ", ".join(map(repr, feeds)) or "none"
        yield f"input.name is {card.input.name!r}; the graph's input is {listed}"
        return
    others = [n for n in feeds if n != card.input.name]
    if others:
        yield f"the graph needs more inputs than the image ({', '.join(map(repr, others))}); one is fed"
    if tensor.dtype != card.input.dtype:
        yield f"input.dtype is {card.input.dtype}; the graph's input {tensor.name!r} is {tensor.dtype}"
    shape = card.input.shape
    if len(shape) != 4:
        yield f"input.shape {shape} has rank {len(shape)}; models take [batch, channels, height, width]"
    if tensor.shape is not None and len(tensor.shape) != 4:
        yield f"the graph's input has rank {len(tensor.shape)} {_show(tensor.shape)}; expected 4 (NCHW)"
        return
    spec = card.preprocessing
    if len(shape) == 4:
        for axis, field, value in ((2, "height", spec.height), (3, "width", spec.width)):
            if shape[axis] is not None and shape[axis] != value:
                yield f"input.shape[{axis}] is {shape[axis]}; preprocessing.{field} is {value}"
    if tensor.shape is None:
        return
    batch, channels, height, width = tensor.shape
    if _fixed(batch) is not None:
        yield (
            f"the graph's batch axis is fixed at {batch}; the service batches images: export with a dynamic "
            "batch axis (torch.onnx.export dynamic_shapes / dynamic_axes)"
        )
    if _differs(channels, spec.channels):
        yield f"preprocessing.channels is {spec.channels}; the graph's input has {channels} channel(s)"
    if _differs(height, spec.height):
        yield f"preprocessing.height is {spec.height}; the graph's input has height {height}"
    if _differs(width, spec.width):
        yield f"preprocessing.width is {spec.width}; the graph's input has width {width}"


def _show(shape: tuple[Dim, ...] | None) -> str:
    return "[" + ", ".join("?" if d is None else str(d) for d in shape or ()) + "]"


def _scores(card: ModelCard, tensor: TensorInfo) -> Iterator[str]:
    if tensor.dtype != "float32":
        yield f"score output {tensor.name!r} is {tensor.dtype}; float32 scores are expected"
    if tensor.shape is None:
        return
    width = 1
    for dim in tensor.shape[1:]:
        fixed = _fixed(dim)
        if fixed is None:
            return  # a symbolic class axis: nothing to compare
        width *= fixed
    columns = card.label_columns()
    explicit = any(label.index is not None for label in card.labels)
    if not explicit and width != len(columns):
        yield (
            f"{len(columns)} label(s) but score output {tensor.name!r} {_show(tensor.shape)} has {width} "
            "column(s): give each label its column (labels[].index)"
        )
    elif max(columns) >= width:
        yield f"labels[].index {max(columns)} is past score output {tensor.name!r} {_show(tensor.shape)}"
    if card.activation == "softmax" and width < 2:
        yield f"activation softmax over {width} column(s) is always 1; use sigmoid for a single logit"


def _detection(card: ModelCard, graph: GraphInfo) -> Iterator[str]:
    spec = card.detection
    if spec is None:
        yield "task detection needs a detection section (heatmap_output, size_output, stride)"
        return
    pre = card.preprocessing
    for field, name, channels in (
        ("heatmap_output", spec.heatmap_output, 1),
        ("size_output", spec.size_output, 2),
    ):
        tensor = graph.output(name)
        if tensor is None:
            yield f"detection.{field} {name!r} is not an output of the graph"
            continue
        if name not in card.outputs:
            yield f"detection.{field} {name!r} is not in outputs"
        if tensor.shape is None:
            continue
        if len(tensor.shape) != 4:
            yield f"detection output {name!r} {_show(tensor.shape)} must be [N, {channels}, h, w]"
            continue
        _, c, h, w = tensor.shape
        if _differs(c, channels):
            yield f"detection output {name!r} has {c} channel(s); expected {channels}"
        if _differs(h, pre.height // spec.stride) or _differs(w, pre.width // spec.stride):
            yield (
                f"detection output {name!r} is {h} x {w}; preprocessing {pre.height} x {pre.width} at "
                f"detection.stride {spec.stride} gives "
                f"{pre.height // spec.stride} x {pre.width // spec.stride}"
            )


def _segmentation(card: ModelCard, graph: GraphInfo) -> Iterator[str]:
    """A per-pixel probability map ``[N, 1, height, width]`` at the model input's size (issue 16)."""
    spec = card.segmentation
    if spec is None:
        yield "task segmentation needs a segmentation section (output, after)"
        return
    tensor = graph.output(spec.output)
    if tensor is None:
        yield f"segmentation.output {spec.output!r} is not an output of the graph"
        return
    if spec.output not in card.outputs:
        yield f"segmentation.output {spec.output!r} is not in outputs"
    if tensor.dtype != "float32":
        yield f"segmentation output {spec.output!r} is {tensor.dtype}; float32 probabilities are expected"
    if tensor.shape is None:
        return
    pre = card.preprocessing
    if len(tensor.shape) != 4:
        yield f"segmentation output {spec.output!r} {_show(tensor.shape)} must be [N, 1, height, width]"
        return
    _, c, h, w = tensor.shape
    if _differs(c, 1) or _differs(h, pre.height) or _differs(w, pre.width):
        yield (
            f"segmentation output {spec.output!r} is {_show(tensor.shape)}; expected "
            f"[N, 1, {pre.height}, {pre.width}] (one probability per input pixel)"
        )


def _cam(card: ModelCard, graph: GraphInfo) -> Iterator[str]:
    """A class-activation map ``[N, labels, h, w]`` (card v2 ``cam_output``; service.inference.heatmap)."""
    if card.cam_output is None:
        return
    tensor = graph.output(card.cam_output)
    if tensor is None:
        yield f"cam_output {card.cam_output!r} is not an output of the graph"
    elif tensor.shape is not None and len(tensor.shape) != 4:
        yield f"cam output {card.cam_output!r} {_show(tensor.shape)} must be [N, labels, h, w]"
    elif tensor.shape is not None and tensor.shape[1] not in (None, 1, len(card.labels)):
        yield f"cam output {card.cam_output!r} has {tensor.shape[1]} maps for {len(card.labels)} label(s)"


def contradictions(card: ModelCard, graph: GraphInfo) -> list[str]:
    """Every way ``card`` disagrees with ``graph``, one sentence each (empty: they agree)."""
    problems = list(_input(card, graph))
    names = [t.name for t in graph.outputs]
    for name in card.outputs:
        if name not in names:
            problems.append(f"outputs lists {name!r}; the graph's outputs are {', '.join(map(repr, names))}")
    if card.task == "detection":
        problems.extend(_detection(card, graph))
    elif card.task == "segmentation":
        problems.extend(_segmentation(card, graph))
    else:
        tensor = graph.output(card.scores_name)
        if tensor is not None:
            problems.extend(_scores(card, tensor))
    problems.extend(_cam(card, graph))
    if graph.opset is None:
        problems.append("the graph imports no default-domain (ai.onnx) opset")
    elif graph.opset != card.opset:
        problems.append(f"opset is {card.opset}; the graph imports ai.onnx opset {graph.opset}")
    problems.extend(placeholders(card))
    return problems


def placeholders(card: ModelCard) -> list[str]:
    """Values still starting with :data:`PLACEHOLDER`, by their path in the card."""
    return [f"{path} is a placeholder to fill: {text!r}" for path, text in _strings(card.model_dump(), "")]


def _strings(value: Any, path: str) -> Iterator[tuple[str, str]]:
    if isinstance(value, str):
        if value.startswith(PLACEHOLDER):
            yield path, value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _strings(item, f"{path}.{key}" if path else str(key))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from _strings(item, f"{path}[{i}]")
