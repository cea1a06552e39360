"""Prometheus metrics for ``GET /metrics``: one :class:`Metrics` object per app, on its own registry.

Why its own :class:`~prometheus_client.CollectorRegistry` instead of the global default: the default
registry refuses a second metric of the same name, so two apps in one process (every test that builds an
app) would collide. The app factory builds one ``Metrics`` and hands it to the routes and the engine.

The engine only needs the small :class:`EngineMetrics` protocol, so a test can pass a recorder instead.

The process, platform and garbage-collector collectors that ``prometheus_client`` registers on its global
registry are registered on ours too, so ``process_resident_memory_bytes``, ``process_open_fds``,
``python_info`` and ``python_gc_*`` are there as on any Python exporter. Names follow the Prometheus
conventions: ``_total`` for counters, ``_seconds`` for durations, ``*_build_info`` and ``*_info`` gauges of
value 1 whose labels carry the facts (one series per model, per build).
"""

from __future__ import annotations

import platform
from datetime import UTC, datetime
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Protocol

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    Info,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)

if TYPE_CHECKING:
    from service.inference.registry import ModelRegistry
    from service.lifecycle.drift import DriftMonitor

__all__ = ["EngineMetrics", "Metrics"]

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)
_TIME_TO_RESULT_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)
_HTTP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_DISTRIBUTIONS = ("pydicom", "pynetdicom", "highdicom", "fastapi")


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
        Result objects (SR, preview) sent, by ``destination`` (``AE@host:port`` as configured) and
        ``outcome`` (done, retry, dead).
    http_request_seconds
        HTTP request duration by ``route`` template and ``method``, from the request's arrival to the
        response's last byte (the API middleware).
    build_info
        Version of pacs-triage, Python, the ONNX Runtime build and the DICOM libraries (labels).
    model_up
        1 if a model is loaded and started (warm), 0 if it failed to load or start, by ``model``.
    model_info
        One series of value 1 per started model: ``version``, ``sha256``, ``providers`` (labels).
    feedback
        Reader verdicts on findings (``POST /v1/studies/{uid}/feedback``) by ``model``, ``version`` and
        ``verdict``; PPV per version is in ``GET /v1/models/{name}/stats``.
    notifications
        Notification attempts by ``channel`` (webhook, escalation, hl7, fhir) and ``outcome``.
    oldest_job_wait
        Seconds the oldest due job has waited for a worker (0 when none waits), read at each scrape.
    model_drift
        Largest population stability index over a model's input features and scores, its latest window
        against its reference (:mod:`service.lifecycle.drift`), by ``model``; absent until the window is full.
    model_drift_alarm
        1 while a model's alarm of ``kind`` ``drift`` (PSI past ``drift.psi_threshold``) or ``silence``
        (no study for ``drift.silence_hours``) is raised, else 0, by ``model``; read at each scrape.
    """

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        GCCollector(registry=self.registry)
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
            "result objects sent, by destination and outcome (done, retry, dead)",
            ["destination", "outcome"],
            registry=self.registry,
        )
        self.http_request_seconds = Histogram(
            "pacs_triage_http_request_duration_seconds",
            "HTTP request duration by route template and method",
            ["route", "method"],
            buckets=_HTTP_BUCKETS,
            registry=self.registry,
        )
        self.build_info = Info(
            "pacs_triage_build", "versions of pacs-triage and its runtime", registry=self.registry
        )
        self.build_info.info(_build_labels())
        self.model_up = Gauge(
            "pacs_triage_model_up",
            "1: model loaded and started; 0: it failed",
            ["model"],
            registry=self.registry,
        )
        self.model_info = Gauge(
            "pacs_triage_model_info",
            "one series per started model; the labels say which version runs where",
            ["model", "version", "sha256", "providers"],
            registry=self.registry,
        )
        self.feedback = Counter(
            "pacs_triage_feedback",
            "reader verdicts on findings by model, version and verdict (agree, disagree, unsure)",
            ["model", "version", "verdict"],
            registry=self.registry,
        )
        self.notifications = Counter(
            "pacs_triage_notifications",
            "notification attempts by channel and outcome (done, retry, dead)",
            ["channel", "outcome"],
            registry=self.registry,
        )
        self.oldest_job_wait = Gauge(
            "pacs_triage_oldest_waiting_job_age_seconds",
            "seconds the oldest due job has waited for a worker (0: none waits)",
            registry=self.registry,
        )
        self.model_drift = Gauge(
            "pacs_triage_model_drift_psi",
            "largest PSI of a model's input features and scores, latest window against its reference",
            ["model"],
            registry=self.registry,
        )
        self.model_drift_alarm = Gauge(
            "pacs_triage_model_drift_alarm",
            "1 while the model's drift or silence alarm is raised",
            ["model", "kind"],
            registry=self.registry,
        )

    def set_drift(self, monitor: DriftMonitor) -> None:
        """The drift gauges from the monitor's state (at scrape); the silence check runs first."""
        monitor.check_silence()
        self.model_drift.clear()
        self.model_drift_alarm.clear()
        for name, state in monitor.models.items():
            if state.max_index is not None:
                self.model_drift.labels(model=name).set(state.max_index)
            self.model_drift_alarm.labels(model=name, kind="drift").set(1 if state.drifted else 0)
            self.model_drift_alarm.labels(model=name, kind="silence").set(1 if state.silent else 0)

    def observe_batch(self, model: str, batch_size: int, seconds: float) -> None:
        self.inference_seconds.labels(model=model).observe(seconds)
        self.batch_size.labels(model=model).observe(batch_size)

    def set_queue_depth(self, model: str, depth: int) -> None:
        self.queue_depth.labels(model=model).set(depth)

    def observe_request(self, route: str, method: str, status: int, seconds: float) -> None:
        """One HTTP request, by route template (never the concrete path: UIDs would explode the label set)."""
        self.requests.labels(route=route, method=method, status=str(status)).inc()
        self.http_request_seconds.labels(route=route, method=method).observe(seconds)

    def set_models(self, registry: ModelRegistry, started: dict[str, list[str]]) -> None:
        """Model up/info from the registry and the providers each started model runs on (at scrape)."""
        self.model_info.clear()
        self.model_up.clear()
        for name, loaded in registry.models.items():
            providers = started.get(name)
            self.model_up.labels(model=name).set(1 if providers is not None else 0)
            if providers is not None:
                card = loaded.card
                self.model_info.labels(
                    model=name, version=card.version, sha256=card.sha256, providers=",".join(providers)
                ).set(1)
        for name in registry.errors:
            if name != "*":  # "*": the models directory itself is missing; no model to name
                self.model_up.labels(model=name).set(0)

    def set_oldest_due(self, next_due: datetime | None, now: datetime | None = None) -> None:
        """``next_due``: the earliest ``not_before`` of pending jobs; if past, the oldest job waits since."""
        now = now or datetime.now(UTC)
        self.oldest_job_wait.set(max(0.0, (now - next_due).total_seconds()) if next_due else 0.0)

    def render(self) -> tuple[bytes, str]:
        """The exposition text and its content type, for the ``/metrics`` route."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


def _version(distribution: str) -> str:
    try:
        return version(distribution)
    except PackageNotFoundError:
        return "not installed"


def _build_labels() -> dict[str, str]:
    """The ``pacs_triage_build_info`` labels: what a support ticket asks first."""
    ort_build = "gpu" if _version("onnxruntime-gpu") != "not installed" else "cpu"
    labels = {
        "version": _version("pacs-triage").replace("not installed", "0.0.0+unknown"),
        "python": platform.python_version(),
        "onnxruntime": _version("onnxruntime-gpu" if ort_build == "gpu" else "onnxruntime"),
        "onnxruntime_build": ort_build,
    }
    labels.update({name: _version(name) for name in _DISTRIBUTIONS})
    return labels
