"""De-identified remote inference (issue 18, item 3): what a KServe v2 server receives from us.

A real MLServer serves the shipped cxr-pneumothorax model; between the service and it sits a recording
relay (a plain HTTP forwarder on loopback that keeps a copy of every request), standing where a site's
network would carry the traffic. A radiograph whose header is full of sentinel identifiers goes through
the whole service. Every request body that reached the relay must hold pixels, output names and a random
request id, and none of the identifiers, UIDs or dates; the result must name the backend that saw the
study, and the log must tie each request id to the model and server.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from io import BytesIO
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydicom import dcmread

from service.config import Settings
from service.inference.kserve.wire import HEADER_LENGTH
from tests.peers.mlserver import MLServerFactory
from tests.service.conftest import running_app
from tests.service.dicom_factory import SENTINEL_ACCESSION, SENTINEL_ID, SENTINEL_NAME, to_bytes
from training.data.synthetic import generate_cxr

pytestmark = [pytest.mark.e2e, pytest.mark.anyio]

MODELS = Path(__file__).resolve().parents[2] / "models"
CXR = "cxr-pneumothorax"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class Relay:
    """Forwards every request to ``upstream`` and keeps (method, path, headers, body) of each."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream.rstrip("/")
        self.seen: list[tuple[str, str, dict[str, str], bytes]] = []
        relay = self

        class Handler(BaseHTTPRequestHandler):
            def _forward(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                headers = {
                    k: v for k, v in self.headers.items() if k.lower() not in ("host", "content-length")
                }
                relay.seen.append((self.command, self.path, headers, body))
                answer = httpx.request(
                    self.command, relay.upstream + self.path, content=body, headers=headers, timeout=60
                )
                self.send_response(answer.status_code)
                for key, value in answer.headers.items():
                    if key.lower() not in (
                        "content-length",
                        "transfer-encoding",
                        "connection",
                        "content-encoding",
                    ):
                        self.send_header(key, value)
                self.send_header("Content-Length", str(len(answer.content)))
                self.end_headers()
                self.wfile.write(answer.content)

            do_GET = do_POST = _forward  # noqa: N815 - http.server's naming

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - quiet
                return

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> Relay:
        self.thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def mlservers(tmp_path: Path) -> Iterator[MLServerFactory]:
    factory = MLServerFactory(tmp_path / "mlserver")
    try:
        yield factory
    finally:
        factory.stop_all()


def _identified_radiograph(root: Path) -> bytes:
    """A synthetic chest radiograph carrying sentinel identifiers in every usual place."""
    generate_cxr(root, n_patients=1, seed=11)
    ds = dcmread(next(root.rglob("*.dcm")))
    ds.PatientName, ds.PatientID, ds.AccessionNumber = SENTINEL_NAME, SENTINEL_ID, SENTINEL_ACCESSION
    ds.PatientBirthDate, ds.StudyDate, ds.InstitutionName = (
        "19010101",
        "20260315",
        "Sentinel General Hospital",
    )
    return to_bytes(ds)


async def test_remote_backend_sees_pixels_and_a_pseudonymous_id_only(
    mlservers: MLServerFactory, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    server = await asyncio.to_thread(mlservers, {CXR: MODELS / CXR / "model.onnx"})
    data = _identified_radiograph(tmp_path / "cxr")
    ds = dcmread(BytesIO(data))
    with Relay(server.base_url) as relay:
        settings = Settings(
            models_dir=MODELS,
            data_dir=tmp_path / "var",
            inference={"providers": "cpu", "remote_models": {CXR: relay.url}},
            worker={"poll_seconds": 0.05},
            store={"sqlite_synchronous": "NORMAL"},
            auth={"open": True},
            dicom={"enabled": False},
        )
        caplog.set_level(logging.INFO, logger="service.inference.kserve.client")
        async with running_app(settings) as (_app, client):
            r = await client.post(
                "/v1/studies",
                content=data,
                headers={"Content-Type": "application/dicom", "Prefer": "wait=60"},
            )
            assert r.status_code == 200, r.text
            result = r.json()
            r = await client.get(f"/v1/studies/{ds.StudyInstanceUID}/audit")
            assert r.status_code == 200, r.text
            audited = [e for e in r.json()["events"] if e["event"] == "remote_inference"]

    assert {m["name"]: m["provider"] for m in result["models"]}[CXR] == f"KServeV2:{relay.url}"
    infers = [(headers, body) for method, path, headers, body in relay.seen if path.endswith("/infer")]
    assert len(infers) >= 2  # the start-up warm-up, then the study
    secrets = [SENTINEL_NAME, SENTINEL_ID, SENTINEL_ACCESSION, "Sentinel", "19010101", "20260315"]
    secrets += [str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID)]
    ids = []
    for headers, body in infers:
        for secret in secrets:
            assert secret.encode() not in body
        assert not any(secret in value for value in headers.values() for secret in secrets)
        length = headers.get(HEADER_LENGTH) or headers.get(HEADER_LENGTH.lower())
        message = json.loads(body[: int(length)] if length else body)
        assert set(message) == {"id", "inputs", "outputs"}
        [tensor] = message["inputs"]
        assert set(tensor) <= {"name", "shape", "datatype", "data", "parameters"}
        assert set(tensor.get("parameters") or {}) <= {"binary_data_size"}
        assert re.fullmatch(r"[0-9a-f]{32}", message["id"])
        ids.append(message["id"])
    assert len(set(ids)) == len(ids)  # a new id for every request: nothing to link them by
    # which backend saw what: one audit event per request of the study (not the warm-up), as in the result
    assert audited and {e["detail"]["request_id"] for e in audited} < set(ids)
    for event in audited:
        assert event["actor"] == "pacs-triage"
        assert {k: event["detail"][k] for k in ("model", "backend", "sent", "result_id")} == {
            "model": CXR,
            "backend": f"KServeV2:{relay.url}",
            "sent": "pixels",
            "result_id": result["result_id"],
        }
    in_result = [q["request_id"] for q in result["remote_requests"]]
    assert in_result == [e["detail"]["request_id"] for e in audited]
    logged = [rec.getMessage() for rec in caplog.records if rec.name == "service.inference.kserve.client"]
    for request_id in ids:
        assert any(request_id in line and CXR in line and relay.url in line for line in logged)
    assert not any(SENTINEL_NAME in rec.getMessage() for rec in caplog.records)
