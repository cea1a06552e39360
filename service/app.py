"""The FastAPI app factory and its lifespan.

Start-up order: open the store (tables created), re-index instance files a crash left without a row, reset
jobs and deliveries a crash left running, load the model registry, start the workers, the DICOM delivery
loops and the DICOM listener, then warm the engine in the background: the API and the listener answer (and
store instances durably) at once, ``/healthz/ready`` says 503 until every model is warm, and the workers
start claiming jobs only then. Shutdown reverses it: the listener stops accepting (the rows of what it
acknowledged committed), workers stop (a job cut short stays ``running`` and is re-run at the next start),
delivery stops, the engine drains, the store closes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from datetime import timedelta
from importlib.metadata import PackageNotFoundError, version
from typing import Protocol

from fastapi import FastAPI
from pydicom import config as pydicom_config
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.api import api_router
from service.api.auth import token_table
from service.api.deps import AppState
from service.api.limits import install_body_limits
from service.api.problems import install_problem_handlers
from service.api.swagger import docs_router
from service.clock import utcnow
from service.config import Settings
from service.deliver.dicom import DicomDelivery
from service.deliver.notify import NotificationDelivery, notification_targets
from service.events import ResultNotifier
from service.inference.registry import ModelRegistry
from service.inference.router import EngineRouter
from service.ingest.scp import DicomListener
from service.lifecycle.drift import DriftMonitor
from service.lifecycle.site_thresholds import apply_site_thresholds
from service.metrics import Metrics
from service.routing import load_rules
from service.runtime import freeze_startup_objects
from service.store.database import Database
from service.store.files import remove_partial_writes
from service.store.instances import Instances
from service.store.jobs import Jobs
from service.store.notify import NotifyStore
from service.store.outbox import Outbox
from service.store.reindex import reindex
from service.store.results import Results
from service.store.retention import Retention
from service.store.slot_place import Replayed, Slotted, replay_slots
from service.store.slots import SlotsBusyError, SlotStore
from service.store.validate import ParsedInstance
from service.store.worklist import WorklistStore
from service.worker import Worker, WorkerDeps

__all__ = ["create_app"]

logger = logging.getLogger(__name__)


class _Background(Protocol):
    """A part that runs beside the requests: started with the app, stopped before it ends."""

    def start(self) -> None: ...

    async def stop(self) -> None: ...


REINDEX_MIN_AGE_SHARED_S = 300.0
"""Shared store: a file without a row younger than this may still get it from the process that wrote it."""

try:
    __version__ = version("pacs-triage")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"


class RequestMetricsMiddleware:
    """Counts requests by route template (never the concrete path: UIDs would explode the label set)."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = {"code": 500}
        started = time.perf_counter()

        async def send_wrapper(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            route = scope.get("route")
            template = getattr(route, "path", None) or "unmatched"
            seconds = time.perf_counter() - started
            self.metrics.observe_request(template, scope["method"], status["code"], seconds)


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the app; ``settings`` defaults to the environment (and ``PACS_TRIAGE_CONFIG`` YAML)."""
    settings = settings or Settings()
    metrics = Metrics()
    # pydicom's value validation logs offending values (a malformed PatientName would reach the log) and
    # warns; the service checks the values it uses itself (UIDs in service.store.validate), so reading
    # validation is off. Process-wide, set where the process is set up.
    pydicom_config.settings.reading_validation_mode = pydicom_config.IGNORE

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        db = await asyncio.to_thread(
            Database, settings.database_url, sqlite_synchronous=settings.store.sqlite_synchronous
        )
        instances = Instances(
            db,
            settings.instances_dir,
            disk_high_watermark=settings.retention.disk_high_watermark,
            max_instances_per_study=settings.api.max_instances_per_study,
        )
        jobs = Jobs(db, lease_seconds=settings.worker.lease_seconds)
        targets = notification_targets(settings.notify)
        d = settings.delivery
        render = bool(d.destinations) and (d.send_sr or d.send_preview)
        results = Results(db, jobs, targets=targets, render=render)
        if not db.shared:  # this process owns the data directory: crash leftovers are ours to clear
            for root in (settings.instances_dir, settings.outputs_dir):
                if root.exists() and (n := await asyncio.to_thread(remove_partial_writes, root)):
                    logger.warning("removed %d partial file(s) a crash left in %s", n, root)
        # Acknowledged DICOM instances still in their slots: files and rows now, before the listener opens
        # (service/store/slot_place.py); slots left by an earlier start (or an older version's segment
        # journal) are replayed even when the setting is now off.
        slots = None
        waiting: list[tuple[ParsedInstance, Slotted]] = []  # in their slots, not placeable yet
        legacy = settings.legacy_journal_dir
        if settings.runs_listener and (
            settings.dicom.journal or settings.slots_dir.exists() or legacy.exists()
        ):
            slots = SlotStore(settings.slots_dir, direct=settings.dicom.direct_io)
            try:
                replayed = await asyncio.to_thread(
                    replay_slots,
                    slots,
                    instances,
                    quiet_seconds=settings.assembly.quiet_seconds,
                    complete_when_full=settings.assembly.complete_when_full,
                    keep=settings.dicom.journal,
                    legacy=legacy,
                )
            except SlotsBusyError:  # several listener processes on one data directory: the first has it
                logger.warning(
                    "the slot directory is another process's: this listener fsyncs each file instead"
                )
                replayed, slots = Replayed(), None
            if replayed.waiting:
                logger.error(
                    "slots: %d acknowledged instance(s) cannot be placed now; kept in their slots and"
                    " placed once they can be (new instances are refused while placements fail)",
                    len(replayed.waiting),
                )
            if replayed.instances or replayed.torn or replayed.unreadable:
                logger.warning(
                    "slots: placed and indexed %d acknowledged instance(s) that had no row; discarded %d"
                    " torn write(s) (never acknowledged); %d could not be parsed (set aside)",
                    replayed.instances,
                    replayed.torn,
                    replayed.unreadable,
                )
            # Slots holding instances still to place stay in use until they are (even when now off).
            waiting = replayed.waiting
            slots = slots if replayed.in_use else None
        # Acknowledged DICOM instances whose row a crash kept from its group commit: rows now, before the
        # listener opens (service/store/reindex.py); in a shared store, young files are another process's.
        again = await asyncio.to_thread(
            reindex,
            instances,
            quiet_seconds=settings.assembly.quiet_seconds,
            complete_when_full=settings.assembly.complete_when_full,
            min_age_seconds=REINDEX_MIN_AGE_SHARED_S if db.shared else 0.0,
        )
        if again.instances or again.leftovers or again.unreadable:
            logger.warning(
                "re-indexed %d instance file(s) of %d study(ies) that had no row; removed %d file(s) of"
                " purged studies; left %d unreadable file(s)",
                again.instances,
                again.studies,
                again.leftovers,
                again.unreadable,
            )
        recovered = await jobs.recover()
        if not db.shared:  # no association survives a restart: release the studies held for one
            quiet = timedelta(seconds=settings.assembly.quiet_seconds)
            if held := await jobs.release_holds(utcnow() + quiet):
                logger.warning(
                    "%d study(ies) held for an open association now wait for the quiet timer", held
                )
        if recovered:
            logger.warning("%d job(s) left running by an earlier process reset to pending", recovered)
        outbox = Outbox(db, settings.outputs_dir, instances)
        resent = await outbox.recover()
        if resent:
            logger.warning("%d delivery(ies) cut short by an earlier process will be sent again", resent)
        notify_store = NotifyStore(db, settings.instances_dir)
        await notify_store.recover()
        notifications = NotificationDelivery(notify_store, settings.notify, poll_seconds=1.0, metrics=metrics)
        rules = load_rules(settings.routing_rules_path)
        registry = await asyncio.to_thread(ModelRegistry.from_directory, settings.models_dir)
        apply_site_thresholds(registry, settings.site_thresholds_path)  # a bad file stops the start
        engine = EngineRouter.from_settings(registry, settings.inference, metrics=metrics)
        notifier = ResultNotifier()
        drift = DriftMonitor(
            settings.drift,
            {
                name: (m.card.version, m.card.drift_reference)
                for name, m in registry.models.items()
                if m.card.drift_reference is not None
            },
        )
        worker = Worker(
            WorkerDeps(instances, jobs, results, engine, registry, rules, settings, notifier, metrics, drift)
        )
        delivery = DicomDelivery(outbox, settings, metrics=metrics)
        if render:
            notifier.on_result.append(lambda r: delivery.render_wanted.set() if r.findings else None)
        notifier.on_result.append(lambda r: notifications.wanted.set() if targets(r) else None)
        loop = asyncio.get_running_loop()
        listener = (
            DicomListener(
                settings.dicom,
                instances,
                quiet_seconds=settings.assembly.quiet_seconds,
                assembly=settings.assembly,
                on_stored=lambda: loop.call_soon_threadsafe(notifier.work.set),
                metrics=metrics,
                keep_truncated=settings.store.keep_truncated,
                slots=slots,
            )
            if settings.runs_listener
            else None
        )
        if listener is not None and waiting:
            listener.resume(waiting)
        app.state.triage = AppState(
            settings,
            metrics,
            db,
            instances,
            jobs,
            results,
            registry,
            engine,
            rules,
            notifier,
            worker,
            outbox,
            delivery,
            listener,
            WorklistStore(db, max_wait_minutes=settings.worklist.max_wait_minutes),
            notify_store,
            drift,
        )
        retention = Retention(
            db,
            settings.instances_dir,
            settings.outputs_dir,
            instance_days=settings.retention.instance_days,
            interval=settings.retention.check_interval_seconds,
        )
        # Roles (settings.role): "api" stores and answers, "listener" receives DICOM, "worker" infers and
        # delivers; "all" is the embedded default. They meet only in the shared store.
        background: list[_Background] = (
            [worker, delivery, notifications, retention, drift] if settings.runs_workers else []
        )
        warmup = asyncio.create_task(
            engine.start() if settings.runs_workers else asyncio.sleep(0), name="engine-warmup"
        )
        for part in background:
            part.start()
        if listener is not None:
            await asyncio.to_thread(listener.start)
        logger.info(
            "pacs-triage %s started as %s (data in %s)", __version__, settings.role, settings.data_dir
        )
        freeze_startup_objects()
        warmup.add_done_callback(lambda _: freeze_startup_objects())  # (the models' objects too)
        try:
            yield
        finally:
            if listener is not None:
                await asyncio.to_thread(listener.stop)
            for part in background:
                await part.stop()
            if not warmup.done():
                warmup.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await warmup
            await engine.stop()
            await asyncio.to_thread(db.close)
            logger.info("pacs-triage stopped")

    app = FastAPI(
        title="pacs-triage",
        version=__version__,
        description="AI triage beside a PACS. Demonstration models: not for clinical use.",
        lifespan=lifespan,
        docs_url=None,  # /docs from the package's own Swagger UI files (service.api.swagger), no CDN
        redoc_url=None,
    )
    install_body_limits(app, settings.api)  # inside the metrics middleware, so its 408/503 are counted
    app.add_middleware(RequestMetricsMiddleware, metrics=metrics)
    install_problem_handlers(app)
    app.include_router(api_router)
    app.include_router(docs_router)
    app.state.settings = settings
    app.state.metrics = metrics
    token_table(app)  # a bad tokens file fails here, before the store or the listener opens
    return app
