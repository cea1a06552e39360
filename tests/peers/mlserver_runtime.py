"""A custom MLServer runtime that serves one of our ONNX files with ONNX Runtime (runs inside .venv-mlserver).

MLServer 1.7 has no ONNX runtime of its own (its MLflow runtime would need the model wrapped as an MLflow
pyfunc), so this ~60-line ``MLModel`` is the smallest honest way to make MLServer serve ``model.onnx``. It
is loaded by MLServer, not by pytest: ``tests/peers/mlserver.py`` puts this folder on the server's
PYTHONPATH and names ``mlserver_runtime.OnnxRuntimeModel`` as the implementation in model-settings.json.

The v2 metadata (``GET /v2/models/{name}``) is read from the ONNX graph itself, not copied from our card,
so the client's start-up check compares the card with what the server really loaded.
"""

from __future__ import annotations

import asyncio

import numpy as np
import onnxruntime as ort
from mlserver import MLModel
from mlserver.codecs import NumpyCodec
from mlserver.types import InferenceRequest, InferenceResponse, MetadataTensor
from mlserver.utils import get_model_uri

# ONNX tensor element types (onnx.TensorProto) as KServe v2 datatypes; our models use float32 only.
_DATATYPES = {
    "tensor(float)": "FP32",
    "tensor(double)": "FP64",
    "tensor(float16)": "FP16",
    "tensor(int64)": "INT64",
    "tensor(int32)": "INT32",
    "tensor(uint8)": "UINT8",
    "tensor(bool)": "BOOL",
}


def _metadata(args: list[ort.NodeArg]) -> list[MetadataTensor]:
    """v2 metadata tensors; a dynamic dimension (a name or None in ONNX) is -1, as the protocol says."""
    return [
        MetadataTensor(
            name=arg.name,
            datatype=_DATATYPES.get(arg.type, arg.type),
            shape=[dim if isinstance(dim, int) else -1 for dim in arg.shape],
        )
        for arg in args
    ]


class OnnxRuntimeModel(MLModel):
    """Serves ``parameters.uri`` (an .onnx file) on ONNX Runtime's CPU provider."""

    async def load(self) -> bool:
        path = await get_model_uri(self._settings)
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self._session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        self.inputs = _metadata(self._session.get_inputs())
        self.outputs = _metadata(self._session.get_outputs())
        self.ready = True
        return self.ready

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        feed = {inp.name: np.ascontiguousarray(NumpyCodec.decode_input(inp)) for inp in payload.inputs}
        wanted = [out.name for out in payload.outputs] if payload.outputs else None
        names = wanted or [out.name for out in self._session.get_outputs()]
        # ORT releases the GIL: run it off MLServer's event loop so health probes still answer.
        results = await asyncio.to_thread(self._session.run, names, feed)
        return InferenceResponse(
            id=payload.id,
            model_name=self.name,
            model_version=self.version,
            outputs=[
                NumpyCodec.encode_output(name, np.asarray(value))
                for name, value in zip(names, results, strict=True)
            ],
        )
