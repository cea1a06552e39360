"""What an ONNX file declares about itself: IR version, opsets, graph inputs and outputs and their operators.

Why a reader of our own: the card is checked against the graph when the registry loads a model, before
ONNX Runtime opens it (:mod:`service.inference.cardcheck`), and by ``pacs-triage models check | init``.
The ``onnx`` package is a training extra; the service's runtime has only ONNX Runtime, whose session API
shows inputs and outputs but not the opsets a model imports. The few fields needed are read straight from
the protobuf wire format (https://protobuf.dev/programming-guides/encoding/) with the field numbers of
``onnx/onnx.proto`` (IR version 10), skipping everything else (nodes, weights) by its length, on a
memory map: a 1 GB model costs no 1 GB read into memory. ``tests/service/inference/test_graph.py``
compares the result with ``onnx.load`` on every model it builds.
"""

from __future__ import annotations

import mmap
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from service.errors import GraphError

__all__ = ["ELEM_TYPES", "GraphInfo", "TensorInfo", "read_graph"]

ELEM_TYPES: dict[int, str] = {
    1: "float32",
    2: "uint8",
    3: "int8",
    4: "uint16",
    5: "int16",
    6: "int32",
    7: "int64",
    8: "string",
    9: "bool",
    10: "float16",
    11: "float64",
    12: "uint32",
    13: "uint64",
    14: "complex64",
    15: "complex128",
    16: "bfloat16",
}
"""``TensorProto.DataType`` (onnx.proto) → numpy-style name; anything else reads as ``"type <n>"``."""

# onnx.proto field numbers
_MODEL_IR_VERSION, _MODEL_OPSET_IMPORT, _MODEL_GRAPH = 1, 8, 7
_OPSET_DOMAIN, _OPSET_VERSION = 1, 2
_GRAPH_NODE, _GRAPH_INITIALIZER, _GRAPH_INPUT, _GRAPH_OUTPUT = 1, 5, 11, 12
_NODE_OUTPUT, _NODE_OP_TYPE = 2, 4
_TENSOR_NAME = 8
_VALUE_INFO_NAME, _VALUE_INFO_TYPE = 1, 2
_TYPE_TENSOR = 1
_TENSOR_TYPE_ELEM, _TENSOR_TYPE_SHAPE = 1, 2
_SHAPE_DIM = 1
_DIM_VALUE, _DIM_PARAM = 1, 2

_VARINT, _FIXED64, _LENGTH, _FIXED32 = 0, 1, 2, 5


Dim = int | str | None
"""A fixed size, a named symbolic size (``"N"``), or None when the graph says nothing."""


@dataclass(frozen=True)
class TensorInfo:
    """One graph input or output: its name, element type and shape (None: the graph declares no shape)."""

    name: str
    dtype: str
    shape: tuple[Dim, ...] | None


@dataclass(frozen=True)
class GraphInfo:
    """The declarations of one ONNX model that a card must agree with."""

    ir_version: int
    opsets: dict[str, int]
    inputs: tuple[TensorInfo, ...]
    outputs: tuple[TensorInfo, ...]
    producers: dict[str, str]
    """Graph output name → the operator that computes it (``"Softmax"``, ``"Sigmoid"``, ``"Gemm"``)."""

    @property
    def opset(self) -> int | None:
        """The default (``ai.onnx``) operator set version, the one a card's ``opset`` names."""
        return self.opsets.get("", self.opsets.get("ai.onnx"))

    def input(self, name: str) -> TensorInfo | None:
        return next((t for t in self.inputs if t.name == name), None)

    def output(self, name: str) -> TensorInfo | None:
        return next((t for t in self.outputs if t.name == name), None)


Buffer = bytes | mmap.mmap


