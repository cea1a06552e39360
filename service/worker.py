"""Walk jobs through the stages: claim → load → analyse → write the StudyResult. Survives restarts.

A job is a DB row (see :mod:`service.store.db`). Claiming flips it ``pending → running`` with
``claimed_at``; writing the result flips it to ``done`` in the same transaction as the result row, so a
crash at any point leaves either a job that runs again after restart (:meth:`Store.recover` resets
``running`` to ``pending``) or a finished job with exactly one result.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from pydicom.uid import UID

from service.analyse import Analysis, InferenceRunner, analyse_study
from service.assemble import completeness
from service.config import Settings
from service.inference.card import ModelCard
from service.inference.registry import ModelRegistry
from service.logs import job_id_var
from service.results.schema import (
    PRIORITY_RANK,
    Assembly,
    Finding,
    HopTimes,
    NotAnalysed,
    Priority,
    ResultStatus,
    StudyResult,
)
from service.routing import RoutingRules
from service.store.db import utcnow
from service.store.repository import InstanceRecord, JobInfo, LeaseLostError, Store, StudyStatus
from service.worklist.policy import apply_overrides

__all__ = ["ResultNotifier", "Worker"]

logger = logging.getLogger(__name__)


class ResultNotifier:
    """Wakes ``Prefer: wait`` requests when a study's result is stored, and idle workers on new jobs."""

    def __init__(self) -> None:
        self._events: dict[str, list[asyncio.Event]] = defaultdict(list)
        self.work = asyncio.Event()
        self.on_result: list[Callable[[], None]] = []
        """Called on every stored result (the DICOM delivery's render loop subscribes)."""

    def result_stored(self, study_uid: str) -> None:
        for ev in self._events.pop(study_uid, []):
            ev.set()
        for callback in self.on_result:
            callback()

    @contextlib.contextmanager
    def watch(self, study_uid: str) -> Iterator[asyncio.Event]:
        """An event set when the study's next result is stored; register before checking the store."""
        ev = asyncio.Event()
        self._events[study_uid].append(ev)
        try:
            yield ev
        finally:
            with contextlib.suppress(ValueError):
                self._events[study_uid].remove(ev)
            if not self._events.get(study_uid):
                self._events.pop(study_uid, None)


@dataclass
class WorkerDeps:
    store: Store
    engine: InferenceRunner
    registry: ModelRegistry
    rules: RoutingRules
    settings: Settings
    notifier: ResultNotifier
    metrics: object | None = None


def _status(analysis: Analysis) -> ResultStatus:
    if not analysis.findings:
        return "not_analysed"
    return "partial" if analysis.not_analysed else "complete"


def _priority(findings: list[Finding]) -> Priority:
    urgencies = [f.urgency for f in findings if f.positive] or ["routine"]
    return min(urgencies, key=lambda u: PRIORITY_RANK[u])  # type: ignore[return-value]


def _not_images(others: list[tuple[str, str]]) -> list[NotAnalysed]:
    """A reason per series of a study with no image to analyse (SR, RT objects, waveforms, no pixel data)."""
    reasons: dict[str, list[str]] = {}
    for series_uid, sop_class_uid in others:
        reasons.setdefault(series_uid, []).append(UID(sop_class_uid).name)
    return [
        NotAnalysed(
            series_uid=series_uid,
            reason=f"not analysed: no image to analyse ({', '.join(names)}: no pixel data)",
        )
        for series_uid, names in reasons.items()
    ] or [NotAnalysed(series_uid="", reason="not analysed: the study has no image to analyse")]


def _assembly(records: list[InstanceRecord]) -> Assembly | None:
    """How complete the study's image series were at the start of the analysis (declared counts)."""
    if not records:
        return None
    series: dict[str, list[InstanceRecord]] = {}
    for rec in records:
        series.setdefault(rec.series_uid, []).append(rec)
    fills = [(recs[0].expected_in_series, len(recs)) for recs in series.values()]
    complete, received, declared = completeness(fills)
    return Assembly(complete=complete, instances_analysed=received, instances_declared=declared)


