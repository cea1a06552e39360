"""Metrics against hand-computed cases: AUC, bootstrap CI, thresholds, confusion matrix, FROC, series."""

from __future__ import annotations

import numpy as np
import pytest

from service.inference.postprocess import Box
from training import evaluate as ev


def test_auc_hand_computed():
    # positives 0.35, 0.8; negatives 0.1, 0.4: pairs (0.35>0.1), (0.35<0.4), (0.8>0.1), (0.8>0.4) → 3/4
    assert ev.roc_auc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == pytest.approx(0.75)
    assert ev.roc_auc([0, 1], [0.2, 0.9]) == 1.0
    assert ev.roc_auc([1, 0], [0.2, 0.9]) == 0.0


def test_auc_counts_ties_as_half():
    assert ev.roc_auc([0, 1], [0.5, 0.5]) == pytest.approx(0.5)
    # positive 0.5 vs negatives 0.5 (tie: 1/2) and 0.1 (win: 1) → 1.5 / 2
    assert ev.roc_auc([1, 0, 0], [0.5, 0.5, 0.1]) == pytest.approx(0.75)


def test_auc_needs_both_classes():
    with pytest.raises(ValueError):
        ev.roc_auc([1, 1], [0.1, 0.2])


def test_bootstrap_ci_contains_the_estimate():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 200)
    s = y * 0.8 + rng.normal(0, 0.6, 200)
    auc = ev.roc_auc(y, s)
    lo, hi = ev.bootstrap_auc_ci(y, s, n_boot=300, seed=0)
    assert lo < auc < hi
    assert 0.05 < hi - lo < 0.3
    assert ev.bootstrap_auc_ci(y, s, n_boot=300, seed=0) == (lo, hi)  # seeded


def test_threshold_for_sensitivity_is_the_highest_that_reaches_the_target():
    labels = [1] * 20 + [0] * 3
    scores = [i / 20 for i in range(1, 21)] + [0.9, 0.2, 0.1]
    t = ev.threshold_for_sensitivity(labels, scores, 0.95)  # 19 of 20 positives needed: 0.10
    assert t == pytest.approx(0.10)
    assert ev.binary_metrics(labels, scores, t)["sensitivity"] == pytest.approx(0.95)
    assert ev.binary_metrics(labels, scores, 0.11)["sensitivity"] < 0.95


def test_binary_metrics_confusion_matrix():
    m = ev.binary_metrics([1, 1, 0, 0, 0], [0.9, 0.3, 0.6, 0.2, 0.1], 0.5)
    assert m["confusion_matrix"] == {"tp": 1, "fp": 1, "fn": 1, "tn": 2}
    assert m["sensitivity"] == pytest.approx(0.5)
    assert m["specificity"] == pytest.approx(2 / 3)
    assert m["ppv"] == pytest.approx(0.5)
    assert m["f1"] == pytest.approx(0.5)


def test_hit_rule_centre_inside_or_iou():
    truth = (10.0, 10.0, 20.0, 20.0)
    assert ev.hit((12, 10, 32, 20), truth)  # centre (22, 15) outside, IoU 80/220 = 0.36
    assert not ev.hit((15, 10, 35, 20), truth)  # centre (25, 15) outside, IoU 50/250 = 0.2
    assert not ev.hit((30, 30, 40, 40), truth)
    assert ev.hit(Box(0, 0, 30, 30, 0.5), truth)  # centre (15, 15) inside


def test_froc_hand_made_case():
    # two images, three lesions; ranked 0.9 (hit A), 0.8 (FP), 0.7 (hit B), 0.6 (dup of A), 0.5 (FP)
    truths = [[(0, 0, 10, 10), (50, 50, 60, 60)], [(20, 20, 30, 30)]]
    dets = [
        [Box(1, 1, 9, 9, 0.9), Box(2, 2, 8, 8, 0.6), Box(80, 80, 90, 90, 0.5)],
        [Box(21, 21, 29, 29, 0.7), Box(70, 70, 80, 80, 0.8)],
    ]
    result = ev.froc(dets, truths)
    assert result.n_lesions == 3 and result.n_images == 2
    # after 0.9: 1/3 at 0 FP; after 0.8: 1 FP (0.5/img); after 0.7: 2/3; 0.6 ignored; after 0.5: 2 FP (1/img)
    assert result.sensitivity_at(0.0) == pytest.approx(1 / 3)
    assert result.sensitivity_at(0.5) == pytest.approx(2 / 3)
    assert result.sensitivity_at(1.0) == pytest.approx(2 / 3)
    assert ev.threshold_for_fp_rate(result, 0.5) == pytest.approx(0.6)
    assert result.at_threshold(0.7) == pytest.approx((2 / 3, 0.5))


def test_series_scores_use_aggregate_series_and_report_the_key_slice():
    probs = np.array([0.1, 0.2, 0.9, 0.8, 0.7, 0.1, 0.1, 0.95, 0.1])
    ids = ["a"] * 5 + ["b"] * 4
    idx = [4, 3, 2, 1, 0, 0, 1, 2, 3]  # series a arrives in reverse order
    scores = ev.series_scores(probs, ids, idx, window=3)
    assert scores["a"][0] == pytest.approx((0.9 + 0.8 + 0.7) / 3)
    assert scores["a"][1] == 2  # slice index 2 holds 0.9
    assert scores["b"][0] == pytest.approx((0.1 + 0.95 + 0.1) / 3)
    assert scores["b"][1] == 2
