"""Route dependencies as ``Annotated`` aliases: routes declare ``state: StateDep`` and nothing global."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Path, Request

from service.config import Settings
from service.deliver.dicom import DicomDelivery
from service.events import ResultNotifier
from service.inference.registry import ModelRegistry
from service.inference.router import EngineRouter
from service.ingest.scp import DicomListener
from service.lifecycle.drift import DriftMonitor
from service.metrics import Metrics
from service.routing import RoutingRules
from service.store.database import Database
from service.store.instances import Instances
from service.store.jobs import Jobs
from service.store.notify import NotifyStore
from service.store.outbox import Outbox
from service.store.results import Results
from service.store.worklist import WorklistStore
from service.worker import Worker

__all__ = ["AppState", "StateDep", "StudyUID", "get_state"]

StudyUID = Annotated[
    str,
    Path(
        pattern=r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$",
        max_length=64,
        description="Study Instance UID (PS3.5 9.1: digits and dots, at most 64 characters)",
    ),
]
"""A study UID path parameter, documented as the UID it must be (anything else is a 422 problem)."""


@dataclass
class AppState:
    """Everything the lifespan opened, handed to routes through :func:`get_state`."""

    settings: Settings
    metrics: Metrics
    db: Database
    instances: Instances
    jobs: Jobs
    results: Results
    registry: ModelRegistry
    engine: EngineRouter
    rules: RoutingRules
    notifier: ResultNotifier
    worker: Worker
    outbox: Outbox
    delivery: DicomDelivery
    listener: DicomListener | None
    worklist: WorklistStore
    notifications: NotifyStore
    drift: DriftMonitor | None = None


async def get_state(request: Request) -> AppState:
    """The app's state. ``async`` on purpose: FastAPI runs a plain ``def`` dependency in its thread pool,
    a thread hop on every request for one attribute read."""
    state: AppState = request.app.state.triage
    return state


StateDep = Annotated[AppState, Depends(get_state)]
