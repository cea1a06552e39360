"""Metrics: one private registry per instance, so several apps can live in one process."""

from __future__ import annotations

from service.metrics import Metrics


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
