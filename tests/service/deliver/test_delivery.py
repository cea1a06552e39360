"""Rendering and the outbox in the running app: SR + preview per result, predecessors, retry, dead letters.

The destination here is a closed loopback port (a PACS that is down); delivery to a real Orthanc is in
tests/e2e/test_dicom_roundtrip.py.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydicom import dcmread
from pydicom.uid import generate_uid

from service.clock import utcnow
from service.config import Settings
from tests.peers import free_port
from tests.service.conftest import running_app
from tests.service.dicom_factory import chest, multipart_related
from tests.service.results.dciodvfy import run_dciodvfy

pytestmark = pytest.mark.anyio


@pytest.fixture
def down_settings(make_settings: Callable[..., Settings]) -> Settings:
    return make_settings(
        dicom={"enabled": False},
        delivery={
            "destinations": [f"PACS@127.0.0.1:{free_port()}"],
            "max_attempts": 2,
            "backoff_seconds": 0.05,
        },
    )


async def _post(client: httpx.AsyncClient, *parts: bytes) -> dict[str, Any]:
    body, ctype = multipart_related(list(parts))
    r = await client.post("/v1/studies", content=body, headers={"Content-Type": ctype, "Prefer": "wait=20"})
    assert r.status_code == 200, r.text
    return r.json()


async def _deliveries(client: httpx.AsyncClient, state: str, n: int, timeout: float = 20) -> list[dict]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = (await client.get("/v1/deliveries", params={"state": state} if state else {})).json()[
            "deliveries"
        ]
        if len(got) >= n:
            return got
        await asyncio.sleep(0.05)
    raise AssertionError(f"fewer than {n} deliveries in state {state}: {got}")


def _outputs(settings: Settings) -> list[Path]:
    return sorted(settings.outputs_dir.rglob("*.dcm"))


async def test_dead_letter_and_requeue(down_settings: Settings) -> None:
    async with running_app(down_settings) as (_app, client):
        await _post(client, chest())
        dead = await _deliveries(client, "dead", 2)
        assert {d["kind"] for d in dead} == {"sr", "preview"}
        assert all(d["attempts"] == 2 and d["last_error"] for d in dead)
        r = await client.post(f"/v1/deliveries/{dead[0]['id']}/retry")
        assert r.status_code == 200 and r.json()["state"] == "pending" and r.json()["attempts"] == 0
        audit = (await client.get(f"/v1/studies/{dead[0]['study_uid']}/audit")).json()["events"]
        requeued = [e for e in audit if e["event"] == "delivery_requeued"]
        assert [(e["actor"], e["detail"]["delivery_id"]) for e in requeued] == [("anonymous", dead[0]["id"])]
        missing = await client.post("/v1/deliveries/999999/retry")
        assert missing.status_code == 404
        assert missing.headers["content-type"].startswith("application/problem+json")
    for path in _outputs(down_settings):
        errors, report = run_dciodvfy(path)
        assert errors == 0, report


async def test_late_image_rerun_sr_names_its_predecessor(down_settings: Settings) -> None:
    study = generate_uid()
    async with running_app(down_settings) as (_app, client):
        first = await _post(client, chest(study_uid=study))
        await _deliveries(client, "", 2)
        second = await _post(client, chest(study_uid=study))
        assert second["supersedes"] == first["result_id"]
        await _deliveries(client, "", 4)
    srs = sorted(
        (dcmread(p) for p in _outputs(down_settings) if "SR" in dcmread(p).Modality),
        key=lambda d: str(d.ContentTime),
    )
    assert len(srs) == 2
    old, new = sorted(srs, key=lambda d: "PredecessorDocumentsSequence" in d)
    (ref,) = new.PredecessorDocumentsSequence
    assert ref.StudyInstanceUID == study
    assert (
        ref.ReferencedSeriesSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID
        == old.SOPInstanceUID
    )


async def test_no_destination_renders_nothing(make_settings: Callable[..., Settings]) -> None:
    settings = make_settings(dicom={"enabled": False})
    async with running_app(settings) as (_app, client):
        await _post(client, chest())
        await asyncio.sleep(0.3)
        assert (await client.get("/v1/deliveries")).json()["deliveries"] == []
    assert _outputs(settings) == []


async def test_outbox_survives_restart_and_delivers_once(
    make_settings: Callable[..., Settings], storescp_factory: Any
) -> None:
    """Results queued while the PACS is down are sent by the next process, once each."""
    port = free_port()
    settings = make_settings(
        dicom={"enabled": False},
        delivery={"destinations": [f"PACS@127.0.0.1:{port}"], "backoff_seconds": 0.05, "max_attempts": 100},
    )
    async with running_app(settings) as (_app, client):
        await _post(client, chest())
        await _deliveries(client, "pending", 2)
    scp = await asyncio.to_thread(storescp_factory, aet="PACS", port=port)
    async with running_app(settings) as (_app, client):
        done = await _deliveries(client, "done", 2)
        assert {d["kind"] for d in done} == {"sr", "preview"}
        await asyncio.sleep(0.3)  # a second send would show up as a third file
    received = await asyncio.to_thread(scp.wait_for_files, 2)
    assert sorted(dcmread(f).SOPInstanceUID for f in received) == sorted(d["sop_instance_uid"] for d in done)


async def test_a_destination_that_is_down_is_logged_once_and_its_recovery_once(
    make_settings: Callable[..., Settings], storescp_factory: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """Three results' objects retried every 50 ms while the PACS is down: one WARNING for the destination,
    not one per object and attempt; one INFO once it takes them."""
    port = free_port()
    settings = make_settings(
        dicom={"enabled": False},
        delivery={"destinations": [f"PACS@127.0.0.1:{port}"], "backoff_seconds": 0.05, "max_attempts": 100},
    )
    caplog.set_level(logging.INFO, logger="service.deliver.dicom")
    async with running_app(settings) as (_app, client):
        for _ in range(3):
            await _post(client, chest())
        deadline = time.monotonic() + 30
        while True:  # every object tried at least three times
            pending = await _deliveries(client, "pending", 6)
            if min(d["attempts"] for d in pending) >= 3:
                break
            assert time.monotonic() < deadline, pending
            await asyncio.sleep(0.05)
        scp = await asyncio.to_thread(storescp_factory, aet="PACS", port=port)
        await _deliveries(client, "done", 6, timeout=30)
    await asyncio.to_thread(scp.wait_for_files, 6)
    lines = [r for r in caplog.records if r.name == "service.deliver.dicom" and "PACS@127.0.0.1" in r.message]
    assert [r.levelname for r in lines if "failing" in r.message] == ["WARNING"], [r.message for r in lines]
    assert [r.levelname for r in lines if "recovered" in r.message] == ["INFO"]


async def test_urgent_results_are_sent_first(make_settings: Callable[..., Settings]) -> None:
    """With a backlog for one destination, stat objects are claimed before routine ones."""
    from service.store.outbox import NewOutput
    from service.store.validate import parse_instance
    from tests.service.store.kit import open_kit

    settings = make_settings()
    settings.data_dir.mkdir(parents=True)
    kit = open_kit(settings.database_url, settings.data_dir)
    outbox = kit.outbox
    try:
        for priority in ("routine", "stat", "urgent", "routine"):
            inst = parse_instance(chest(), "part 1")
            await kit.instances.ingest([inst], not_before=utcnow())
            job = await kit.jobs.claim()
            assert job is not None
            result = await kit.finish(job, result_id=generate_uid(), priority=priority, findings=True)
            uid = generate_uid()
            out = NewOutput(uid, generate_uid(), "1.2.840.10008.5.1.4.1.1.88.34", "sr", f"{uid}.dcm")
            await outbox.record(result, [out], ["PACS@127.0.0.1:104"])
        claimed = await outbox.claim(limit=10)
        assert [d.priority for d in claimed] == [0, 1, 2, 2]
    finally:
        kit.close()
