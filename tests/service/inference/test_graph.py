"""The ONNX declarations reader agrees with the ``onnx`` package on every graph we build or ship."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from service.errors import GraphError
from service.inference.graph import ELEM_TYPES, GraphInfo, parse_model, read_graph
from tests.fixtures.foreign_model import foreign_graph, write_foreign_classifier
from tests.fixtures.tiny_models import write_tiny_models

SHIPPED = sorted((Path(__file__).resolve().parents[3] / "models").glob("*/model.onnx"))


def _dims(value_info: onnx.ValueInfoProto) -> tuple[object, ...]:
    return tuple(
        d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
        for d in value_info.type.tensor_type.shape.dim
    )


def assert_same_as_onnx(info: GraphInfo, model: onnx.ModelProto) -> None:
    initializers = {t.name for t in model.graph.initializer}
    feeds = [v for v in model.graph.input if v.name not in initializers]
    assert info.ir_version == model.ir_version
    assert info.opsets == {o.domain: o.version for o in model.opset_import}
    for ours, theirs in ((info.inputs, feeds), (info.outputs, list(model.graph.output))):
        assert [t.name for t in ours] == [v.name for v in theirs]
        assert [t.shape for t in ours] == [_dims(v) for v in theirs]
        assert [t.dtype for t in ours] == [ELEM_TYPES[v.type.tensor_type.elem_type] for v in theirs]
    producers = {out: node.op_type for node in model.graph.node for out in node.output}
    assert info.producers == {t.name: producers[t.name] for t in info.outputs if t.name in producers}


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.parent.name)
def test_shipped_models(path: Path) -> None:
    assert_same_as_onnx(read_graph(path), onnx.load(str(path)))


def test_tiny_models(tmp_path: Path) -> None:
    for folder in write_tiny_models(tmp_path).values():
        path = folder / "model.onnx"
        assert_same_as_onnx(read_graph(path), onnx.load(str(path)))


def test_foreign_classifier_with_and_without_softmax(tmp_path: Path) -> None:
    logits = read_graph(write_foreign_classifier(tmp_path / "a.onnx"))
    assert logits.inputs[0].shape == ("batch_size", 3, 32, 32)
    assert logits.outputs[0].name == "logits" and logits.producers == {"logits": "Gemm"}
    probs = read_graph(write_foreign_classifier(tmp_path / "b.onnx", softmax=True, opset=19))
    assert probs.producers == {"probabilities": "Softmax"} and probs.opset == 19
    assert_same_as_onnx(probs, foreign_graph(softmax=True, opset=19))


def test_initializers_listed_as_inputs_are_not_feeds() -> None:
    """IR 3 graphs list their weights among the inputs (onnx IR.md): only the image is fed."""
    model = foreign_graph()
    model.graph.input.extend([helper.make_tensor_value_info("weight", TensorProto.FLOAT, [3, 2])])
    info = parse_model(model.SerializeToString())
    assert [t.name for t in info.inputs] == ["input"]


def test_symbolic_and_unknown_dims() -> None:
    image = helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 1, "h", 8])
    out = helper.make_tensor_value_info("y", TensorProto.FLOAT16, None)
    graph = helper.make_graph(
        [helper.make_node("Cast", ["x"], ["y"], to=TensorProto.FLOAT16)], "g", [image], [out]
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    info = parse_model(model.SerializeToString())
    assert info.inputs[0].shape == (None, 1, "h", 8)
    assert info.outputs[0].dtype == "float16" and info.outputs[0].shape is None
    assert info.opset == 18


@pytest.mark.parametrize(
    ("data", "needle"),
    [
        (b"", "empty"),
        (b"\x08", "varint"),  # a key and no value
        (b"\x0f", "wire type"),  # wire type 7 does not exist
        (b"\x3a\x10abc", "truncated"),  # graph field claims 16 bytes, has 3
        (helper.make_opsetid("", 17).SerializeToString(), "not an ONNX model"),
    ],
)
def test_not_a_model(tmp_path: Path, data: bytes, needle: str) -> None:
    path = tmp_path / "x.onnx"
    path.write_bytes(data)
    with pytest.raises(GraphError, match=needle):
        read_graph(path)


def test_truncated_real_model(tmp_path: Path) -> None:
    data = foreign_graph().SerializeToString()
    path = tmp_path / "cut.onnx"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(GraphError):
        read_graph(path)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(GraphError, match="cannot read"):
        read_graph(tmp_path / "nowhere.onnx")


def test_weights_are_skipped_not_parsed() -> None:
    """A graph whose initializer is large still yields its declarations (read by length, not decoded)."""
    model = foreign_graph()
    big = numpy_helper.from_array(np.zeros((512, 512), dtype=np.float32), "unused")
    model.graph.initializer.append(big)
    info = parse_model(model.SerializeToString())
    assert [t.name for t in info.outputs] == ["logits"]
