"""The population stability index: zero for equal samples, small for draws of one distribution, large for
a shift, and finite when a bin is empty on one side."""

from __future__ import annotations

import numpy as np

from service.lifecycle.drift_stats import BINS, _edges, histogram, psi


def test_equal_samples_have_no_drift() -> None:
    values = list(np.linspace(0, 1, 200))
    assert psi(values, values) == 0.0
    assert psi(["ACME"] * 50, ["ACME"] * 80) == 0.0


def test_draws_of_one_distribution_stay_below_the_usual_threshold() -> None:
    rng = np.random.default_rng(7)
    for _ in range(5):
        reference, window = rng.normal(0.5, 0.1, 300), rng.normal(0.5, 0.1, 300)
        assert psi(list(reference), list(window)) < 0.1


def test_a_shift_of_half_a_standard_deviation_is_significant() -> None:
    rng = np.random.default_rng(8)
    reference, window = rng.normal(0.5, 0.1, 300), rng.normal(0.55, 0.1, 300)
    assert psi(list(reference), list(window)) > 0.25


def test_a_new_category_or_a_missing_value_is_a_bin_of_its_own() -> None:
    reference = ["ACME"] * 300
    value = psi(reference, ["ACME"] * 150 + ["OTHER"] * 150)
    assert 0.25 < value < float("inf")
    assert psi([0.14] * 300, [0.14] * 150 + [None] * 150) > 0.25


def test_bins_are_deciles_or_values() -> None:
    reference = list(np.linspace(0, 1, 1001))
    edges = _edges(reference)
    assert edges is not None and len(edges) == BINS - 1
    assert sorted(histogram(edges, reference).values()) == [100] * 9 + [101]
    assert histogram(edges, [None, 0.5, 2.0]) == {None: 1, 5: 1, 9: 1}
    assert _edges([0.1, 0.2, 0.1, None]) is None  # few distinct numbers: by value
    assert histogram(None, [0.2, 0.3, None]) == {0.2: 1, 0.3: 1, None: 1}
    assert _edges(["512x512", None]) is None
