"""The drift monitor: the gauge moves when fed shifted inputs or scores and stays put for in-distribution
ones; a model that stops receiving studies raises its silence alarm; nothing of a patient is logged."""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta

import numpy as np
import pytest

from service.config import DriftSettings
from service.inference.card import DriftReference
from service.inference.domain import InputSummary
from service.lifecycle.drift import DriftMonitor
from service.metrics import Metrics

SIZE = 300
T0 = datetime(2026, 1, 1, tzinfo=UTC)


def summaries(
    rng: np.random.Generator, n: int, *, brightness: float = 0.5, score: float = 0.2, other: float = 0.0
) -> list[InputSummary]:
    """``n`` series of one chest model: ``other`` the fraction from another manufacturer."""
    return [
        InputSummary(
            model="cxr",
            version="1",
            values={
                "manufacturer": "OTHER" if rng.random() < other else "ACME",
                "pixel_spacing": 0.139,
                "window_center": 2048.0,
                "window_width": 4096.0,
                "image_size": "2048x2048",
                "mean_intensity": float(rng.normal(brightness, 0.05)),
            },
            scores={"pneumothorax": float(np.clip(rng.normal(score, 0.1), 0, 1))},
        )
        for _ in range(n)
    ]


def gauges(metrics: Metrics, monitor: DriftMonitor) -> dict[str, float]:
    metrics.set_drift(monitor)
    out = {}
    for family in metrics.registry.collect():
        if family.name.startswith("pacs_triage_model_drift"):
            for sample in family.samples:
                out[f"{sample.name}{sorted(sample.labels.items())}"] = sample.value
    return out


@pytest.fixture
def monitor() -> DriftMonitor:
    return DriftMonitor(DriftSettings(reference_series=SIZE, window_series=SIZE, check_every=10))


def test_in_distribution_inputs_leave_the_gauge_low(monitor: DriftMonitor) -> None:
    rng = np.random.default_rng(1)
    metrics = Metrics()
    monitor.observe(summaries(rng, SIZE))
    assert gauges(metrics, monitor) == {
        "pacs_triage_model_drift_alarm[('kind', 'drift'), ('model', 'cxr')]": 0.0,
        "pacs_triage_model_drift_alarm[('kind', 'silence'), ('model', 'cxr')]": 0.0,
    }  # no PSI until the window is full
    for _ in range(3):  # the window slides over three windows' worth of the same distribution
        monitor.observe(summaries(rng, SIZE))
        state = monitor.models["cxr"]
        assert state.max_index is not None and state.max_index < 0.1
        assert state.drifted == []
    values = gauges(metrics, monitor)
    assert values["pacs_triage_model_drift_psi[('model', 'cxr')]"] < 0.1
    assert values["pacs_triage_model_drift_alarm[('kind', 'drift'), ('model', 'cxr')]"] == 0.0


def test_shifted_inputs_move_the_gauge_and_raise_the_alarm(
    monitor: DriftMonitor, caplog: pytest.LogCaptureFixture
) -> None:
    rng = np.random.default_rng(2)
    metrics = Metrics()
    monitor.observe(summaries(rng, 2 * SIZE))
    assert gauges(metrics, monitor)["pacs_triage_model_drift_psi[('model', 'cxr')]"] < 0.1
    with caplog.at_level(logging.WARNING, "service.lifecycle.drift"):
        monitor.observe(summaries(rng, SIZE, brightness=0.56, other=0.4))
    values = gauges(metrics, monitor)
    assert values["pacs_triage_model_drift_psi[('model', 'cxr')]"] > 0.25
    assert values["pacs_triage_model_drift_alarm[('kind', 'drift'), ('model', 'cxr')]"] == 1.0
    assert monitor.models["cxr"].drifted == ["manufacturer", "mean_intensity"]
    assert "drift alarm: model cxr version 1" in caplog.text and "mean_intensity" in caplog.text
    report = monitor.report("cxr")
    assert report is not None and report["alarms"] == ["input or score drift: manufacturer, mean_intensity"]
    assert "first 300 series after this process started" in report["reference"]["source"]

    # the site goes back to what it was: once the window holds only such series, the alarm clears
    monitor.observe(summaries(rng, SIZE))
    assert gauges(metrics, monitor)["pacs_triage_model_drift_alarm[('kind', 'drift'), ('model', 'cxr')]"] == 0


