"""Settings of what happens to a study inside the service: where it is stored, when it is complete, how
workers and the inference engine run, how findings reorder the worklist, retention and drift alarms.

One class per section of :class:`service.config.Settings` (``PACS_TRIAGE_<SECTION>__<FIELD>``); the doors
and peers (HTTP, DICOM, delivery, notifications) are in :mod:`service.config.interfaces`.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from service.config.group import SettingsGroup

__all__ = [
    "AssemblySettings",
    "DriftSettings",
    "InferenceSettings",
    "RetentionSettings",
    "StoreSettings",
    "WorkerSettings",
    "WorklistSettings",
]


class StoreSettings(SettingsGroup):
    """Where instances and the job database live."""

    database_url: str | None = Field(
        None, description="SQLAlchemy URL; default sqlite:///<data_dir>/pacs-triage.db"
    )
    sqlite_synchronous: Literal["FULL", "NORMAL"] = Field(
        "FULL",
        description="SQLite PRAGMA synchronous in WAL mode; FULL so a committed row survives power loss",
    )
    keep_truncated: bool = Field(
        False,
        description="store datasets whose declared lengths exceed their bytes (noted) instead of refusing",
    )


class InferenceSettings(SettingsGroup):
    """ONNX Runtime engine and micro-batcher."""

    max_batch: int = Field(8, gt=0, description="largest micro-batch sent to one session run")
    max_wait_ms: float = Field(2.0, ge=0, description="how long a batch waits for company before running")
    providers: Literal["auto", "cpu", "cuda"] = Field("auto", description="execution provider choice")
    intra_op_threads: int = Field(0, ge=0, description="ORT intra-op threads; 0 lets ORT decide")
    debug_delay_ms: float = Field(
        0.0, ge=0, description="TEST ONLY: sleep this long in the worker before inference (crash tests)"
    )
    debug_measure_delay_ms: float = Field(
        0.0,
        ge=0,
        description="TEST ONLY: hold a job this long between its measurements-pending result and the "
        "measured one (crash tests)",
    )
    remote_models: dict[str, Annotated[str, Field(pattern=r"^https?://\S+$")]] = Field(
        default_factory=dict,
        description="models run by a KServe v2 server (Triton, MLServer): name → base URL (JSON object)",
    )


class AssemblySettings(SettingsGroup):
    """When a study counts as complete."""

    quiet_seconds: float = Field(
        5.0, ge=0, description="a study with no new instance for this long is complete (DICOM ingest)"
    )
    complete_when_full: bool = Field(
        True,
        description="a study is complete at once when every image series has the instances it declares"
        " (ImagesInAcquisition)",
    )
    complete_on_association_end: bool = Field(
        True,
        description="a study is complete at once when the association that sent it is released and none of"
        " its associations is open, for single-image modalities (CR, DX, MG, ...) and full series",
    )
    hold_while_associated: bool = Field(
        True,
        description="a series that has fewer instances than it declares waits while an association of its"
        " study is open, instead of the quiet timer (a busy sender or receiver pauses longer than it)",
    )
    max_hold_seconds: float = Field(
        600.0,
        gt=0,
        description="the longest such a study waits after its last instance before it is analysed anyway"
        " (then labelled incomplete)",
    )


class WorklistSettings(SettingsGroup):
    """How AI findings reorder the radiologist's worklist."""

    priorities: dict[str, Literal["stat", "urgent", "routine"]] = Field(
        default_factory=dict,
        description="priority of a positive finding by 'model/label' (JSON object); default: the card",
    )
    max_wait_minutes: float = Field(
        120.0,
        ge=0,
        description="routine studies waiting longer are promoted to urgent (starvation guard); 0: off",
    )


class RetentionSettings(SettingsGroup):
    """How the service looks after its own disk."""

    instance_days: float = Field(
        0.0, ge=0, description="remove instance files of delivered studies after this many days; 0 keeps them"
    )
    check_interval_seconds: float = Field(3600.0, gt=0, description="how often the retention sweep runs")
    disk_high_watermark: float = Field(
        0.95,
        gt=0,
        le=1,
        description="above this fraction of the data disk used (as df shows it: blocks reserved for root"
        " count as taken), new instances are refused (507 / 0xA700)",
    )


class WorkerSettings(SettingsGroup):
    """Job workers."""

    concurrency: int = Field(4, gt=0, description="jobs processed at the same time (they share the engine)")
    poll_seconds: float = Field(
        0.5,
        gt=0,
        description="at most how long the idle workers' gate watcher sleeps before it looks again for due"
        " jobs (it sleeps until the earliest gate; new work wakes the workers at once)",
    )
    max_attempts: int = Field(3, gt=0, description="a job that failed this many times is marked failed")
    lease_seconds: float = Field(
        60.0, gt=0, description="a running job is given back if its worker stops heart-beating this long"
    )
    ready_max_backlog: int = Field(
        0, ge=0, description="/healthz/ready answers 503 while more jobs than this wait (0: report only)"
    )


class DriftSettings(SettingsGroup):
    """Drift alarms per model (service/lifecycle/drift.py): inputs and scores against a reference."""

    enabled: bool = Field(True, description="watch each model's inputs and scores for drift and silence")
    reference_series: int = Field(
        300,
        ge=10,
        description="for a card without a drift reference: series per model, after start, that form "
        "its reference distribution",
    )
    window_series: int = Field(
        300, ge=10, description="latest series per model compared with the reference (a sliding window)"
    )
    check_every: int = Field(10, gt=0, description="series between two PSI computations of a model")
    psi_threshold: float = Field(
        0.25, gt=0, description="a feature whose population stability index exceeds this raises the alarm"
    )
    silence_hours: float = Field(
        24.0, gt=0, description="a model that received studies and none for this long raises an alarm"
    )
