"""Walk jobs through the stages: claim → analyse → build the StudyResult → save. Survives restarts.

A job is a DB row (:mod:`service.store.jobs`). Claiming leases it to this process; saving the result
finishes it in the same transaction as the result row (:class:`service.store.results.Results`), so a
crash at any point leaves either a job that runs again (:meth:`Jobs.recover`) or a finished job with
exactly one final result. The result itself is built here, outside the store (:mod:`service.results.build`).
A job whose positive findings a segmentation measures first saves them as a measurements-pending result
(the flag does not wait for the measurement: :func:`service.analyse.analyse_study`'s ``flagged``), then
its final one, which supersedes it.

Two ways in: the worker loops claim due jobs from the queue (DICOM studies after their gate, jobs left
by a crash or by another process); and :meth:`Worker.adopt` takes a job that an HTTP request claimed in
its ingest transaction, together with the analysis the request started on its parsed datasets while the
files were being written (one pass: nothing is read back, nobody polls).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, replace
from datetime import datetime
from typing import TypeVar

from pydicom.dataset import Dataset
from pydicom.uid import UID

from service.analyse import Flagged, analyse_study
from service.assemble import completeness
from service.backoff import Backoff, FailureLog
from service.clock import utcnow
from service.config import Settings
from service.errors import LeaseLostError, StaleResultError
from service.events import ResultNotifier
from service.inference.backend import Backend
from service.inference.card import ModelCard
from service.inference.registry import ModelRegistry
from service.lifecycle.drift import DriftMonitor
from service.logs import job_id_var
from service.results.build import Analysis, Hops, StudyFacts, build_result
from service.results.schema import Assembly, NotAnalysed, StudyResult
from service.routing import RoutingRules
from service.store.db import JobState
from service.store.facts import ResultContext
from service.store.instances import InstanceRecord, Instances
from service.store.jobs import JobInfo, Jobs
from service.store.results import Results

__all__ = ["Prepared", "Worker", "WorkerDeps"]

logger = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass
class WorkerDeps:
    instances: Instances
    jobs: Jobs
    results: Results
    engine: Backend
    registry: ModelRegistry
    rules: RoutingRules
    settings: Settings
    notifier: ResultNotifier
    metrics: object | None = None
    drift: DriftMonitor | None = None


@dataclass(frozen=True)
class Prepared:
    """An analysis a request started before its job existed: when, and the task computing it."""

    started: datetime
    records: list[InstanceRecord]
    analysis: asyncio.Task[Analysis]


def _assembly(records: list[InstanceRecord]) -> Assembly | None:
    """How complete the study's image series were when analysed (ImagesInAcquisition, PS3.3 C.7.6.1)."""
    if not records:
        return None
    series: dict[str, list[InstanceRecord]] = {}
    for rec in records:
        series.setdefault(rec.series_uid, []).append(rec)
    fills = [(recs[0].expected_in_series, len(recs)) for recs in series.values()]
    complete, received, declared = completeness(fills)
    return Assembly(complete=complete, instances_analysed=received, instances_declared=declared)


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


