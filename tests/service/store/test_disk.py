"""The service looks after its disk: high watermark (507 / 0xA700), instances per study (413), retention."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import timedelta
from io import BytesIO
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.uid import generate_uid
from pynetdicom import AE

from service.config import Settings
from service.results.schema import StudyResult
from service.store.db import utcnow
from service.store.repository import Store
from service.store.retention import Retention
from service.store.validate import parse_instance
from tests.service.conftest import running_app
from tests.service.dicom_factory import chest, multipart_related

pytestmark = pytest.mark.anyio


def _c_store(port: int, data: bytes) -> int:
    ds = dcmread(BytesIO(data))
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(ds.SOPClassUID, [ds.file_meta.TransferSyntaxUID])
    assoc = ae.associate("127.0.0.1", port, ae_title="PACS_TRIAGE")
    assert assoc.is_established
    try:
        return int(assoc.send_c_store(ds).Status)
    finally:
        assoc.release()


async def test_above_the_high_watermark_new_instances_are_refused_and_old_ones_kept(
    make_settings: Callable[..., Settings],
) -> None:
    study = generate_uid()
    settings = make_settings(dicom={"host": "127.0.0.1", "port": 0})
    async with running_app(settings) as (_app, client):
        body, ctype = multipart_related([chest(study_uid=study)])
        assert (
            await client.post("/v1/studies", content=body, headers={"Content-Type": ctype})
        ).status_code == 202
    # the same data directory, now with a watermark the disk is above (any disk is more than 0.01 % used);
    # set once the app is up, since /healthz/ready (which running_app waits for) says 503 over it
    full = make_settings(dicom={"host": "127.0.0.1", "port": 0})
    async with running_app(full) as (app, client):
        app.state.triage.store.disk_high_watermark = 0.0001
        assert (await client.get("/healthz/ready")).status_code == 503
        body, ctype = multipart_related([chest(study_uid=study)])
        r = await client.post("/v1/studies", content=body, headers={"Content-Type": ctype})
        assert r.status_code == 507
        assert r.headers["content-type"].startswith("application/problem+json")
        assert "watermark" in r.json()["detail"]
        port = app.state.triage.listener.port
        assert await asyncio.to_thread(_c_store, port, chest(study_uid=study)) == 0xA700
        assert len(await app.state.triage.store.instances(study)) == 1  # what was acknowledged stays
    assert len(list(full.instances_dir.rglob("*.dcm"))) == 1


async def test_instances_per_study_limit(make_settings: Callable[..., Settings]) -> None:
    study = generate_uid()
    settings = make_settings(api={"max_instances_per_study": 2}, dicom={"host": "127.0.0.1", "port": 0})
    async with running_app(settings) as (app, client):
        body, ctype = multipart_related([chest(study_uid=study), chest(study_uid=study)])
        assert (
            await client.post("/v1/studies", content=body, headers={"Content-Type": ctype})
        ).status_code == 202
        body, ctype = multipart_related([chest(study_uid=study)])
        r = await client.post("/v1/studies", content=body, headers={"Content-Type": ctype})
        assert r.status_code == 413 and r.json()["type"].endswith("/study-too-large")
        assert (
            await asyncio.to_thread(_c_store, app.state.triage.listener.port, chest(study_uid=study))
            == 0xA700
        )
        other = multipart_related([chest()])
        assert (
            await client.post("/v1/studies", content=other[0], headers={"Content-Type": other[1]})
        ).status_code == 202
    assert len(list((settings.instances_dir / study).rglob("*.dcm"))) == 2


async def test_retention_removes_only_finished_old_studies(tmp_path: Path) -> None:
    store = Store(f"sqlite:///{tmp_path / 'db.sqlite'}", tmp_path / "instances")
    retention = Retention(store, tmp_path / "outputs", instance_days=7, interval=3600)
    try:
        done, waiting = parse_instance(chest(), "a"), parse_instance(chest(), "b")
        await store.ingest([done], not_before=utcnow())
        job = await store.claim()
        assert job is not None and job.study_uid == done.study_uid
        await store.save_result(
            job.id,
            lambda prev, _st: StudyResult(
                result_id="r1", study_uid=done.study_uid, status="not_analysed", priority="routine"
            ),
        )
        await store.ingest([waiting], not_before=utcnow() + timedelta(days=30))  # job still pending
        assert await retention.sweep() == 0  # nothing is old enough yet
        assert await retention.sweep(now=utcnow() + timedelta(days=8)) == 1
        assert not (store.instances_dir / done.study_uid).exists()
        assert await store.instances(done.study_uid) == []
        assert (await store.study_status(done.study_uid)).result is not None  # the result stays
        assert len(await store.instances(waiting.study_uid)) == 1
        assert (store.instances_dir / waiting.study_uid).exists()
        # a late image re-opens the purged study as usual
        late = parse_instance(chest(study_uid=done.study_uid), "c")
        await store.ingest([late], not_before=utcnow())
        assert [r.sop_instance_uid for r in await store.instances(done.study_uid)] == [late.sop_instance_uid]
    finally:
        store.close()


async def test_retention_waits_for_delivery(tmp_path: Path) -> None:
    """A study whose SR is not delivered (pending or dead-lettered) keeps its images; delivered, it goes."""
    from service.store.outbox import NewOutput, Outbox

    store = Store(f"sqlite:///{tmp_path / 'db.sqlite'}", tmp_path / "instances")
    outbox = Outbox(store, tmp_path / "outputs")
    retention = Retention(store, tmp_path / "outputs", instance_days=1, interval=3600)
    later = utcnow() + timedelta(days=2)
    try:
        inst = parse_instance(chest(), "a")
        await store.ingest([inst], not_before=utcnow())
        job = await store.claim()
        assert job is not None
        result = await store.save_result(
            job.id,
            lambda prev, _st: StudyResult(
                result_id="r1", study_uid=inst.study_uid, status="complete", priority="stat"
            ),
        )
        sr_path = outbox.outputs_dir / inst.study_uid / "sr.dcm"
        sr_path.parent.mkdir(parents=True)
        sr_path.write_bytes(b"SR")
        out = NewOutput(
            generate_uid(), generate_uid(), "1.2.840.10008.5.1.4.1.1.88.34", "sr", f"{inst.study_uid}/sr.dcm"
        )
        await outbox.record(result, [out], ["PACS@127.0.0.1:104"])
        assert await retention.sweep(now=later) == 0  # pending
        (d,) = await outbox.claim()
        await outbox.finish(d.id, error="down", max_attempts=1, backoff=1, backoff_max=1)
        assert await retention.sweep(now=later) == 0  # dead-lettered: someone will want to re-send it
        await outbox.requeue(d.id)
        (d,) = await outbox.claim()
        await outbox.finish(d.id, error=None, max_attempts=1, backoff=1, backoff_max=1)
        assert await retention.sweep(now=later) == 1
        assert not sr_path.exists() and not (store.instances_dir / inst.study_uid).exists()
    finally:
        store.close()


def test_partial_writes_left_by_a_crash_are_removed(tmp_path: Path) -> None:
    from service.store.files import remove_partial_writes

    series = tmp_path / "1.2" / "3.4"
    series.mkdir(parents=True)
    (series / ".incoming-abc.tmp").write_bytes(b"half an instance")
    (series / "5.6.dcm").write_bytes(b"a whole one")
    assert remove_partial_writes(tmp_path) == 1
    assert [p.name for p in series.iterdir()] == ["5.6.dcm"]
