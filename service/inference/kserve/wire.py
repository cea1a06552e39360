"""The KServe v2 (Open Inference Protocol) wire format: requests, answers, metadata checks.

The codec only: no I/O, so it is tested byte for byte and shared by anything that speaks the protocol;
:mod:`service.inference.kserve.client` sends what this builds.

The protocol (kserve/open-inference-protocol, "REST" section; Triton's docs name the same paths):

- ``GET /v2/health/ready``, ``GET /v2/models/{name}/ready``: 200 when ready;
- ``GET /v2``: server metadata, whose ``extensions`` say whether the binary tensor extension is there;
- ``GET /v2/models/{name}``: inputs and outputs with ``name``, ``datatype``, ``shape`` (-1 = dynamic);
- ``POST /v2/models/{name}/infer``: tensors as JSON (``data`` is the tensor flattened in row-major order),
  or, with Triton's binary tensor data extension, a JSON header of ``Inference-Header-Content-Length``
  bytes followed by the raw little-endian tensors. Errors are ``{"error": "..."}`` with a 4xx/5xx status.

Wire format: binary when the server lists ``binary_tensor_data`` (Triton does), JSON otherwise (MLServer
1.7 has no binary extension over HTTP). JSON costs ~1 µs per number each way in Python (a 256x256 image is
~70 ms to encode), binary next to nothing. Both are exact for FP32: a float32 widened to a Python float
prints in a form that parses back to the same float32, so a remote run sees the very input a local run
would.

What leaves the process (issue 18, de-identified remote inference): an ``infer`` request carries the
preprocessed pixels as one FP32 tensor (name, shape, datatype, values), the names of the outputs wanted,
and ``id``, a random pseudonymous request id (UUID4, new for every request, derived from nothing): no DICOM
header, no UID, name, ID, accession number or date, and no file. The model server therefore never holds
anything that identifies a patient, whatever it logs. Which backend saw which study stays on our side:
each request is logged at INFO with its id, model and server, stamped with the job id
(:mod:`service.logs`), the study's result names the backend per model (``models[].provider``), and every
request is an audit event of its study (:mod:`service.inference.disclosure`). See
docs/deidentification.md. A future backend that needs DICOM must de-identify it first (PS3.15 Annex E).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx
import numpy as np

from service.inference.card import ModelCard

__all__ = [
    "BINARY_EXTENSION",
    "CONFIG_EXTENSION",
    "HEADER_LENGTH",
    "check_metadata",
    "decode_response",
    "display_url",
    "encode_request",
    "server_error",
]

BINARY_EXTENSION = "binary_tensor_data"
CONFIG_EXTENSION = "model_configuration"
HEADER_LENGTH = "Inference-Header-Content-Length"

# v2 datatypes (open-inference-protocol "Tensor Data Types") as little-endian numpy dtypes.
_DTYPES: dict[str, np.dtype[Any]] = {
    "BOOL": np.dtype("?"),
    "UINT8": np.dtype("u1"),
    "INT8": np.dtype("i1"),
    "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
}


def display_url(url: str) -> str:
    """``url`` without user or password, for logs, ``/v1/models`` and error messages."""
    parts = urlsplit(url)
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit((parts.scheme, host, parts.path, "", "")).rstrip("/")


def check_metadata(card: ModelCard, metadata: Mapping[str, Any]) -> list[str]:
    """What does not fit between the card and the server's v2 model metadata; empty when it all fits.

    The card's one input must be the server's only input, FP32, with the same rank and every fixed
    dimension equal (a dynamic dimension is ``-1`` on the wire and ``None`` in the card; both must agree).
    Every output the card names must be there, FP32; outputs the card does not name are not asked for.
    """
    problems: list[str] = []
    try:
        inputs = {str(t["name"]): t for t in metadata.get("inputs") or []}
        outputs = {str(t["name"]): t for t in metadata.get("outputs") or []}
    except (TypeError, KeyError, AttributeError):
        return [f"the server's model metadata is not KServe v2 metadata: {str(metadata)[:200]}"]
    want = card.input
    if want.name not in inputs:
        problems.append(f"input {want.name!r} missing on the server (it has {sorted(inputs) or 'none'})")
    else:
        tensor = inputs[want.name]
        if tensor.get("datatype") != "FP32":
            problems.append(
                f"input {want.name!r} is {tensor.get('datatype')} on the server, the card says FP32"
            )
        shape = [None if d in (-1, None) else d for d in tensor.get("shape") or []]
        if shape != list(want.shape):
            problems.append(
                f"input {want.name!r} has shape {_wire(shape)} on the server, card {_wire(want.shape)}"
            )
    extra = sorted(set(inputs) - {want.name})
    if extra:
        problems.append(f"the server's model takes inputs the card does not know: {extra}")
    for name in card.outputs:
        if name not in outputs:
            problems.append(f"output {name!r} missing on the server (it has {sorted(outputs) or 'none'})")
        elif outputs[name].get("datatype") != "FP32":
            problems.append(
                f"output {name!r} is {outputs[name].get('datatype')} on the server, expected FP32"
            )
    return problems


def _wire(shape: Sequence[int | None]) -> list[int]:
    return [-1 if d is None else d for d in shape]


def encode_request(
    card: ModelCard, images: np.ndarray, *, binary: bool, request_id: str | None = None
) -> tuple[bytes, dict[str, str]]:
    """The body and headers of one ``infer`` request for ``images`` (float32 ``[n, C, H, W]``).

    Pixels, output names and ``request_id`` (the v2 ``id``, pseudonymous) only: see the module docstring.
    """
    tensor: dict[str, Any] = {"name": card.input.name, "shape": list(images.shape), "datatype": "FP32"}
    outputs: list[dict[str, Any]] = [{"name": name} for name in card.outputs]
    message: dict[str, Any] = {"id": request_id} if request_id else {}
    if not binary:
        tensor["data"] = images.ravel().tolist()
        message.update(inputs=[tensor], outputs=outputs)
        body = json.dumps(message, separators=(",", ":")).encode()
        return body, {"Content-Type": "application/json"}
    raw = np.ascontiguousarray(images, dtype="<f4").tobytes()
    tensor["parameters"] = {"binary_data_size": len(raw)}
    for output in outputs:
        output["parameters"] = {"binary_data": True}
    message.update(inputs=[tensor], outputs=outputs)
    header = json.dumps(message, separators=(",", ":")).encode()
    return header + raw, {"Content-Type": "application/octet-stream", HEADER_LENGTH: str(len(header))}


def decode_response(body: bytes, header_length: str | None) -> dict[str, np.ndarray]:
    """Output tensors of an ``infer`` answer, JSON or binary extension; ``ValueError`` when malformed."""
    if header_length is None:
        header, raw = body, b""
    else:
        try:
            n = int(header_length)
        except ValueError:
            raise ValueError(f"{HEADER_LENGTH} is {header_length!r}, not a number") from None
        if not 0 <= n <= len(body):
            raise ValueError(f"{HEADER_LENGTH} {n} does not fit a {len(body)}-byte body")
        header, raw = body[:n], body[n:]
    try:
        payload = json.loads(header)
        tensors = payload["outputs"]
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"no 'outputs' in the answer ({exc.__class__.__name__}): {header[:200]!r}") from None
    outputs: dict[str, np.ndarray] = {}
    offset = 0
    for tensor in tensors:
        try:
            name = str(tensor["name"])
            shape = [int(d) for d in tensor["shape"]]
            dtype = _DTYPES[tensor["datatype"]]
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(
                f"output tensor {str(tensor)[:200]} lacks a name, shape or known datatype"
            ) from exc
        native = dtype.newbyteorder("=")
        size = (tensor.get("parameters") or {}).get("binary_data_size")
        if size is not None:
            chunk = raw[offset : offset + int(size)]
            if len(chunk) != int(size):
                raise ValueError(f"output {name}: binary data cut short ({len(chunk)} of {size} bytes)")
            offset += int(size)
            array = np.frombuffer(chunk, dtype=dtype).astype(native)  # a copy: frombuffer's is read-only
        elif "data" in tensor:
            try:
                array = np.asarray(tensor["data"], dtype=native)
            except (TypeError, ValueError) as exc:
                raise ValueError(f"output {name}: data is not {tensor['datatype']}: {exc}") from exc
        else:
            raise ValueError(f"output {name} has neither data nor binary_data_size")
        if array.size != int(np.prod(shape)):
            raise ValueError(f"output {name}: {array.size} values do not fill shape {shape}")
        outputs[name] = array.reshape(shape)
    return outputs


def server_error(response: httpx.Response) -> str:
    """The server's own message: v2 errors are ``{"error": "..."}``; anything else as text, cut short."""
    try:
        payload = response.json()
    except ValueError:
        payload = None
    if isinstance(payload, dict) and isinstance(payload.get("error"), str):
        return str(payload["error"])[:500]
    return response.text[:500] or response.reason_phrase
