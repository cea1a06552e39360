"""FHIR R4 DiagnosticReport + Flag as a transaction Bundle, against a loopback HTTP server that parses what we
send with fhir.resources and answers a transaction-response; the Bundle builder also on its own."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from fhir.resources.R4B.bundle import Bundle
from fhir.resources.R4B.diagnosticreport import DiagnosticReport
from fhir.resources.R4B.flag import Flag
from fhir.resources.R4B.observation import Observation
from fhir.resources.R4B.provenance import Provenance

from service.config import NotifySettings, Settings
from service.deliver import notify
from service.deliver.fhir import PATIENT_ID_SYSTEM, build_bundle, send_fhir
from service.deliver.hl7 import send_hl7
from service.errors import FHIRError
from service.results.schema import ModelUsed, StudyResult
from service.store.notify import NotificationInfo
from tests.service.conftest import running_app
from tests.service.deliver.messages import NOW, PTX, finding, header, make_result
from tests.service.deliver.messages import notification as hl7_notification
from tests.service.deliver.test_hl7 import RIS
from tests.service.dicom_factory import (
    SENTINEL_ACCESSION,
    SENTINEL_ID,
    SENTINEL_NAME,
    chest,
    make_dataset,
    multipart_related,
)

SCT = "http://snomed.info/sct"


class FHIRServer:
    """A FHIR endpoint on loopback: each POST to the base is parsed as an R4 Bundle and answered as ``script``
    says for that attempt (the last entry repeats): "ok" (200 transaction-response), "outcome" (422 with an
    OperationOutcome naming the patient, to check it is redacted) or "entry-failed" (200, one entry 409)."""

    def __init__(self, script: list[str]) -> None:
        self.script = script
        self.bundles: list[Bundle] = []
        self.requests: list[tuple[str, dict[str, str]]] = []
        self.errors: list[str] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's naming
                body = self.rfile.read(int(self.headers["Content-Length"]))
                server.requests.append((self.path, dict(self.headers)))
                try:
                    bundle = Bundle.model_validate_json(body)
                except ValueError as exc:
                    server.errors.append(str(exc))
                    return self._answer(400, {"resourceType": "OperationOutcome", "issue": []})
                server.bundles.append(bundle)
                mode = server.script[min(len(server.bundles), len(server.script)) - 1]
                if mode == "outcome":
                    patient = bundle.entry[0].resource.subject.identifier.value
                    issue = {
                        "severity": "error",
                        "code": "processing",
                        "diagnostics": f"no Patient {patient}",
                    }
                    return self._answer(422, {"resourceType": "OperationOutcome", "issue": [issue]})
                assert bundle.entry is not None
                statuses = ["201 Created"] * len(bundle.entry)
                if mode == "entry-failed":
                    statuses[-1] = "409 Conflict"
                response = Bundle(
                    type="transaction-response",
                    entry=[
                        {"response": {"status": s, "location": f"{e.request.url}/{i}/_history/1"}}
                        for i, (s, e) in enumerate(zip(statuses, bundle.entry, strict=True))
                    ],
                )
                self._answer(200, json.loads(response.model_dump_json()))

            def _answer(self, status: int, doc: dict[str, Any]) -> None:
                data = json.dumps(doc).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/fhir+json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *_args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/fhir"

    def wait(self, n: int, timeout: float = 15) -> list[Bundle]:
        deadline = time.monotonic() + timeout
        while len(self.bundles) < n and time.monotonic() < deadline:
            time.sleep(0.02)
        return list(self.bundles)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def fhir_factory() -> Iterator[Callable[[list[str]], FHIRServer]]:
    servers: list[FHIRServer] = []

    def start(script: list[str]) -> FHIRServer:
        servers.append(FHIRServer(script))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


def resources(bundle: Bundle) -> tuple[DiagnosticReport, list[Flag]]:
    """The report and the flags (the Provenance, if any, is :func:`provenance`'s)."""
    report, *others = [e.resource for e in bundle.entry if not isinstance(e.resource, Provenance)]
    assert isinstance(report, DiagnosticReport)
    flags = [f for f in others if isinstance(f, Flag)]
    assert flags == others, others
    return report, flags


def provenance(bundle: Bundle) -> Provenance:
    (entry,) = [e for e in bundle.entry if isinstance(e.resource, Provenance)]
    assert bundle.entry[-1] is entry
    assert (entry.request.method, entry.request.url) == ("PUT", f"Provenance/{entry.resource.id}")
    assert entry.resource.target[0].reference == bundle.entry[0].fullUrl  # the report
    assert isinstance(entry.resource, Provenance)
    return entry.resource


def round_trip(bundle: Bundle) -> Bundle:
    """Parse what would go on the wire, as a server would."""
    return Bundle.model_validate_json(bundle.model_dump_json())


def notification(base: str, header_path: Path | None, result: StudyResult | None = None) -> NotificationInfo:
    return hl7_notification(base, header_path, result, channel="fhir", notification_id=7)


# the Bundle, no network


def test_bundle_is_a_valid_transaction_of_report_and_flag() -> None:
    result = make_result()
    bundle = round_trip(build_bundle(result, header(), accession_number=SENTINEL_ACCESSION, now=NOW))
    assert bundle.type == "transaction"
    report, (flag,) = resources(bundle)
    assert [(e.request.method, e.request.url) for e in bundle.entry] == [
        ("POST", "DiagnosticReport"),
        ("POST", "Flag"),
    ]
    for entry in bundle.entry:  # a conditional create: a retry after a lost answer creates nothing twice
        assert entry.request.ifNoneExist == f"identifier=urn:ietf:rfc:3986|{entry.fullUrl}"
        assert entry.resource.identifier[0].value == entry.fullUrl
    assert report.identifier[0].value == f"urn:uuid:{result.result_id}"
    assert report.status == "preliminary"
    assert report.category[0].coding[0].code == "RAD"
    assert (report.code.coding[0].system, report.code.coding[0].code) == ("http://loinc.org", "18748-4")
    patient = report.subject.identifier
    assert (report.subject.type, patient.system, patient.value) == (
        "Patient",
        "urn:oid:1.2.3.4.5",
        SENTINEL_ID,
    )
    assert patient.assigner.display == "HOSP" and patient.type.coding[0].code == "MR"
    assert report.imagingStudy[0].identifier.value == f"urn:oid:{result.study_uid}"
    assert report.imagingStudy[0].identifier.system == "urn:dicom:uid"
    assert report.basedOn[0].identifier.value == SENTINEL_ACCESSION
    assert report.effectiveDateTime.isoformat() == "2025-03-04"
    assert [(c.coding[0].system, c.coding[0].code) for c in report.conclusionCode] == [(SCT, "36118008")]
    assert "not for diagnostic use" in report.conclusion
    observations = report.contained
    assert [r.reference for r in report.result] == [f"#{o.id}" for o in observations]
    assert all(isinstance(o, Observation) for o in observations)
    assert [o.code.coding[0].code for o in observations] == ["36118008", "786838002"]
    assert [float(o.valueQuantity.value) for o in observations] == [0.93, 0.12]
    assert [o.interpretation[0].coding[0].code for o in observations] == ["POS", "NEG"]
    assert {o.method.text for o in observations} == {"cxr-pneumothorax 1.2.0"}
    assert {o.status for o in observations} == {"preliminary"}
    assert all(o.subject.identifier.value == SENTINEL_ID for o in observations)
    assert flag.status == "active" and flag.category[0].coding[0].code == "clinical"
    assert (flag.code.coding[0].system, flag.code.coding[0].code) == (SCT, PTX.value)
    assert flag.subject.identifier.value == SENTINEL_ID
    assert flag.period.start is not None
    extensions = {e.url.rsplit("/", 1)[-1]: e for e in flag.extension}
    assert extensions["flag-priority"].valueCodeableConcept.coding[0].code == "PH"
    assert extensions["flag-detail"].valueReference.reference == bundle.entry[0].fullUrl


def test_provenance_is_the_reproducibility_record() -> None:
    used = ModelUsed(
        name="cxr-pneumothorax",
        version="1.2.0",
        sha256="ab" * 32,
        provider="CPUExecutionProvider",
        card_version=2,
        preprocessing_version=2,
        code_version="pacs-triage 0.1.0",
        input_instances=["1.2.3.1", "1.2.3.2"],
    )
    result = make_result().model_copy(update={"models": [used]})
    bundle = round_trip(build_bundle(result, header(), now=NOW))
    record = provenance(bundle)
    assert record.recorded == NOW
    assert [e.what.identifier.value for e in record.entity] == ["urn:oid:1.2.3.1", "urn:oid:1.2.3.2"]
    assert [e.role for e in record.entity] == ["source", "source"]
    (agent,) = record.agent
    assert agent.who.type == "Device" and agent.type.coding[0].code == "performer"
    assert agent.who.display == (
        f"cxr-pneumothorax 1.2.0 (sha256 {'ab' * 32}; card v2, preprocessing v2; pacs-triage 0.1.0; "
        "CPUExecutionProvider; 2 instance(s))"
    )
    again = build_bundle(result, header(), now=NOW)
    assert again.entry[-1].fullUrl == bundle.entry[-1].fullUrl  # a retry PUTs the same id
    assert not [
        e
        for e in round_trip(build_bundle(make_result(), header(), now=NOW)).entry
        if isinstance(e.resource, Provenance)
    ]  # no model ran: nothing to record


def test_bundle_is_the_same_on_a_retry() -> None:
    first, again = (build_bundle(make_result(), header(), now=NOW).model_dump_json() for _ in range(2))
    assert first == again


def test_flag_follows_the_most_urgent_positive_finding() -> None:
    nodule = finding(
        PTX.model_copy(update={"value": "786838002", "meaning": "Pulmonary nodule"}), 0.99, "routine"
    )
    result = make_result().model_copy(update={"findings": [nodule, finding(PTX, 0.6, "urgent")]})
    _report, (flag,) = resources(round_trip(build_bundle(result, header(), now=NOW)))
    assert flag.code.coding[0].code == PTX.value
    assert flag.extension[0].valueCodeableConcept.coding[0].code == "PM"


def test_no_flag_without_a_positive_finding_or_a_patient() -> None:
    negative = make_result().model_copy(update={"findings": [finding(PTX, 0.1)], "priority": "routine"})
    report, flags = resources(round_trip(build_bundle(negative, header(), now=NOW)))
    assert flags == [] and report.conclusionCode is None
    report, flags = resources(round_trip(build_bundle(make_result(), None, now=NOW)))
    assert flags == [] and report.subject is None  # Flag.subject is required; the report goes anyway


def test_patient_without_issuer_uses_the_dicom_patient_id_system() -> None:
    report, _flags = resources(build_bundle(make_result(), make_dataset(), now=NOW))
    assert (report.subject.identifier.system, report.subject.identifier.value) == (
        PATIENT_ID_SYSTEM,
        SENTINEL_ID,
    )


# the sender against a loopback FHIR endpoint


def test_send_posts_fhir_json_to_the_base(
    fhir_factory: Callable[[list[str]], FHIRServer], header_file: Path
) -> None:
    server = fhir_factory(["ok"])
    send_fhir(notification(server.base + "/", header_file), NotifySettings(timeout_seconds=5))
    ((path, headers),) = server.requests
    assert path == "/fhir"
    assert headers["Content-Type"] == "application/fhir+json"
    assert not server.errors


@pytest.mark.parametrize(
    ("mode", "message"),
    [
        ("outcome", "HTTP 422: error: no Patient \\*\\*\\*"),
        ("entry-failed", "HTTP 200: entries 409 Conflict"),
    ],
)
def test_refusals_raise_without_phi(
    fhir_factory: Callable[[list[str]], FHIRServer], header_file: Path, mode: str, message: str
) -> None:
    server = fhir_factory([mode])
    with pytest.raises(FHIRError, match=message) as info:
        send_fhir(notification(server.base, header_file), NotifySettings(timeout_seconds=5))
    assert SENTINEL_ID not in str(info.value)


def test_nobody_listening_raises() -> None:
    with pytest.raises(FHIRError, match="ConnectError"):
        send_fhir(notification("http://127.0.0.1:9/fhir", None), NotifySettings(timeout_seconds=2))


@pytest.mark.parametrize("mode", ["nobody listening", "refused"])
def test_errors_never_show_the_base_urls_credentials(
    fhir_factory: Callable[[list[str]], FHIRServer], header_file: Path, mode: str
) -> None:
    """``notify.fhir_base_url`` may carry ``user:password@``: the error (logged, kept as the outbox's
    last_error) shows the scheme, host and a digest instead."""
    base = "http://127.0.0.1:9/fhir" if mode == "nobody listening" else fhir_factory(["outcome"]).base
    userinfo = "triage:" + "s3cret-pw"  # not one literal: tests/reliability/test_security.py scans for those
    with_secret = base.replace("http://", f"http://{userinfo}@")
    with pytest.raises(FHIRError) as info:
        send_fhir(notification(with_secret, header_file), NotifySettings(timeout_seconds=2))
    assert "s3cret-pw" not in str(info.value) and "triage:" not in str(info.value)
    assert "http://127.0.0.1" in str(info.value)


# through the app, beside HL7: both retried until accepted, audited, PHI kept out of the logs


@pytest.mark.anyio
async def test_result_reaches_fhir_and_the_ris(
    make_settings: Callable[..., Settings],
    fhir_factory: Callable[[list[str]], FHIRServer],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level("INFO")
    monkeypatch.setitem(notify.SENDERS, "hl7", send_hl7)
    monkeypatch.setitem(notify.SENDERS, "fhir", send_fhir)
    server = fhir_factory(["outcome", "ok"])
    ris = RIS(["AA"])
    try:
        settings = make_settings(
            notify={"fhir_base_url": server.base, "hl7_endpoints": [ris.endpoint], "backoff_seconds": 0.05}
        )
        async with running_app(settings) as (_app, client):
            body, ctype = multipart_related([chest()])
            r = await client.post(
                "/v1/studies", content=body, headers={"Content-Type": ctype, "Prefer": "wait=20"}
            )
            assert r.status_code == 200, r.text
            result = r.json()
            bundles = await asyncio.to_thread(server.wait, 2)
            await asyncio.to_thread(ris.wait, 1)
            notifications = await _wait_done(client)
            audit = (await client.get(f"/v1/studies/{result['study_uid']}/audit")).json()["events"]
    finally:
        ris.close()

    assert not server.errors and not ris.errors
    assert bundles[0].model_dump_json() == bundles[1].model_dump_json()  # the retry sent the same Bundle
    report, (flag,) = resources(bundles[-1])
    assert report.identifier[0].value == f"urn:uuid:{result['result_id']}"
    assert report.subject.identifier.value == SENTINEL_ID
    assert {o.code.coding[0].code for o in report.contained} == {
        f["code"]["value"] for f in result["findings"]
    }
    assert flag.code.coding[0].code == PTX.value
    record = provenance(bundles[-1])
    (model,) = [m for m in result["models"] if m["name"] == "cxr-pneumothorax"]
    assert model["input_instances"] and model["code_version"].startswith("pacs-triage ")
    inputs = {uid for m in result["models"] for uid in m["input_instances"]}
    assert {e.what.identifier.value for e in record.entity} == {f"urn:oid:{uid}" for uid in inputs}
    assert {e.what.identifier.system for e in record.entity} == {"urn:dicom:uid"}
    (agent,) = [a for a in record.agent if a.who.display.startswith("cxr-pneumothorax ")]
    assert model["sha256"] in agent.who.display and "card v1, preprocessing v1" in agent.who.display
    by_channel = {n["channel"]: n for n in notifications}
    assert by_channel["fhir"]["state"] == "done" and by_channel["fhir"]["attempts"] == 2
    assert by_channel["hl7"]["state"] == "done" and by_channel["hl7"]["attempts"] == 1
    assert [e["event"] for e in audit].count("notified") == 2
    text = caplog.text + " ".join(str(rec.args) for rec in caplog.records)
    assert "will retry" in text and "FHIR transaction for result" in text
    for secret in (SENTINEL_ID, SENTINEL_NAME, SENTINEL_ACCESSION, "Sentinel"):
        assert secret not in text


async def _wait_done(client: httpx.AsyncClient, timeout: float = 15) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    while True:
        notifications: list[dict[str, Any]] = (await client.get("/v1/notifications")).json()["notifications"]
        if notifications and all(n["state"] in ("done", "dead") for n in notifications):
            return notifications
        if time.monotonic() > deadline:
            raise AssertionError(f"notifications not finished: {notifications}")
        await asyncio.sleep(0.05)
