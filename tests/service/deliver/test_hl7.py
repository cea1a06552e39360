"""HL7 v2 ORU^R01 over MLLP, tested against a real MLLP listener (hl7apy's MLLPServer) that parses what we
send in STRICT validation and answers real ACKs; the builder and the ACK reader also on their own."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from hl7apy.consts import VALIDATION_LEVEL
from hl7apy.core import Message
from hl7apy.mllp import AbstractHandler, MLLPServer
from hl7apy.parser import parse_message

from service.config import NotifySettings, Settings
from service.deliver import notify
from service.deliver.hl7 import build_oru, control_id, parse_ack, send_hl7
from service.errors import HL7Error
from tests.service.conftest import running_app
from tests.service.deliver.messages import NOW, header, make_result, notification
from tests.service.dicom_factory import (
    SENTINEL_ACCESSION,
    SENTINEL_ID,
    SENTINEL_NAME,
    chest,
    multipart_related,
)


def parse(er7: str) -> Message:
    return parse_message(
        er7, validation_level=VALIDATION_LEVEL.STRICT, find_groups=True, force_validation=True
    )


def order_of(msg: Message) -> Any:
    return msg.oru_r01_patient_result.oru_r01_order_observation


class RIS:
    """hl7apy's MLLP listener on loopback. Each ORU^R01 is parsed with STRICT validation and answered as
    ``script`` says for that attempt (the last entry repeats): "AA", "AE" (naming the patient, as some RIS
    do, to check it is redacted), or "silent" (no answer until the test ends: a timeout)."""

    def __init__(self, script: list[str]) -> None:
        self.script = script
        self.received: list[Message] = []
        self.errors: list[str] = []
        self.release = threading.Event()
        ris = self

        class Handler(AbstractHandler):
            def reply(self) -> str:
                try:
                    msg = parse(self.incoming_message)
                except Exception as exc:  # a refused message is answered AR and recorded
                    ris.errors.append(f"{type(exc).__name__}: {exc}")
                    return ack("AR", "", str(exc))
                ris.received.append(msg)
                mode = ris.script[min(len(ris.received), len(ris.script)) - 1]
                control = msg.msh.msh_10.to_er7()
                if mode == "silent":
                    ris.release.wait(10)
                    raise ConnectionAbortedError("never answered")  # the server closes without a reply
                patient = msg.oru_r01_patient_result.oru_r01_patient.pid.pid_3.cx_1.to_er7()
                return ack(mode, control, f"unknown patient {patient}" if mode != "AA" else "")

        self.server = MLLPServer("127.0.0.1", 0, {"ORU^R01^ORU_R01": (Handler,)}, timeout=5)
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.server.server_address[1]}"

    def wait(self, n: int, timeout: float = 15) -> list[Message]:
        deadline = time.monotonic() + timeout
        while len(self.received) < n and time.monotonic() < deadline:
            time.sleep(0.02)
        return list(self.received)

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


def ack(code: str, control: str, text: str) -> str:
    msg = Message("ACK", version="2.5.1", validation_level=VALIDATION_LEVEL.STRICT)
    msg.msh.msh_3, msg.msh.msh_5 = "RIS", "PACS_TRIAGE"
    msg.msh.msh_9, msg.msh.msh_10, msg.msh.msh_11 = "ACK^R01^ACK", f"ACK{control}", "P"
    msg.msa.msa_1, msg.msa.msa_2 = code, control
    if text:
        msg.msa.msa_3 = text
    return str(msg.to_mllp())


@pytest.fixture
def ris_factory() -> Iterator[Callable[[list[str]], RIS]]:
    servers: list[RIS] = []

    def start(script: list[str]) -> RIS:
        servers.append(RIS(script))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


# the builder, no network


def test_oru_is_valid_and_carries_patient_order_and_findings() -> None:
    msg = parse(build_oru(make_result(), header(), control="PT41-abcdef", now=NOW).to_er7())
    assert msg.msh.msh_3.to_er7() == "PACS_TRIAGE"
    assert msg.msh.msh_9.to_er7() == "ORU^R01^ORU_R01"
    assert (msg.msh.msh_10.to_er7(), msg.msh.msh_12.to_er7()) == ("PT41-abcdef", "2.5.1")
    pid = msg.oru_r01_patient_result.oru_r01_patient.pid
    assert pid.pid_3.to_er7() == f"{SENTINEL_ID}^^^HOSP&1.2.3.4.5&ISO^MR"
    assert pid.pid_5.xpn_1.to_er7() == SENTINEL_NAME.split("^")[0]
    assert (pid.pid_7.to_er7(), pid.pid_8.to_er7()) == ("19010101", "F")
    order = order_of(msg)
    assert order.orc.orc_1.to_er7() == "RE"
    assert order.orc.orc_3.to_er7() == order.obr.obr_3.to_er7() == SENTINEL_ACCESSION
    assert order.obr.obr_4.ce_2.value == "XR CHEST PA\\F\\LAT"  # escaped on the wire
    assert order.obr.obr_7.to_er7() == "20250304050000"
    assert (order.obr.obr_25.to_er7(), order.obr.obr_24.to_er7()) == ("P", "RAD")
    assert order.nte.nte_3.to_er7() == "AI result, not for diagnostic use"
    obx = [o.obx for o in order.oru_r01_observation]
    assert [o.obx_2.to_er7() for o in obx] == ["CWE", "NM", "CWE", "NM"]
    assert [o.obx_3.to_er7() for o in obx[::2]] == [
        "36118008^Pneumothorax^SCT",
        "786838002^Pulmonary nodule^SCT",
    ]
    assert [o.obx_5.to_er7() for o in obx[::2]] == ["52101004^Present^SCT", "2667000^Absent^SCT"]
    assert [o.obx_5.to_er7() for o in obx[1::2]] == ["0.9300", "0.1200"]
    assert [o.obx_4.to_er7() for o in obx] == ["1", "1", "2", "2"]  # the NM belongs to its finding
    assert {o.obx_11.to_er7() for o in obx} == {"P"}
    assert {o.obx_17.to_er7() for o in obx} == {"cxr-pneumothorax^cxr-pneumothorax 1.2.0^L"}
    assert {o.obx_18.to_er7() for o in obx} == {"cxr-pneumothorax-1.2.0^PACS_TRIAGE"}
    assert obx[0].obx_8.to_er7() == "A" and obx[2].obx_8.to_er7() == "N"


@pytest.mark.parametrize(("priority", "code"), [("stat", "S"), ("urgent", "A"), ("routine", "R")])
def test_priority_in_orc7_obr27_and_tq1(priority: str, code: str) -> None:
    order = order_of(parse(build_oru(make_result(priority), header(), control="c", now=NOW).to_er7()))
    assert order.orc.orc_7.tq_6.to_er7() == code
    assert order.obr.obr_27.tq_6.to_er7() == code
    assert order.oru_r01_timing_qty.tq1.tq1_9.cwe_1.to_er7() == code


def test_without_a_header_the_optional_patient_group_is_left_out() -> None:
    msg = parse(build_oru(make_result(), None, control="c", now=NOW).to_er7())
    assert [c.name for c in msg.oru_r01_patient_result.children] == ["ORU_R01_ORDER_OBSERVATION"]
    assert order_of(msg).obr.obr_3.to_er7() == f"{make_result().result_id}^PACS_TRIAGE"


def test_control_id_is_attempt_independent_and_fits_msh10() -> None:
    n = notification("h:1", None)
    retry = dataclasses.replace(n, attempts=3)
    other = notification("h:1", None, make_result(result_id="another"))
    assert control_id(n) == control_id(retry) != control_id(other)
    assert control_id(n).startswith("PT41-") and len(control_id(n)) <= 20


@pytest.mark.parametrize(
    ("ack_text", "outcome"),
    [
        ("MSH|^~\\&|RIS||||20250101||ACK^R01^ACK|1|P|2.5.1\rMSA|AA|C1", "AA"),
        ("MSH|^~\\&|RIS||||20250101||ACK|1|P|2.9\rMSA|CA|C1\r", "CA"),  # a version hl7apy does not know
        ("MSH|^~\\&|RIS||||20250101||ACK|1|P|2.3\rMSA|AE|C1|bad \\F\\ OBX\r", "AE: bad | OBX"),
        (
            "MSH|^~\\&|RIS||||20250101||ACK|1|P|2.5\rMSA|AR|C1\rERR||||E||||no such order\r",
            "AR: no such order",
        ),
        ("MSH|^~\\&|RIS||||20250101||ACK|1|P|2.5\rMSA|CE|C1\r", "CE: no reason given"),
        ("MSH|^~\\&|RIS||||20250101||ACK|1|P|2.5\rMSA|AA|C2\r", "control id 'C2'"),
        ("MSH|^~\\&|RIS||||20250101||ACK|1|P|2.5\r", "no MSA"),
        ("garbage", "not an HL7 message"),
    ],
)
def test_parse_ack(ack_text: str, outcome: str) -> None:
    if outcome in ("AA", "CA"):
        assert parse_ack(ack_text, "C1") == outcome
    else:
        with pytest.raises(HL7Error, match=outcome.replace("|", "\\|")):
            parse_ack(ack_text, "C1")


# the sender against a real MLLP listener


def test_send_is_acknowledged(ris_factory: Callable[[list[str]], RIS], header_file: Path) -> None:
    ris = ris_factory(["AA"])
    send_hl7(notification(ris.endpoint, header_file), NotifySettings(timeout_seconds=5))
    (msg,) = ris.received
    assert msg.msh.msh_10.to_er7() == control_id(notification(ris.endpoint, header_file))
    assert not ris.errors


def test_rejection_raises_with_the_reason_redacted(
    ris_factory: Callable[[list[str]], RIS], header_file: Path
) -> None:
    ris = ris_factory(["AE"])
    with pytest.raises(HL7Error, match="AE: unknown patient \\*\\*\\*") as info:
        send_hl7(notification(ris.endpoint, header_file), NotifySettings(timeout_seconds=5))
    assert SENTINEL_ID not in str(info.value)


def test_silence_is_a_timeout(ris_factory: Callable[[list[str]], RIS], header_file: Path) -> None:
    ris = ris_factory(["silent"])
    with pytest.raises(HL7Error, match="no ACK within 0.3 s"):
        send_hl7(notification(ris.endpoint, header_file), NotifySettings(timeout_seconds=0.3))


def test_nobody_listening_raises() -> None:
    with pytest.raises(HL7Error, match="127.0.0.1:9: ConnectionRefusedError"):
        send_hl7(notification("127.0.0.1:9", None), NotifySettings(timeout_seconds=2))


# through the app: the outbox retries with the same control id until the RIS accepts


@pytest.mark.anyio
async def test_result_reaches_the_ris_after_a_rejection_and_a_timeout(
    make_settings: Callable[..., Settings],
    ris_factory: Callable[[list[str]], RIS],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    monkeypatch.setitem(notify.SENDERS, "hl7", send_hl7)
    ris = ris_factory(["AE", "silent", "AA"])
    settings = make_settings(
        # 2 s: a loaded CI machine must not turn the RIS's AA into one more timeout
        notify={"hl7_endpoints": [ris.endpoint], "backoff_seconds": 0.05, "timeout_seconds": 2.0}
    )
    async with running_app(settings) as (_app, client):
        body, ctype = multipart_related([chest()])
        r = await client.post(
            "/v1/studies", content=body, headers={"Content-Type": ctype, "Prefer": "wait=20"}
        )
        assert r.status_code == 200, r.text
        result = r.json()
        assert result["priority"] == "stat"
        got = await asyncio.to_thread(ris.wait, 3)
        notifications = await _wait_done(client)
        audit = (await client.get(f"/v1/studies/{result['study_uid']}/audit")).json()["events"]

    assert not ris.errors
    assert len(got) >= 3  # AE, no answer, AA (a reply slower than the timeout adds an attempt)
    assert len({m.msh.msh_10.to_er7() for m in got}) == 1  # every attempt carries the same control id
    msg = got[-1]
    assert msg.oru_r01_patient_result.oru_r01_patient.pid.pid_3.cx_1.to_er7() == SENTINEL_ID
    order = order_of(msg)
    assert order.orc.orc_7.tq_6.to_er7() == "S" and order.obr.obr_27.tq_6.to_er7() == "S"
    assert order.obr.obr_3.to_er7() == SENTINEL_ACCESSION
    cwe = [o.obx for o in order.oru_r01_observation if o.obx.obx_2.to_er7() == "CWE"]
    assert {o.obx_3.ce_1.to_er7() for o in cwe} == {f["code"]["value"] for f in result["findings"]}
    (n,) = [n for n in notifications if n["channel"] == "hl7"]
    assert (n["state"], n["target"]) == ("done", ris.endpoint) and n["attempts"] >= 3
    events = [e["event"] for e in audit]
    assert events.count("notified") == 1
    text = caplog.text + " ".join(str(rec.args) for rec in caplog.records)
    assert "will retry" in text and "acknowledged by" in text
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
