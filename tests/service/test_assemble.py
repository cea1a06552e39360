"""The assembly gates read from evidence: counts, association end, holding, the quiet timer."""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta

from service.assemble import completeness, end_gate, study_gate
from service.config import AssemblySettings
from service.ingest.associations import OpenAssociations

NOW = datetime(2026, 12, 3, 8, 0, tzinfo=UTC)
QUIET = NOW + timedelta(seconds=5)
HOLD = NOW + timedelta(seconds=600)


def test_full_series_are_complete_at_once() -> None:
    assert study_gate(QUIET, NOW, [(3, 3), (2, 2)], hold_until=HOLD) == NOW


def test_full_series_wait_for_the_timer_when_that_gate_is_off() -> None:
    assert study_gate(QUIET, NOW, [(3, 3)], complete_when_full=False) == QUIET


def test_a_short_series_is_held_while_associated_and_timed_otherwise() -> None:
    assert study_gate(QUIET, NOW, [(3, 1)], hold_until=HOLD) == HOLD
    assert study_gate(QUIET, NOW, [(3, 1)]) == QUIET  # no association open (or holding off)


def test_uncounted_series_use_the_quiet_timer() -> None:
    assert study_gate(QUIET, NOW, [(None, 7)], hold_until=HOLD) == QUIET
    # one counted short series holds the whole study, even beside an uncounted one
    assert study_gate(QUIET, NOW, [(None, 7), (4, 2)], hold_until=HOLD) == HOLD


def _end(fills, modalities, *, released=True, **settings) -> datetime | None:
    return end_gate(
        NOW, fills, modalities, quiet_until=QUIET, released=released, settings=AssemblySettings(**settings)
    )


def test_a_released_radiograph_is_complete_at_once() -> None:
    assert _end([(None, 1)], ["CR"]) == NOW
    assert _end([(None, 2), (None, 2)], ["DX", "MG"]) == NOW


def test_an_aborted_association_proves_nothing() -> None:
    assert _end([(None, 1)], ["CR"], released=False) is None
    assert _end([(4, 4)], ["CT"], released=False) == NOW  # the counts still do


def test_a_ct_without_counts_keeps_its_timer_and_a_short_one_gets_it_back() -> None:
    assert _end([(None, 40)], ["CT"]) is None
    assert _end([(40, 12)], ["CT"]) == QUIET
    assert _end([(None, 1)], ["CR", "CT"]) is None  # not every series is a single-image modality


def test_the_association_gate_can_be_switched_off() -> None:
    assert _end([(None, 1)], ["CR"], complete_on_association_end=False) is None


def test_completeness_says_what_the_counts_say() -> None:
    assert completeness([(3, 3), (2, 2)]) == (True, 5, 5)
    assert completeness([(300, 125)]) == (False, 125, 300)
    assert completeness([(None, 4), (3, 1)]) == (False, 5, 7)
    assert completeness([(None, 1)]) == (None, 1, None)


def test_open_associations_count_per_study_and_end_once() -> None:
    tracker = OpenAssociations()
    a, b = object(), object()
    tracker.stored(a, "1.2.3")
    tracker.stored(a, "1.2.3")
    tracker.stored(b, "1.2.3")
    tracker.stored(b, "1.2.4")
    assert tracker.is_open("1.2.3") and len(tracker) == 2
    end = tracker.ended(a, released=True)
    assert end.studies == () and tracker.is_open("1.2.3")  # b still carries it
    end = tracker.ended(b, released=True)
    assert end.studies == ("1.2.3", "1.2.4") and end.released
    assert tracker.ended(b, released=False).studies == ()  # the connection closing after the release
    assert not tracker.is_open("1.2.3") and len(tracker) == 0


def test_open_associations_from_many_threads() -> None:
    tracker = OpenAssociations()
    keys = [object() for _ in range(16)]

    def run(key: object) -> None:
        for _ in range(200):
            tracker.stored(key, "1.2.3")
        tracker.ended(key, released=True)

    threads = [threading.Thread(target=run, args=(k,)) for k in keys]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not tracker.is_open("1.2.3") and len(tracker) == 0