class Worker:
    """``settings.worker.concurrency`` loops that claim and process jobs until :meth:`stop`."""

    def __init__(self, deps: WorkerDeps) -> None:
        self.deps = deps
        self._tasks: list[asyncio.Task[None]] = []
        self._running: set[int] = set()
        self._stopping = False

    def start(self) -> None:
        n = self.deps.settings.worker.concurrency
        self._tasks = [asyncio.create_task(self._loop(), name=f"worker-{i}") for i in range(n)]
        self._tasks.append(asyncio.create_task(self._leases(), name="worker-leases"))

    async def stop(self) -> None:
        self._stopping = True
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []

    async def _leases(self) -> None:
        """Heart-beat our running jobs' leases; on a shared database also give back jobs of dead workers.

        Every third of the lease: a worker that misses two beats in a row (stalled, partitioned, killed)
        loses its jobs to the others, and :meth:`Store.save_result` refuses its late result.
        """
        store = self.deps.store
        interval = max(0.05, store.lease.total_seconds() / 3)
        while not self._stopping:
            await asyncio.sleep(interval)
            try:
                await store.heartbeat(sorted(self._running))
                if store.shared and await store.recover():
                    self.deps.notifier.work.set()
            except Exception:  # the database is away: the leases run out, which is the safe side
                logger.exception("lease heartbeat failed")

    async def _loop(self) -> None:
        d = self.deps
        while not self._stopping:
            if not getattr(d.engine, "ready", True):
                await asyncio.sleep(0.05)  # jobs wait, durable, until the models are warm
                continue
            try:
                job = await d.store.claim()
            except Exception:
                logger.exception("claiming a job failed; retrying")
                job = None
            if job is None:
                d.notifier.work.clear()
                timeout = await self._idle_timeout()  # before creating wait(): a cancel here leaks none
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(d.notifier.work.wait(), timeout)
                continue
            try:
                await self.process(job)
            except Exception:  # even recording the failure failed (store gone?): keep the worker alive
                logger.exception("job %d could not be finished; it is re-run after restart", job.id)

    async def _idle_timeout(self) -> float:
        """Sleep until the next job's gate opens (a quiet timer expiring), at most ``poll_seconds``.

        New work that is due at once (an HTTP POST, a DICOM series that became full) wakes the workers
        through the notifier instead; instances that only push a quiet timer forward do not.
        """
        poll = self.deps.settings.worker.poll_seconds
        try:
            due = await self.deps.store.next_due()
        except Exception:
            return poll
        if due is None:
            return poll
        return min(poll, max(0.005, (due - utcnow()).total_seconds()))

    async def process(self, job: JobInfo) -> None:
        """Run one claimed job to a stored result (or a recorded failure)."""
        d = self.deps
        token = job_id_var.set(str(job.id))
        self._running.add(job.id)
        started = utcnow()
        t0 = time.perf_counter()
        try:
            logger.info(
                "job started (study %s, attempt %d, priority %d)", job.study_uid, job.attempts, job.priority
            )
            if d.settings.inference.debug_delay_ms:
                await asyncio.sleep(d.settings.inference.debug_delay_ms / 1000)
            records = await d.store.instances(job.study_uid)
            served = set(getattr(d.engine, "model_names", d.registry.models))
            cards: dict[str, ModelCard] = {n: m.card for n, m in d.registry.models.items() if n in served}
            analysis = await analyse_study(
                records,
                rules=d.rules,
                cards=cards,
                load_errors=dict(d.registry.errors),
                engine=d.engine,
                priority=job.priority,
            )
            if not records:  # nothing to analyse: say why, never leave the study without an answer
                analysis.not_analysed.extend(_not_images(await d.store.other_instances(job.study_uid)))
            done = utcnow()
            assembly = _assembly(records)
            result = await d.store.save_result(
                job.id,
                lambda prev, st: self._build(job, analysis, prev, st, started, done, "done", assembly),
            )
            self._observe(result)
            logger.info(
                "job done in %.3f s: %s, priority %s, %d finding(s), %d not analysed",
                time.perf_counter() - t0,
                result.status,
                result.priority,
                len(result.findings),
                len(result.not_analysed),
            )
            d.notifier.result_stored(job.study_uid)
        except asyncio.CancelledError:
            raise  # shutdown: the job stays running and recover() resets it at the next start
        except LeaseLostError as exc:  # we stalled past the lease; the job's new holder finishes it
            logger.warning("job dropped: %s", exc.detail)
        except Exception as exc:
            logger.exception("job failed")
            state = await d.store.fail(job.id, f"{type(exc).__name__}: {exc}", d.settings.worker.max_attempts)
            if state == "failed":
                failed = Analysis()
                await d.store.save_result(
                    job.id, lambda prev, st: self._build(job, failed, prev, st, started, utcnow(), "failed")
                )
                d.notifier.result_stored(job.study_uid)
            else:
                d.notifier.work.set()
        finally:
            self._running.discard(job.id)
            job_id_var.reset(token)

    def _build(
        self,
        job: JobInfo,
        analysis: Analysis,
        prev: str | None,
        st: StudyStatus,
        started: object,
        done: object,
        outcome: str,
        assembly: Assembly | None = None,
    ) -> StudyResult:
        stored = utcnow()
        findings = apply_overrides(analysis.findings, self.deps.settings.worklist.priorities)
        status = "failed" if outcome == "failed" else _status(analysis)
        if status == "complete" and assembly is not None and assembly.complete is False:
            status = "partial"  # never "complete" when a series has fewer instances than it declares
        return StudyResult(
            result_id=str(uuid.uuid4()),
            study_uid=job.study_uid,
            accession_number=st.accession_number,
            status=status,  # type: ignore[arg-type]
            priority=_priority(findings),
            findings=findings,
            not_analysed=analysis.not_analysed,
            models=sorted(analysis.models.values(), key=lambda m: m.name),
            timestamps=HopTimes(
                first_instance_received=st.first_received,
                last_instance_received=st.last_received,
                # complete when the gate opened, never before the last instance it waited for
                study_complete=max(job.not_before, st.last_received) if st.last_received else job.not_before,
                inference_started=started,  # type: ignore[arg-type]
                inference_done=done,  # type: ignore[arg-type]
                result_stored=stored,
                worklist_updated=stored,  # the worklist entry is updated in the result's transaction
            ),
            supersedes=prev,
            assembly=assembly,
        )

    def _observe(self, result: StudyResult) -> None:
        metrics = self.deps.metrics
        first = result.timestamps.first_instance_received
        stored = result.timestamps.result_stored
        if metrics is not None and first is not None and stored is not None:
            metrics.time_to_result.labels(priority=result.priority).observe(  # type: ignore[attr-defined]
                (stored - first).total_seconds()
            )
            flagged = result.timestamps.worklist_updated or stored
            metrics.time_to_flag.labels(priority=result.priority).observe(  # type: ignore[attr-defined]
                (flagged - first).total_seconds()
            )