def _varint(buf: Buffer, pos: int, end: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        if pos >= end or shift > 63:
            raise GraphError("truncated or malformed protobuf varint")
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7


def _fields(buf: Buffer, start: int, end: int) -> Iterator[tuple[int, int, int, int]]:
    """``(field number, wire type, value or start, end)`` of each field of one message in ``[start, end)``.

    Length-delimited fields give their payload's ``[start, end)``; varints their value (and end -1).
    """
    pos = start
    while pos < end:
        key, pos = _varint(buf, pos, end)
        number, wire = key >> 3, key & 7
        if wire == _VARINT:
            value, pos = _varint(buf, pos, end)
            yield number, wire, value, -1
        elif wire == _LENGTH:
            length, pos = _varint(buf, pos, end)
            if pos + length > end:
                raise GraphError("truncated protobuf message (a field runs past its end)")
            yield number, wire, pos, pos + length
            pos += length
        elif wire == _FIXED64:
            pos += 8
        elif wire == _FIXED32:
            pos += 4
        else:
            raise GraphError(f"unexpected protobuf wire type {wire}: not an ONNX model")
    if pos != end:
        raise GraphError("truncated protobuf message")


def _text(buf: Buffer, start: int, end: int) -> str:
    try:
        return bytes(buf[start:end]).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise GraphError("a name in the graph is not UTF-8: not an ONNX model") from exc


def _shape(buf: Buffer, start: int, end: int) -> tuple[Dim, ...]:
    dims: list[Dim] = []
    for number, wire, a, b in _fields(buf, start, end):
        if number != _SHAPE_DIM or wire != _LENGTH:
            continue
        dim: Dim = None
        for n, w, c, d in _fields(buf, a, b):
            if n == _DIM_VALUE and w == _VARINT:
                dim = c
            elif n == _DIM_PARAM and w == _LENGTH:
                dim = _text(buf, c, d) or None
        dims.append(dim)
    return tuple(dims)


def _value_info(buf: Buffer, start: int, end: int) -> TensorInfo:
    name, dtype, shape = "", "unknown", None
    for number, wire, a, b in _fields(buf, start, end):
        if number == _VALUE_INFO_NAME and wire == _LENGTH:
            name = _text(buf, a, b)
        elif number == _VALUE_INFO_TYPE and wire == _LENGTH:
            for n, w, c, d in _fields(buf, a, b):
                if n != _TYPE_TENSOR or w != _LENGTH:
                    dtype = "not a tensor"
                    continue
                for n2, w2, e, f in _fields(buf, c, d):
                    if n2 == _TENSOR_TYPE_ELEM and w2 == _VARINT:
                        dtype = ELEM_TYPES.get(e, f"type {e}")
                    elif n2 == _TENSOR_TYPE_SHAPE and w2 == _LENGTH:
                        shape = _shape(buf, e, f)
    return TensorInfo(name=name, dtype=dtype, shape=shape)


def _initializer_name(buf: Buffer, start: int, end: int) -> str:
    for number, wire, a, b in _fields(buf, start, end):
        if number == _TENSOR_NAME and wire == _LENGTH:
            return _text(buf, a, b)
    return ""


def parse_model(buf: Buffer) -> GraphInfo:
    """Read a serialized ``ModelProto``; raises :class:`GraphError` for bytes that are not one."""
    ir_version = 0
    opsets: dict[str, int] = {}
    graph: tuple[int, int] | None = None
    for number, wire, a, b in _fields(buf, 0, len(buf)):
        if number == _MODEL_IR_VERSION and wire == _VARINT:
            ir_version = a
        elif number == _MODEL_OPSET_IMPORT and wire == _LENGTH:
            domain, version = "", 0
            for n, w, c, d in _fields(buf, a, b):
                if n == _OPSET_DOMAIN and w == _LENGTH:
                    domain = _text(buf, c, d)
                elif n == _OPSET_VERSION and w == _VARINT:
                    version = c
            opsets[domain] = version
        elif number == _MODEL_GRAPH and wire == _LENGTH:
            graph = (a, b)
    if graph is None or ir_version == 0:
        raise GraphError("no graph or no IR version: not an ONNX model")
    inputs: list[TensorInfo] = []
    outputs: list[TensorInfo] = []
    initializers: set[str] = set()
    nodes: list[tuple[int, int]] = []
    for number, wire, a, b in _fields(buf, *graph):
        if wire != _LENGTH:
            continue
        if number == _GRAPH_INPUT:
            inputs.append(_value_info(buf, a, b))
        elif number == _GRAPH_OUTPUT:
            outputs.append(_value_info(buf, a, b))
        elif number == _GRAPH_INITIALIZER:
            initializers.add(_initializer_name(buf, a, b))
        elif number == _GRAPH_NODE:
            nodes.append((a, b))
    wanted = {t.name for t in outputs}
    producers: dict[str, str] = {}
    for a, b in nodes:
        op_type, made = "", []
        for n, w, c, d in _fields(buf, a, b):
            if n == _NODE_OP_TYPE and w == _LENGTH:
                op_type = _text(buf, c, d)
            elif n == _NODE_OUTPUT and w == _LENGTH:
                made.append(_text(buf, c, d))
        producers.update((name, op_type) for name in made if name in wanted)
    # IR < 4 lists weights among the inputs too (onnx IR.md, "Graphs"); they are not fed by the caller
    feeds = tuple(t for t in inputs if t.name not in initializers)
    return GraphInfo(
        ir_version=ir_version, opsets=opsets, inputs=feeds, outputs=tuple(outputs), producers=producers
    )


def read_graph(path: Path) -> GraphInfo:
    """:func:`parse_model` on a file, through a read-only memory map."""
    try:
        with path.open("rb") as fh:
            if path.stat().st_size == 0:
                raise GraphError("the model file is empty")
            with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as buf:
                return parse_model(buf)
    except OSError as exc:
        raise GraphError(f"cannot read the model file: {exc.strerror or exc}") from exc