class Worker:
    """``settings.worker.concurrency`` loops that claim and process jobs until :meth:`stop`."""

    def __init__(self, deps: WorkerDeps) -> None:
        self.deps = deps
        self._tasks: list[asyncio.Task[None]] = []
        self._adopted: set[asyncio.Task[StudyResult | None]] = set()
        self._running: set[int] = set()
        self._stopping = False
        # A store that fails (disk full, database away) is retried with back-off and logged on each change
        # of state, never once per 5 ms retry (issue 15: 93 % CPU and 24.8 MB of tracebacks a minute).
        self._claim_backoff = Backoff(initial=0.05, ceiling=5.0)
        self._claim_log = FailureLog(logger, "claiming jobs")
        # its own: on a full disk the reads work and the claims (writes) fail, and one log for both would
        # say "recovered" and "failing" in turn on every poll
        self._gates_backoff = Backoff(initial=0.05, ceiling=5.0)
        self._gates_log = FailureLog(logger, "looking for due jobs")
        self._lease_log = FailureLog(logger, "lease heartbeat")

    def analyse(
        self, records: list[InstanceRecord], datasets: Mapping[str, Dataset], priority: int
    ) -> Prepared:
        """Start analysing a study the caller holds in memory (before its files are durable)."""
        task = asyncio.create_task(self._analysis(records, priority, datasets), name="analysis")
        return Prepared(utcnow(), records, task)

    def adopt(
        self,
        job: JobInfo,
        prepared: Prepared | None = None,
        datasets: Mapping[str, Dataset] | None = None,
        context: ResultContext | None = None,
    ) -> asyncio.Task[StudyResult | None]:
        """Process a job the caller claimed (in its ingest transaction), as a task this worker owns: it
        goes on if the request that started it goes away, and :meth:`stop` cancels it (the job stays
        ``running`` and is recovered at the next start, like a job cut short in a worker loop).
        ``context``: the study's facts, when the ingest that claimed the job created the study."""
        task = asyncio.create_task(self.process(job, prepared, datasets, context), name=f"job-{job.id}")
        self._adopted.add(task)
        task.add_done_callback(self._adopted.discard)
        return task

    def start(self) -> None:
        n = self.deps.settings.worker.concurrency
        self._tasks = [asyncio.create_task(self._loop(), name=f"worker-{i}") for i in range(n)]
        self._tasks.append(asyncio.create_task(self._leases(), name="worker-leases"))
        self._tasks.append(asyncio.create_task(self._watch_gates(), name="worker-gates"))

    async def stop(self) -> None:
        self._stopping = True
        tasks = [*self._tasks, *self._adopted]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._tasks = []

    async def _leases(self) -> None:
        """Heart-beat our running jobs' leases; on a shared database also give back jobs of dead workers.

        Every third of the lease: a worker that misses two beats in a row (stalled, partitioned, killed)
        loses its jobs to the others, and :meth:`Results.save` refuses its late result.
        """
        jobs = self.deps.jobs
        interval = max(0.05, jobs.lease.total_seconds() / 3)
        while not self._stopping:
            await asyncio.sleep(interval)
            try:
                await jobs.heartbeat(sorted(self._running))
                if jobs.db.shared and await jobs.recover():
                    self.deps.notifier.work.set()
            except Exception as exc:  # the database is away: the leases run out, which is the safe side
                self._lease_log.failed(exc, retry_in=interval)
            else:
                self._lease_log.succeeded()

    async def _loop(self) -> None:
        """Claim and process due jobs; with none, sleep until woken (new work, :meth:`_watch_gates`)."""
        d = self.deps
        while not self._stopping:
            if not d.engine.ready:
                await asyncio.sleep(0.05)  # jobs wait, durable, until the models are warm
                continue
            # Cleared before the claim, not after it: a job made due while the claim runs (its commit
            # queued on the writer thread just behind the claim's) wakes us through a set() that the loop
            # runs after the claim's answer is in but before this task resumes; cleared after the claim,
            # that wake was lost and the job waited for the gate watcher, up to ``poll_seconds`` (0.5 s).
            d.notifier.work.clear()
            ok, job = await _retrying(d.jobs.claim, self._claim_backoff, self._claim_log)
            if not ok:
                continue
            if job is None:
                await d.notifier.work.wait()  # returns at once if a wake came during the claim
                continue
            try:
                await self.process(job)
            except Exception:  # even recording the failure failed (store gone?): keep the worker alive
                logger.exception("job %d could not be finished; it is re-run after restart", job.id)

    async def _watch_gates(self) -> None:
        """Wake the idle workers when a job's gate opens (a quiet timer expiring, a retry's back-off).

        New work that is due at once (an HTTP POST, a DICOM series that became full, an association's end)
        wakes the workers through the notifier; instances that only push a quiet timer forward wake nobody.
        What is due by the clock is this one task's: it reads when the earliest pending job is due, sleeps
        until then (at most ``poll_seconds``, so jobs made by another process on a shared database and
        gates moved meanwhile are seen), and wakes the workers once it has come. Each idle worker used to
        do this itself, two reads per worker per poll: 16 reads a second for an idle service's four workers
        (~2 % of a core doing nothing), one here (bench/RESULTS.md, 2026-12-05).
        """
        d = self.deps
        poll = d.settings.worker.poll_seconds
        while not self._stopping:
            ok, due = await _retrying(d.jobs.next_due, self._gates_backoff, self._gates_log)
            if not ok:
                continue
            wait = poll
            if due is not None:
                left = (due - utcnow()).total_seconds()
                if left <= 0:
                    d.notifier.work.set()  # the idle workers claim it (woken again after a poll if all busy)
                else:
                    wait = min(poll, max(0.005, left))
            await asyncio.sleep(wait)

    async def _analysis(
        self,
        records: list[InstanceRecord],
        priority: int,
        datasets: Mapping[str, Dataset] | None = None,
        flagged: Flagged | None = None,
    ) -> Analysis:
        d = self.deps
        if d.settings.inference.debug_delay_ms:
            await asyncio.sleep(d.settings.inference.debug_delay_ms / 1000)
        served = set(d.engine.model_names)
        cards: dict[str, ModelCard] = {n: m.card for n, m in d.registry.models.items() if n in served}
        return await analyse_study(
            records,
            rules=d.rules,
            cards=cards,
            load_errors=dict(d.registry.errors),
            engine=d.engine,
            priority=priority,
            datasets=datasets,
            flagged=flagged,
        )

    async def process(
        self,
        job: JobInfo,
        prepared: Prepared | None = None,
        datasets: Mapping[str, Dataset] | None = None,
        context: ResultContext | None = None,
    ) -> StudyResult | None:
        """Run one claimed job to a stored result (returned) or a recorded failure (None).

        ``prepared``: the analysis a request already started on exactly this job's instances;
        ``datasets``: instances of the study the caller holds parsed (the others are read from disk);
        ``context``: what the result's build needs from the store, when the caller knows it.
        """
        d = self.deps
        token = job_id_var.set(str(job.id))
        self._running.add(job.id)
        started = prepared.started if prepared else utcnow()
        t0 = time.perf_counter()
        try:
            logger.info(
                "job started (study %s, attempt %d, priority %d)", job.study_uid, job.attempts, job.priority
            )
            records = prepared.records if prepared else await d.instances.records(job.study_uid)
            assembly = _assembly(records)
            flag: StudyResult | None = None

            async def flagged(partial: Analysis) -> None:
                """The findings on the worklist before their measurements (``measurements_pending``); a
                prepared analysis started before its job existed, and measures before its one result."""
                nonlocal flag
                flag = await self._save(
                    job, partial, started, utcnow(), assembly=assembly, context=context, pending=True
                )
                d.notifier.result_stored(flag)
                if d.settings.inference.debug_measure_delay_ms:  # the crash tests' window, held open
                    await asyncio.sleep(d.settings.inference.debug_measure_delay_ms / 1000)

            if prepared is not None:
                analysis = await prepared.analysis
            else:
                analysis = await self._analysis(records, job.priority, datasets, flagged)
            if not records:  # nothing to analyse: say why, never leave the study without an answer
                analysis.not_analysed.extend(_not_images(await d.instances.other_instances(job.study_uid)))
            if flag is not None:  # the final result supersedes the measurements-pending one
                context = replace(context, supersedes=flag.result_id) if context else None
            result = await self._save(
                job,
                analysis,
                started,
                utcnow(),
                assembly=assembly,
                context=context,
                flagged=flag.timestamps.result_stored if flag else None,
            )
            self._observe(result)
            if d.drift is not None:  # in memory, from what the analysis already holds: no DB round trip
                d.drift.observe(analysis.inputs + (analysis.shadow.inputs if analysis.shadow else []))
            logger.info(
                "job done in %.3f s: %s, priority %s, %d finding(s), %d not analysed",
                time.perf_counter() - t0,
                result.status,
                result.priority,
                len(result.findings),
                len(result.not_analysed),
            )
            d.notifier.result_stored(result)
            return result
        except asyncio.CancelledError:
            if prepared is not None:
                prepared.analysis.cancel()
            raise  # shutdown: the job stays running and recover() resets it at the next start
        except LeaseLostError as exc:  # we stalled past the lease; the job's new holder finishes it
            logger.warning("job dropped: %s", exc.detail)
            return None
        except Exception as exc:
            logger.exception("job failed")
            state = await d.jobs.fail(job.id, f"{type(exc).__name__}: {exc}", d.settings.worker.max_attempts)
            if state == JobState.FAILED:
                failed = await self._save(job, Analysis(), started, utcnow(), failed=True)
                d.notifier.result_stored(failed)
                return failed
            d.notifier.work.set()
            return None
        finally:
            self._running.discard(job.id)
            job_id_var.reset(token)

    async def _save(
        self,
        job: JobInfo,
        analysis: Analysis,
        started: datetime,
        done: datetime,
        *,
        failed: bool = False,
        assembly: Assembly | None = None,
        context: ResultContext | None = None,
        pending: bool = False,
        flagged: datetime | None = None,
    ) -> StudyResult:
        """Build the result on the study's current facts and save it; again, on facts read afresh, if
        another result of the study was saved in between (two jobs of one study may run at once: late
        images). ``context``: the facts, when the ingest that created the study returned them.
        ``pending``: a measurements-pending result (the job goes on); ``flagged``: when one was stored."""
        d = self.deps
        for attempt in range(5):
            ctx = context if attempt == 0 and context is not None else await d.results.context(job.study_uid)
            result = build_result(
                job.study_uid,
                analysis,
                StudyFacts(ctx.accession_number, ctx.first_received, ctx.last_received, ctx.supersedes),
                Hops(gate=job.not_before, started=started, done=done, stored=utcnow(), flagged=flagged),
                failed=failed,
                overrides=d.settings.worklist.priorities,
                assembly=assembly,
                measurements_pending=pending,
            )
            try:
                return await d.results.save(job, result)
            except StaleResultError:
                if attempt == 4:
                    raise
        raise AssertionError("unreachable")

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


async def _retrying(
    call: Callable[[], Awaitable[T]], backoff: Backoff, log: FailureLog
) -> tuple[bool, T | None]:
    """``(True, await call())``; if it raises (the store is away), ``(False, None)`` after the back-off's
    delay, the failing spell logged once (and its end once) rather than on every retry (issue 15)."""
    try:
        value = await call()
    except Exception as exc:
        delay = backoff.failure()
        log.failed(exc, retry_in=delay)
        await asyncio.sleep(delay)
        return False, None
    backoff.success()
    log.succeeded()
    return True, value