def test_shifted_scores_alone_raise_the_alarm(monitor: DriftMonitor) -> None:
    rng = np.random.default_rng(3)
    monitor.observe(summaries(rng, 2 * SIZE))
    monitor.observe(summaries(rng, SIZE, score=0.3))
    assert monitor.models["cxr"].drifted == ["score:pneumothorax"]


def test_a_new_model_version_starts_a_new_reference(monitor: DriftMonitor) -> None:
    rng = np.random.default_rng(4)
    monitor.observe(summaries(rng, 2 * SIZE))
    newer = [InputSummary("cxr", "2", s.values, s.scores) for s in summaries(rng, 5)]
    monitor.observe(newer)
    state = monitor.models["cxr"]
    assert (state.version, len(state.reference), len(state.window), state.indices) == ("2", 5, 0, {})


def test_a_model_that_stops_receiving_studies_raises_the_silence_alarm(
    monitor: DriftMonitor, caplog: pytest.LogCaptureFixture
) -> None:
    rng = np.random.default_rng(5)
    monitor.observe(summaries(rng, 3), at=T0)
    monitor.check_silence(T0 + timedelta(hours=23))
    assert not monitor.models["cxr"].silent
    with caplog.at_level(logging.WARNING, "service.lifecycle.drift"):
        report = monitor.report("cxr", now=T0 + timedelta(hours=25))
    assert report is not None and report["alarms"] == ["no study received for more than 24 h"]
    assert "silence alarm: model cxr has received no study for 24.0 h" in caplog.text
    monitor.observe(summaries(rng, 1), at=T0 + timedelta(hours=26))
    assert not monitor.models["cxr"].silent
    assert monitor.report("unknown-model") is None


def test_disabled_monitor_keeps_nothing() -> None:
    monitor = DriftMonitor(DriftSettings(enabled=False))
    monitor.observe(summaries(np.random.default_rng(6), 3))
    assert monitor.models == {}


def card_reference(rng: np.random.Generator, n: int = SIZE) -> DriftReference:
    """A card's reference written from the same kind of series the site sends (values per series)."""
    rows = [s.features() for s in summaries(rng, n)]
    names = sorted({k for r in rows for k in r})
    return DriftReference(
        source="held-out generator images", series=n, features={k: [r.get(k) for r in rows] for k in names}
    )


def test_the_cards_reference_is_used_from_the_first_series() -> None:
    rng = np.random.default_rng(7)
    settings = DriftSettings(reference_series=SIZE, window_series=SIZE, check_every=10)
    monitor = DriftMonitor(settings, {"cxr": ("1", card_reference(rng))})
    monitor.observe(summaries(rng, SIZE, brightness=0.56, other=0.4))  # one window, no reference taken
    state = monitor.models["cxr"]
    assert (len(state.reference), len(state.window)) == (0, SIZE)
    assert state.drifted == ["manufacturer", "mean_intensity"]
    report = monitor.report("cxr")
    assert report is not None
    assert report["reference"] == {
        "source": f"the model card's drift reference: {SIZE} series of held-out generator images",
        "series": SIZE,
    }
    monitor.observe(summaries(rng, SIZE))  # the site looks like the validated domain: the alarm clears
    assert state.drifted == [] and state.max_index is not None and state.max_index < 0.1


def test_the_cards_reference_survives_json_and_another_version_falls_back() -> None:
    rng = np.random.default_rng(8)
    reread = DriftReference.model_validate_json(card_reference(rng).model_dump_json())
    monitor = DriftMonitor(DriftSettings(reference_series=SIZE, window_series=SIZE), {"cxr": ("1", reread)})
    monitor.observe(summaries(rng, SIZE))
    assert monitor.models["cxr"].max_index is not None and monitor.models["cxr"].max_index < 0.1
    newer = [InputSummary("cxr", "2", s.values, s.scores) for s in summaries(rng, 5)]
    monitor.observe(newer)  # the card describes version 1 only
    state = monitor.models["cxr"]
    assert (state.card_reference, len(state.reference)) == (None, 5)


def test_a_reference_with_uneven_features_is_refused() -> None:
    with pytest.raises(ValueError, match="one value per series"):
        DriftReference(source="x", series=2, features={"manufacturer": ["A"]})
