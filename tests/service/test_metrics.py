"""Metrics: one private registry per instance, so several apps can live in one process; the families
an admin expects (process, build, request latency, models, deliveries, notifications, queue age)."""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from pydicom.uid import generate_uid

from service.config import Settings
from service.inference.registry import ModelRegistry
from service.metrics import Metrics
from tests.peers.dcmtk import StoreSCPFactory
from tests.service.conftest import running_app
from tests.service.dicom_factory import chest, multipart_related


class TestMetrics:
    def test_two_instances_do_not_collide(self) -> None:
        first, second = Metrics(), Metrics()
        first.requests.labels(route="/v1/studies", method="POST", status="202").inc()
        assert (
            first.registry.get_sample_value(
                "pacs_triage_requests_total", {"route": "/v1/studies", "method": "POST", "status": "202"}
            )
            == 1.0
        )
        assert (
            second.registry.get_sample_value(
                "pacs_triage_requests_total", {"route": "/v1/studies", "method": "POST", "status": "202"}
            )
            is None
        )

    def test_engine_protocol_and_render(self) -> None:
        metrics = Metrics()
        metrics.observe_batch("cxr-nodule", 4, 0.012)
        metrics.set_queue_depth("cxr-nodule", 3)
        metrics.time_to_result.labels(priority="stat").observe(2.5)
        metrics.instances_received.labels(source="rest").inc(2)
        body, content_type = metrics.render()
        assert content_type.startswith("text/plain")
        text = body.decode()
        assert 'pacs_triage_inference_batch_size_bucket{le="4.0",model="cxr-nodule"} 1.0' in text
        assert 'pacs_triage_inference_queue_depth{model="cxr-nodule"} 3.0' in text
        assert 'pacs_triage_inference_seconds_count{model="cxr-nodule"} 1.0' in text
        assert 'pacs_triage_time_to_result_seconds_count{priority="stat"} 1.0' in text
        assert 'pacs_triage_instances_received_total{source="rest"} 2.0' in text

    def test_process_platform_gc_and_build_info(self) -> None:
        text = Metrics().render()[0].decode()
        for family in ("process_resident_memory_bytes", "process_cpu_seconds_total", "python_info"):
            assert f"\n{family}" in text or text.startswith(family), family
        assert "python_gc_objects_collected_total" in text
        (line,) = [ln for ln in text.splitlines() if ln.startswith("pacs_triage_build_info{")]
        assert 'onnxruntime_build="' in line and 'python="' in line and 'pynetdicom="' in line

    def test_request_histogram_by_route_template(self) -> None:
        metrics = Metrics()
        metrics.observe_request("/v1/studies/{study_uid}/result", "GET", 200, 0.03)
        sample = metrics.registry.get_sample_value
        labels = {"route": "/v1/studies/{study_uid}/result", "method": "GET"}
        assert sample("pacs_triage_http_request_duration_seconds_count", labels) == 1.0
        assert sample("pacs_triage_http_request_duration_seconds_bucket", {**labels, "le": "0.05"}) == 1.0
        assert sample("pacs_triage_http_request_duration_seconds_bucket", {**labels, "le": "0.025"}) == 0.0
        assert sample("pacs_triage_requests_total", {**labels, "status": "200"}) == 1.0

    def test_models_up_and_info(self, tiny_models_dir: Path, tmp_path: Path) -> None:
        models = tmp_path / "models"
        shutil.copytree(tiny_models_dir, models)
        (models / "cxr-nodule" / "card.json").write_text("{}")  # fails to load
        registry = ModelRegistry.from_directory(models)
        metrics = Metrics()
        metrics.set_models(registry, {"cxr-pneumothorax": ["CPUExecutionProvider"]})
        sample = metrics.registry.get_sample_value
        assert sample("pacs_triage_model_up", {"model": "cxr-pneumothorax"}) == 1.0
        assert sample("pacs_triage_model_up", {"model": "ct-hemorrhage"}) == 0.0  # loaded, not started
        assert sample("pacs_triage_model_up", {"model": "cxr-nodule"}) == 0.0  # failed to load
        card = registry.models["cxr-pneumothorax"].card
        info = {"model": card.name, "version": card.version, "sha256": card.sha256}
        assert sample("pacs_triage_model_info", {**info, "providers": "CPUExecutionProvider"}) == 1.0
        metrics.set_models(registry, {})  # a scrape after the model stopped: no stale info series
        assert sample("pacs_triage_model_info", {**info, "providers": "CPUExecutionProvider"}) is None

    def test_oldest_waiting_job_age(self) -> None:
        metrics = Metrics()
        now = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
        metrics.set_oldest_due(now - timedelta(seconds=90), now)
        assert metrics.registry.get_sample_value("pacs_triage_oldest_waiting_job_age_seconds") == 90.0
        metrics.set_oldest_due(now + timedelta(seconds=5), now)  # pending but not yet due: nobody waits
        assert metrics.registry.get_sample_value("pacs_triage_oldest_waiting_job_age_seconds") == 0.0
        metrics.set_oldest_due(None, now)
        assert metrics.registry.get_sample_value("pacs_triage_oldest_waiting_job_age_seconds") == 0.0


@pytest.mark.anyio
async def test_metrics_endpoint_has_the_new_families(
    make_settings: Callable[..., Settings], storescp_factory: StoreSCPFactory
) -> None:
    """A study delivered to a real storescp and an HL7 notification to a closed port: /metrics shows the
    delivery by destination, the notification attempt by channel, models, requests, queue age and build."""
    scp = storescp_factory(aet="PACS")
    settings = make_settings(
        delivery={"destinations": [scp.peer_text], "backoff_seconds": 60},
        notify={"hl7_endpoints": ["127.0.0.1:1"], "backoff_seconds": 60, "timeout_seconds": 2},
    )
    study = generate_uid()
    body, ctype = multipart_related([chest(study_uid=study)])
    async with running_app(settings) as (_app, client):
        r = await client.post(
            "/v1/studies", content=body, headers={"Content-Type": ctype, "Prefer": "wait=10"}
        )
        assert r.status_code == 200, r.text
        for _ in range(400):
            text = (await client.get("/metrics")).text
            if "pacs_triage_deliveries_total{" in text and "pacs_triage_notifications_total{" in text:
                break
            await asyncio.sleep(0.05)
    delivered = f'pacs_triage_deliveries_total{{destination="{scp.peer_text}",outcome="done"}}'
    assert delivered in text, text
    assert 'pacs_triage_notifications_total{channel="hl7",outcome="retry"} 1.0' in text
    assert 'pacs_triage_model_up{model="cxr-pneumothorax"} 1.0' in text
    assert 'pacs_triage_model_info{model="cxr-nodule",providers="CPUExecutionProvider"' in text
    assert 'pacs_triage_http_request_duration_seconds_count{method="POST",route="/v1/studies"} 1.0' in text
    assert "pacs_triage_oldest_waiting_job_age_seconds 0.0" in text
    assert "pacs_triage_build_info{" in text and "process_resident_memory_bytes" in text
