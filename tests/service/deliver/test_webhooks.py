"""Webhooks and escalation against a real HTTP receiver on loopback: signed, retried, audited, no PHI."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest

from service.config import Settings
from service.deliver.webhook import sign
from tests.service.conftest import running_app
from tests.service.dicom_factory import (
    SENTINEL_ACCESSION,
    SENTINEL_ID,
    SENTINEL_NAME,
    chest,
    multipart_related,
)

pytestmark = pytest.mark.anyio

SECRET = "webhook-test-secret"


class Receiver:
    """A threaded HTTP server that records POSTs; ``fail_first`` answers 500 that many times first."""

    def __init__(self, fail_first: int = 0) -> None:
        self.requests: list[tuple[str, dict[str, str], bytes]] = []
        self.fail_first = fail_first
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's naming
                body = self.rfile.read(int(self.headers["Content-Length"]))
                receiver.requests.append((self.path, dict(self.headers), body))
                failing = receiver.fail_first > 0
                receiver.fail_first -= 1
                self.send_response(500 if failing else 204)
                self.end_headers()

            def log_message(self, *_args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}{path}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def wait(self, n: int, timeout: float = 15) -> list[tuple[str, dict[str, str], bytes]]:
        deadline = time.monotonic() + timeout
        while len(self.requests) < n and time.monotonic() < deadline:
            time.sleep(0.02)
        return list(self.requests)


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver(fail_first=2)
    yield r
    r.close()


async def _post(client: httpx.AsyncClient, data: bytes) -> dict[str, Any]:
    body, ctype = multipart_related([data])
    r = await client.post("/v1/studies", content=body, headers={"Content-Type": ctype, "Prefer": "wait=20"})
    assert r.status_code == 200, r.text
    return r.json()


async def test_urgent_flag_webhook_signed_retried_and_escalated(
    make_settings: Callable[..., Settings], receiver: Receiver
) -> None:
    settings = make_settings(
        notify={
            "webhooks": [receiver.url("/flags")],
            "webhook_secret": SECRET,
            "escalation_minutes": 0.02,  # 1.2 s
            "escalation_webhooks": [receiver.url("/escalate")],
            "backoff_seconds": 0.05,
        }
    )
    async with running_app(settings) as (_app, client):
        acked = await _post(client, chest())  # stat with the tiny models
        assert acked["priority"] == "stat"
        r = await client.post(f"/v1/studies/{acked['study_uid']}/acknowledge", json={"by": "dr.jones"})
        assert r.status_code == 200
        ignored = await _post(client, chest())
        routine = await _post(client, chest(pixels=None, value=0.0))
        assert routine["priority"] == "routine"  # no webhook for it
        got = await asyncio.to_thread(receiver.wait, 2 + 2 + 1)  # 2 failures, 2 flags, 1 escalation
        await asyncio.sleep(0.5)  # nothing else may arrive
        got = list(receiver.requests)
        audit = (await client.get(f"/v1/studies/{ignored['study_uid']}/audit")).json()["events"]
        notifications = (await client.get("/v1/notifications")).json()["notifications"]

    flags = [(h, json.loads(b)) for path, h, b in got if path == "/flags"]
    escalations = [json.loads(b) for path, _h, b in got if path == "/escalate"]
    # two failed attempts were retried with the same delivery id; each flag arrived, once per success
    assert {p["study_uid"] for _h, p in flags} == {acked["study_uid"], ignored["study_uid"]}
    assert len(flags) == 4
    by_delivery: dict[str, int] = {}
    for headers, p in flags:
        by_delivery[headers["X-PACS-Triage-Delivery"]] = (
            by_delivery.get(headers["X-PACS-Triage-Delivery"], 0) + 1
        )
        assert p["event"] == "urgent_finding" and p["priority"] == "stat"
        assert p["findings"] and all(f["probability"] > 0 for f in p["findings"])
    assert sorted(by_delivery.values()) in ([1, 3], [2, 2])  # 2 failures spread over the 2 notifications
    for _path, headers, body in got:
        expected = sign(SECRET, headers["X-PACS-Triage-Timestamp"], body)
        assert headers["X-PACS-Triage-Signature"] == expected
        text = body.decode()
        assert SENTINEL_NAME not in text and SENTINEL_ID not in text
    # only the unacknowledged stat study is escalated
    assert [e["study_uid"] for e in escalations] == [ignored["study_uid"]]
    assert escalations[0]["event"] == "escalation"
    events = [e["event"] for e in audit]
    assert events[0] == "flagged" and "escalated" in events and events.count("notified") == 2
    assert {n["state"] for n in notifications} == {"done"}
    assert SENTINEL_ACCESSION == acked["accession_number"]  # the API may show it; logs never do


async def test_dead_webhook_is_dead_lettered_and_audited(make_settings: Callable[..., Settings]) -> None:
    settings = make_settings(
        notify={
            "webhooks": ["http://127.0.0.1:9/nothing-listens"],
            "max_attempts": 2,
            "backoff_seconds": 0.05,
        }
    )
    async with running_app(settings) as (_app, client):
        flagged = await _post(client, chest())
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            dead = (await client.get("/v1/notifications", params={"state": "dead"})).json()["notifications"]
            if dead:
                break
            await asyncio.sleep(0.05)
        assert dead and dead[0]["attempts"] == 2 and dead[0]["last_error"]
        events = [
            e["event"]
            for e in (await client.get(f"/v1/studies/{flagged['study_uid']}/audit")).json()["events"]
        ]
        assert events == ["flagged", "notify_failed"]
