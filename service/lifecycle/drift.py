"""Drift alarms per model: the inputs and scores of the latest studies against a reference, and models
that stopped receiving studies.

Why: a model that silently sees another scanner, another processing chain or nothing at all (a routing rule
broken by a protocol rename) keeps its green ``model_up``. This monitor says so on ``/metrics``
(``pacs_triage_model_drift_psi``, ``pacs_triage_model_drift_alarm``), in the log (feature names and
indices only, never patient data) and in ``GET /v1/models/{name}/stats`` (``drift``).

How: each routed series gives one :class:`~service.inference.domain.InputSummary` (taken while the
study is analysed). The reference is the card's ``drift_reference`` when it has one: the same values
measured at export on held-out in-domain series through the serving path, so the alarm says "the site's
studies are not like those the model was validated on" from the first full window. A card without one
(models trained elsewhere) takes the first ``drift.reference_series`` of the model version after the
process started; the report says which. The latest ``drift.window_series`` fill a sliding window. Once the
window is full, every ``drift.check_every`` series the PSI of each feature
(:mod:`service.lifecycle.drift_stats`) is computed; one above ``drift.psi_threshold`` raises the model's
drift alarm. A model that received a series in this process and none for ``drift.silence_hours`` raises
its silence alarm (checked by a background loop and at each read). Everything else is in memory, per
process: a restart (or a new model version) starts a new window. Per series the cost is a deque append; the
PSI of ~10 features over two windows of a few hundred values is computed once every ``check_every``
series, in well under a millisecond.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from service.clock import utcnow
from service.inference.domain import InputSummary
from service.lifecycle.drift_stats import BinnedReference, Value

if TYPE_CHECKING:
    from service.config import DriftSettings
    from service.inference.card import DriftReference

__all__ = ["DriftMonitor", "ModelDrift"]

logger = logging.getLogger(__name__)

METHOD = "population stability index (Siddiqi 2006), reference-decile or per-value bins"


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
    card_reference: DriftReference | None = None
    """The card's reference: when set, ``reference`` stays empty and every series goes to the window."""

    def __post_init__(self) -> None:
        self.window = deque(maxlen=self.window_size)
        if self.card_reference is not None:
            self.reference_size = 0

    @property
    def source(self) -> str:
        if self.card_reference is not None:
            ref = self.card_reference
            return f"the model card's drift reference: {ref.series} series of {ref.source}"
        return (
            f"the first {self.reference_size} series after this process started "
            "(the card stores no drift reference)"
        )

    @property
    def reference_series(self) -> int:
        return self.card_reference.series if self.card_reference is not None else len(self.reference)

    def _reference_values(self, name: str) -> list[Value]:
        if self.card_reference is not None:
            values = self.card_reference.features.get(name)
            return list(values) if values is not None else [None] * self.card_reference.series
        return [v.get(name) for v in self.reference]

    def _reference_names(self) -> set[str]:
        if self.card_reference is not None:
            return set(self.card_reference.features)
        return {k for v in self.reference for k in v}

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
        names = sorted(self._reference_names() | {k for v in self.window for k in v})
        for name in names:
            if name not in self.binned:
                self.binned[name] = BinnedReference.of(self._reference_values(name))
        self.indices = {name: self.binned[name].psi([v.get(name) for v in self.window]) for name in names}
        self.drifted = [name for name, value in self.indices.items() if value > threshold]

    @property
    def max_index(self) -> float | None:
        return max(self.indices.values()) if self.indices else None


class DriftMonitor:
    """Every model's :class:`ModelDrift`; fed by the worker, read by ``/metrics`` and the stats route.

    All calls come from the event loop, so no lock is needed.
    """

    def __init__(
        self, settings: DriftSettings, references: Mapping[str, tuple[str, DriftReference]] | None = None
    ) -> None:
        """``references``: model name -> (version, the card's drift reference), for the loaded models whose
        card has one; a series of another version of that model falls back to the first-series reference."""
        self.settings = settings
        self.references = dict(references or {})
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
                version, card_reference = self.references.get(summary.model, (None, None))
                state = self.models[summary.model] = ModelDrift(
                    summary.version,
                    self.settings.reference_series,
                    self.settings.window_series,
                    card_reference=card_reference if version == summary.version else None,
                )
            state.add(dict(summary.features()), at)
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
            "reference": {"source": state.source, "series": state.reference_series},
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
