"""Prometheus metrics for ``GET /metrics``: one :class:`Metrics` object per app, on its own registry.

Why its own :class:`~prometheus_client.CollectorRegistry` instead of the global default: the default
registry refuses a second metric of the same name, so two apps in one process (every test that builds an
app) would collide. The app factory builds one ``Metrics`` and hands it to the routes and the engine.

The engine only needs the small :class:`EngineMetrics` protocol, so a test can pass a recorder instead.
"""

from __future__ import annotations

from typing import Protocol

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

__all__ = ["EngineMetrics", "Metrics"]

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)
_TIME_TO_RESULT_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)


class EngineMetrics(Protocol):
    """What :class:`service.inference.engine.InferenceEngine` reports; :class:`Metrics` implements it."""

    def observe_batch(self, model: str, batch_size: int, seconds: float) -> None:
        """One session run of ``batch_size`` images took ``seconds``."""

    def set_queue_depth(self, model: str, depth: int) -> None:
        """Images waiting for ``model`` (not counting the batch in flight)."""


class Metrics:
    """Every metric the service exports, on a private registry.

    Attributes
    ----------
    requests
        HTTP requests by ``route`` (the path template, never the concrete path: UIDs would explode the label
        set), ``method`` and ``status``. Incremented by the API middleware.
    inference_seconds
        Wall time of one session run by ``model`` (a whole micro-batch).
    queue_depth
        Images waiting per ``model``.
    batch_size
        Images per session run by ``model``: shows whether micro-batching forms batches at all.
    time_to_result
        Seconds from the first instance of a study received to its result stored, by ``priority``.
    time_to_flag
        Seconds from the first instance of a study received to its worklist entry updated, by ``priority``.
    instances_received
        Instances accepted, by ``source`` (``rest``, ``dicom``).
    jobs_waiting
        Jobs due and waiting for a worker, read from the store at each scrape and readiness probe.
    dicom_stores
        C-STORE requests answered by the listener, by ``outcome`` (stored, duplicate, refused,
        out_of_resources, failed).
    deliveries
        Result objects (SR, preview) sent to a destination, by ``outcome`` (done, retry, dead).
    """

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "pacs_triage_requests",
            "HTTP requests by route template, method and status code",
            ["route", "method", "status"],
            registry=self.registry,
        )
        self.inference_seconds = Histogram(
            "pacs_triage_inference_seconds",
            "wall time of one ONNX Runtime session run (one micro-batch)",
            ["model"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.queue_depth = Gauge(
            "pacs_triage_inference_queue_depth",
            "images waiting for inference per model",
            ["model"],
            registry=self.registry,
        )
        self.batch_size = Histogram(
            "pacs_triage_inference_batch_size",
            "images per session run",
            ["model"],
            buckets=_BATCH_BUCKETS,
            registry=self.registry,
        )
        self.time_to_result = Histogram(
            "pacs_triage_time_to_result_seconds",
            "first instance received to result stored",
            ["priority"],
            buckets=_TIME_TO_RESULT_BUCKETS,
            registry=self.registry,
        )
        self.time_to_flag = Histogram(
            "pacs_triage_time_to_flag_seconds",
            "first instance received to the worklist updated with the result",
            ["priority"],
            buckets=_TIME_TO_RESULT_BUCKETS,
            registry=self.registry,
        )
        self.instances_received = Counter(
            "pacs_triage_instances_received",
            "DICOM instances accepted",
            ["source"],
            registry=self.registry,
        )
        self.jobs_waiting = Gauge(
            "pacs_triage_jobs_waiting",
            "jobs due and waiting for a worker (the back-pressure /healthz/ready reports)",
            registry=self.registry,
        )
        self.dicom_stores = Counter(
            "pacs_triage_dicom_stores",
            "C-STORE requests answered by the listener, by outcome",
            ["outcome"],
            registry=self.registry,
        )
        self.deliveries = Counter(
            "pacs_triage_deliveries",
            "result objects sent to destinations, by outcome (done, retry, dead)",
            ["outcome"],
            registry=self.registry,
        )

    def observe_batch(self, model: str, batch_size: int, seconds: float) -> None:
        self.inference_seconds.labels(model=model).observe(seconds)
        self.batch_size.labels(model=model).observe(batch_size)

    def set_queue_depth(self, model: str, depth: int) -> None:
        self.queue_depth.labels(model=model).set(depth)

    def render(self) -> tuple[bytes, str]:
        """The exposition text and its content type, for the ``/metrics`` route."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
