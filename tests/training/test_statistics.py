"""training/statistics.py against hand-computed answers."""

from __future__ import annotations

import math

import numpy as np
import pytest

from training import statistics as st
from training.evaluate import bootstrap_auc_ci

Z = 1.959963984540054


class TestWilson:
    def test_known_intervals(self):
        # 0/10: upper z^2 / (n + z^2); 10/10 its mirror; 5/10: 0.5 -+ z sqrt(0.025 + z^2/400) / (1 + z^2/10)
        upper = Z * Z / (10 + Z * Z)
        assert st.wilson_interval(0, 10) == pytest.approx((0.0, upper))
        assert st.wilson_interval(10, 10) == pytest.approx((1 - upper, 1.0))
        half = Z * math.sqrt(0.025 + Z * Z / 400) / (1 + Z * Z / 10)
        assert st.wilson_interval(5, 10) == pytest.approx((0.5 - half, 0.5 + half))
        assert st.wilson_interval(5, 10) == pytest.approx((0.2366, 0.7634), abs=1e-4)

    def test_nine_of_nine_is_not_certainty(self):
        interval = st.wilson_interval(9, 9)
        assert interval is not None
        lo, hi = interval
        assert hi == 1.0 and lo == pytest.approx(0.7008, abs=1e-4)

    def test_empty(self):
        assert st.wilson_interval(0, 0) is None


class TestPatientBootstrap:
    def test_two_patients_perfectly_separated(self):
        assert st.patient_bootstrap_auc_ci([0, 0, 1, 1], [0.1, 0.2, 0.8, 0.9], ["a", "a", "b", "b"]) == (
            1.0,
            1.0,
        )

    def test_clustered_images_widen_the_interval(self):
        """Ten patients, five images each, identical within a patient: resampling images treats 50 as
        independent and is too narrow; resampling patients gives the interval of 10 independent cases."""
        rng = np.random.default_rng(3)
        labels = np.repeat([0, 1] * 5, 5)
        scores = np.repeat(rng.normal(0, 1, 10) + np.array([0, 0.8] * 5), 5)
        patients = np.repeat(np.arange(10), 5)
        lo_p, hi_p = st.patient_bootstrap_auc_ci(labels, scores, patients.tolist(), n_boot=500)
        lo_i, hi_i = bootstrap_auc_ci(labels, scores, n_boot=500)
        assert hi_p - lo_p > 1.5 * (hi_i - lo_i)

    def test_one_image_per_patient_is_deterministic(self):
        y, s = [0, 1, 0, 1, 1, 0], [0.1, 0.7, 0.4, 0.35, 0.9, 0.2]
        first = st.patient_bootstrap_auc_ci(y, s, list("abcdef"), n_boot=200, seed=4)
        assert first == st.patient_bootstrap_auc_ci(y, s, list("abcdef"), n_boot=200, seed=4)
        assert 0 <= first[0] <= first[1] <= 1


class TestCalibration:
    def test_known_ece(self):
        """Two bins: mean 0.1 observed 0 and mean 0.9 observed 1: ECE 0.1."""
        result = st.calibration([0, 0, 1, 1], [0.1, 0.1, 0.9, 0.9])
        assert result["ece"] == pytest.approx(0.1)
        assert [(b["mean_probability"], b["observed_rate"], b["n"]) for b in result["bins"]] == [
            (pytest.approx(0.1), 0.0, 2),
            (pytest.approx(0.9), 1.0, 2),
        ]

    def test_perfectly_calibrated_and_edges(self):
        # bin [0.2, 0.3): p 0.25, one of four positive → 0; p = 1.0 falls in the last bin
        result = st.calibration([1, 0, 0, 0, 1], [0.25, 0.25, 0.25, 0.25, 1.0])
        assert result["ece"] == pytest.approx(0.0)
        assert result["bins"][-1]["high"] == 1.0 and result["bins"][-1]["n"] == 1

    def test_reliability_plot(self, tmp_path):
        path = tmp_path / "reliability.png"
        st.plot_reliability(st.calibration([0, 1, 1], [0.2, 0.6, 0.9]), path, "test")
        assert path.stat().st_size > 1000


def test_detector_image_level():
    """Four images: lesion+box (TP), lesion no box (FN), box no lesion (FP), neither (TN) x2."""
    scores = [[0.9, 0.1], [0.2], [0.6], [], [0.3]]
    lesion = [True, True, False, False, False]
    got = st.detector_image_level(scores, lesion, threshold=0.5)
    assert got["confusion_matrix"] == {"tp": 1, "fp": 1, "fn": 1, "tn": 2}
    assert got["sensitivity"]["value"] == 0.5 and got["ppv"]["value"] == 0.5
    assert got["specificity"]["value"] == pytest.approx(2 / 3)
    assert got["specificity"]["ci95_wilson"] == pytest.approx(st.wilson_interval(2, 3))


