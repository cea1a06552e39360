"""Drift alarms per model: the inputs and scores of the latest studies against a reference, and models
that stopped receiving studies.

Why: a model that silently sees another scanner, another processing chain or nothing at all (a routing rule
broken by a protocol rename) keeps its green ``model_up``. This monitor says so on ``/metrics``
(``pacs_triage_model_drift_psi``, ``pacs_triage_model_drift_alarm``), in the log (feature names and
indices only, never patient data) and in ``GET /v1/models/{name}/stats`` (``drift``).

How: each routed series gives one :class:`~service.lifecycle.drift_inputs.InputSummary` (taken while the
study is analysed). The first ``drift.reference_series`` of a model version after the process started form
its reference (the shipped cards store none; the report says where the reference came from); the next ones
fill a sliding window of ``drift.window_series``. Once the window is full, every
``drift.check_every`` series the PSI of each feature (:mod:`service.lifecycle.drift_stats`) is computed; one
above ``drift.psi_threshold`` raises the model's drift alarm. A model that received a series in this process
and none for ``drift.silence_hours`` raises its silence alarm (checked by a background loop and at each
read). Everything is in memory, per process: a restart (or a new model version) starts a new reference.
Per series the cost is a deque append; the PSI of ~10 features over two windows of a few hundred values is
computed once every ``check_every`` series, in well under a millisecond.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from service.clock import utcnow
from service.lifecycle.drift_inputs import InputSummary
from service.lifecycle.drift_stats import BinnedReference, Value

if TYPE_CHECKING:
    from service.config import DriftSettings

__all__ = ["DriftMonitor", "ModelDrift"]

logger = logging.getLogger(__name__)

METHOD = "population stability index (Siddiqi 2006), reference-decile or per-value bins"


def _features(summary: InputSummary) -> dict[str, Value]:
    values: dict[str, Value] = dict(summary.values)
    values.update({f"score:{label}": p for label, p in summary.scores.items()})
    return values


@dataclass
class ModelDrift:
    """One model's reference, window, last check and alarms."""

    version: str
    reference_size: int
    window_size: int
    reference: list[dict[str, Value]] = field(default_factory=list)
    window: deque[dict[str, Value]] = field(default_factory=deque)
    last_series_at: datetime | None = None
    since_check: int = 0
    indices: dict[str, float] = field(default_factory=dict)
    drifted: list[str] = field(default_factory=list)
    silent: bool = False
    binned: dict[str, BinnedReference] = field(default_factory=dict)
    """Each feature's reference bins, computed at the first check (the reference is full by then)."""

    def __post_init__(self) -> None:
        self.window = deque(maxlen=self.window_size)

    def add(self, values: dict[str, Value], at: datetime) -> None:
        self.last_series_at = at
        if len(self.reference) < self.reference_size:
            self.reference.append(values)
        else:
            self.window.append(values)
            self.since_check += 1

    @property
    def ready(self) -> bool:
        return len(self.reference) >= self.reference_size and len(self.window) >= self.window_size

    def check(self, threshold: float) -> None:
        """The PSI of every feature seen in the reference or the window (a label scored only in one of
        them still counts: its absence on the other side is a bin of its own)."""
        self.since_check = 0
        names = sorted({k for v in self.reference for k in v} | {k for v in self.window for k in v})
        for name in names:
            if name not in self.binned:
                self.binned[name] = BinnedReference.of([v.get(name) for v in self.reference])
        self.indices = {name: self.binned[name].psi([v.get(name) for v in self.window]) for name in names}
        self.drifted = [name for name, value in self.indices.items() if value > threshold]

    @property
    def max_index(self) -> float | None:
        return max(self.indices.values()) if self.indices else None


class DriftMonitor:
    """Every model's :class:`ModelDrift`; fed by the worker, read by ``/metrics`` and the stats route.

    All calls come from the event loop, so no lock is needed.
    """

    def __init__(self, settings: DriftSettings) -> None:
        self.settings = settings
        self.models: dict[str, ModelDrift] = {}
        self._task: asyncio.Task[None] | None = None

    def observe(self, summaries: list[InputSummary], at: datetime | None = None) -> None:
        """Take the summaries of one analysed study (the worker calls this after saving its result)."""
        if not self.settings.enabled:
            return
        at = at or utcnow()
        for summary in summaries:
            state = self.models.get(summary.model)
            if state is None or state.version != summary.version:
                state = self.models[summary.model] = ModelDrift(
                    summary.version, self.settings.reference_series, self.settings.window_series
                )
            state.add(_features(summary), at)
            if state.ready and (not state.indices or state.since_check >= self.settings.check_every):
                self._check(summary.model, state)
            if state.silent:
                self._set_silent(summary.model, state, False)

    def _check(self, model: str, state: ModelDrift) -> None:
        before = set(state.drifted)
        state.check(self.settings.psi_threshold)
        if state.drifted and set(state.drifted) != before:
            logger.warning(
                "drift alarm: model %s version %s, inputs or scores moved past PSI %.2f: %s",
                model,
                state.version,
                self.settings.psi_threshold,
                ", ".join(f"{name} {state.indices[name]:.3f}" for name in state.drifted),
            )
        elif before and not state.drifted:
            logger.info("drift alarm cleared: model %s version %s", model, state.version)

    def _set_silent(self, model: str, state: ModelDrift, silent: bool) -> None:
        state.silent = silent
        if silent:
            logger.warning(
                "silence alarm: model %s has received no study for %.1f h (last one at %s)",
                model,
                self.settings.silence_hours,
                state.last_series_at.isoformat() if state.last_series_at else "never",
            )
        else:
            logger.info("silence alarm cleared: model %s receives studies again", model)

    def check_silence(self, now: datetime | None = None) -> None:
        """Raise the silence alarm of models that used to receive studies and received none lately."""
        now = now or utcnow()
        quiet = timedelta(hours=self.settings.silence_hours)
        for model, state in self.models.items():
            silent = state.last_series_at is not None and now - state.last_series_at > quiet
            if silent != state.silent:
                self._set_silent(model, state, silent)

    def report(self, model: str, now: datetime | None = None) -> dict[str, Any] | None:
        """The ``drift`` part of ``GET /v1/models/{name}/stats``; None when the model sent nothing yet."""
        self.check_silence(now)
        state = self.models.get(model)
        if state is None:
            return None
        alarms = []
        if state.drifted:
            alarms.append(f"input or score drift: {', '.join(state.drifted)}")
        if state.silent:
            alarms.append(f"no study received for more than {self.settings.silence_hours:g} h")
        return {
            "version": state.version,
            "method": METHOD,
            "psi_threshold": self.settings.psi_threshold,
            "reference": {
                "source": f"the first {state.reference_size} series after this process started "
                "(the card stores no drift reference)",
                "series": len(state.reference),
            },
            "window": {"series": len(state.window), "size": state.window_size},
            "psi": {name: round(value, 4) for name, value in state.indices.items()} or None,
            "max_psi": None if state.max_index is None else round(state.max_index, 4),
            "last_series_at": state.last_series_at,
            "alarms": alarms,
        }

    def start(self) -> None:
        """Check for silent models in the background (the log line must come even if nobody reads)."""
        if self.settings.enabled:
            self._task = asyncio.create_task(self._loop(), name="drift-silence")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _loop(self) -> None:
        interval = min(60.0, self.settings.silence_hours * 3600 / 4)
        while True:
            await asyncio.sleep(interval)
            self.check_silence()