@pytest.mark.parametrize("task", ["classification", "series_classification", "detection"])
def test_evaluate_onnx_reports_intervals_calibration_and_image_level(task, tmp_path):
    """The shipping evaluation puts the new statistics on the card (tiny untrained model, random images)."""
    from pathlib import Path

    import torch

    from training import export as ex
    from training.data.records import BoxLabel, Record
    from training.dataset import PreprocessedSet
    from training.held_out import evaluate_onnx
    from training.models.classifier import ResNetClassifier
    from training.models.detector import CenterNetDetector

    torch.manual_seed(0)
    model = CenterNetDetector((4, 8, 8, 16)) if task == "detection" else ResNetClassifier((4, 8, 8, 16))
    onnx_path = tmp_path / "model.onnx"
    ex.export_onnx(model.eval(), onnx_path, 32, 32)
    rng = np.random.default_rng(0)

    def data(n: int, seed: int) -> PreprocessedSet:
        labels = ((np.arange(n) // 4) % 2).astype(np.float32)  # whole series positive or negative
        records = [
            Record(Path(f"{seed}-{i}.dcm"), f"p{seed}-{i // 4}", "s", f"series{seed}-{i // 4}", f"sop{i}",
                   {"x": int(labels[i])}, (BoxLabel(8, 8, 16, 16, "x"),) if labels[i] else (), i % 4)
            for i in range(n)
        ]  # fmt: skip
        boxes = [
            np.array([[8, 8, 16, 16]], np.float32) if y else np.zeros((0, 4), np.float32) for y in labels
        ]
        images = rng.normal(0, 1, (n, 1, 32, 32)).astype(np.float32)
        return PreprocessedSet(records, images, labels, boxes)

    threshold, _, metrics, plots = evaluate_onnx(
        task, ex.ort_session(onnx_path), data(32, 1), data(32, 2), tmp_path, "t"
    )
    if task == "detection":
        image_level = metrics["test"]["at_threshold"]["image_level"]
        assert image_level["threshold"] == threshold and sum(image_level["confusion_matrix"].values()) == 32
        return
    assert len(metrics["auc_ci95_patient_bootstrap"]) == 2
    at = metrics["at_threshold"]
    cm = at["confusion_matrix"]
    assert at["sensitivity_ci95_wilson"] == pytest.approx(st.wilson_interval(cm["tp"], cm["tp"] + cm["fn"]))
    op = metrics["operating_point"]
    assert op["threshold"] == threshold and op["threshold_ci95_patient_bootstrap"][0] <= threshold
    assert threshold <= op["threshold_ci95_patient_bootstrap"][1]
    positives = 16 if task == "classification" else 4  # images, or whole series
    assert op["validation"]["n_positive"] == metrics["positives"]["validation"] == positives
    assert metrics["positives"] == {"validation": positives, "test": positives, "aim_per_set": 200}
    assert metrics["aim"] is None  # "t" has no aim band
    if task == "classification":
        assert 0.5 <= metrics["shortcut"]["auc"] <= 1
        assert metrics["subgroups"]["modality"]["(none)"]["n"] == 32  # records without the column: one group
    else:  # the HU rule reads the DICOM files, which these records do not have
        assert metrics["shortcut"] is None
        assert metrics["subgroups"]["kernel"]["(none)"]["n"] == 8
    assert 0 <= metrics["calibration"]["ece"] <= 1 and {p.name for p in plots} == {
        "roc.png",
        "reliability.png",
    }


def test_evaluate_onnx_uses_the_plans_sensitivity_target(tmp_path):
    """A lower target gives a threshold at or above the 0.95 one, and the card's rule names the target."""
    from pathlib import Path

    import torch

    from training import export as ex
    from training.data.records import Record
    from training.dataset import PreprocessedSet
    from training.held_out import evaluate_onnx
    from training.models.classifier import ResNetClassifier

    torch.manual_seed(0)
    onnx_path = tmp_path / "model.onnx"
    ex.export_onnx(ResNetClassifier((4, 8, 8, 16)).eval(), onnx_path, 32, 32)
    rng = np.random.default_rng(1)

    def data(n: int, seed: int) -> PreprocessedSet:
        labels = (np.arange(n) % 2).astype(np.float32)
        records = [
            Record(Path(f"{seed}-{i}.dcm"), f"p{seed}-{i}", "s", f"s{seed}-{i}", f"sop{i}", {"x": int(y)})
            for i, y in enumerate(labels)
        ]
        images = rng.normal(0, 1, (n, 1, 32, 32)).astype(np.float32)
        images[labels == 1] += np.linspace(0, 2, int(labels.sum()))[:, None, None, None]  # graded signal
        return PreprocessedSet(records, images, labels, [np.zeros((0, 4), np.float32)] * n)

    val, test = data(64, 1), data(64, 2)
    session = ex.ort_session(onnx_path)
    strict, strict_rule, strict_metrics, _ = evaluate_onnx(
        "classification", session, val, test, tmp_path, "t"
    )
    loose, loose_rule, loose_metrics, _ = evaluate_onnx(
        "classification", session, val, test, tmp_path, "t", sensitivity_target=0.75
    )
    assert "sensitivity >= 0.95" in strict_rule and "sensitivity >= 0.75" in loose_rule
    assert loose >= strict
    assert loose_metrics["operating_point"]["validation"]["sensitivity"] >= 0.75
    assert strict_metrics["operating_point"]["validation"]["sensitivity"] >= 0.95
