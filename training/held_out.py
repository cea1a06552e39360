"""Held-out evaluation of an exported model: ONNX Runtime outputs on validation and test, into card metrics.

:func:`evaluate_onnx` is step 4 of :mod:`training.ship`: the threshold (the operating point) is chosen on
validation, with a patient-level bootstrap CI of that choice; the test set is then scored once with it.
Besides the headline (AUC with image- and patient-level CIs, FROC for the detector), the card gets Wilson
intervals, calibration, subgroups (:mod:`training.subgroups`), the shortcut check
(:mod:`training.shortcuts`), the positives per set against the aim of 200, and where the result fell against
the aim band.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from service.inference.postprocess import decode_detections
from training import evaluate as ev
from training import shortcuts as sc
from training import statistics as st
from training import subgroups as sg
from training.dataset import PreprocessedSet
from training.export import ort_predict
from training.models.detector import STRIDE

__all__ = [
    "AGGREGATION_WINDOW",
    "DETECTION_FLOOR",
    "FP_RATE_TARGET",
    "SENSITIVITY_TARGET",
    "evaluate_onnx",
    "series_units",
]

SENSITIVITY_TARGET = 0.95
FP_RATE_TARGET = 1.0
AGGREGATION_WINDOW = 3
SUBGROUP_KEYS = ("modality", "info_view", "info_photometric", "info_processing")
CT_SUBGROUP_KEYS = ("info_kernel",)
DETECTION_FLOOR = 0.02
"""Lowest heatmap score decoded when measuring FROC (the curve needs low-scoring detections too)."""


def detections(outputs: dict[str, np.ndarray], floor: float) -> list[list[Any]]:
    return [
        decode_detections(outputs["heatmap"][i], outputs["size"][i], STRIDE, floor)
        for i in range(len(outputs["heatmap"]))
    ]


def series_units(
    data: PreprocessedSet, probs: np.ndarray, window: int = AGGREGATION_WINDOW
) -> tuple[list[str], np.ndarray, np.ndarray, list[int]]:
    """Series ids, series labels (any positive slice), series scores and key slice indices."""
    ids = [r.series_uid for r in data.records]
    idx = [r.slice_index if r.slice_index is not None else i for i, r in enumerate(data.records)]
    scores = ev.series_scores(probs, ids, idx, window=window)
    order = list(scores)
    labels = dict.fromkeys(order, 0)
    positive_slices: dict[str, set[int]] = {s: set() for s in order}
    for sid, i, lab in zip(ids, idx, data.labels, strict=True):
        if lab == 1:
            labels[sid] = 1
            positive_slices[sid].add(i)
    key_hits = [scores[s][1] in positive_slices[s] for s in order]
    return (
        order,
        np.array([labels[s] for s in order], dtype=np.float64),
        np.array([scores[s][0] for s in order]),
        [int(h) for h in key_hits],
    )


def evaluate_onnx(
    plan_task: str,
    session: Any,
    val: PreprocessedSet,
    test: PreprocessedSet,
    out_dir: Path,
    title: str,
    sensitivity_target: float = SENSITIVITY_TARGET,
) -> tuple[float, str, dict[str, Any], list[Path]]:
    """Threshold on validation, metrics on test, plots; all from ONNX Runtime outputs.

    A classifier's threshold is the highest with validation sensitivity >= ``sensitivity_target`` (the
    plan's; see :class:`training.ship.ModelPlan`).
    Returns ``(threshold, threshold_rule, metrics, plot paths)``.
    """
    val_out, test_out = ort_predict(session, val.images), ort_predict(session, test.images)
    if plan_task == "detection":
        val_froc = ev.froc(detections(val_out, DETECTION_FLOOR), [[tuple(b) for b in bx] for bx in val.boxes])
        threshold = ev.threshold_for_fp_rate(val_froc, FP_RATE_TARGET)
        test_froc = ev.froc(
            detections(test_out, DETECTION_FLOOR), [[tuple(b) for b in bx] for bx in test.boxes]
        )
        sens, fp = test_froc.at_threshold(threshold)
        plot = out_dir / "froc.png"
        ev.plot_froc(test_froc, plot, title, threshold)
        test_dets = detections(test_out, DETECTION_FLOOR)
        image_level = st.detector_image_level(
            [[d.score for d in dets] for dets in test_dets], [len(bx) > 0 for bx in test.boxes], threshold
        )
        flagged = [[d.score for d in dets] for dets in test_dets]
        by_group = {
            key.removeprefix("info_"): {
                value: st.detector_image_level(
                    [f for f, r in zip(flagged, test.records, strict=True) if r.extra.get(key) == value],
                    [
                        len(b) > 0
                        for b, r in zip(test.boxes, test.records, strict=True)
                        if r.extra.get(key) == value
                    ],
                    threshold,
                )
                for value in sorted({r.extra.get(key, "") for r in test.records})
            }
            for key in SUBGROUP_KEYS
        }
        radii = [[float(v) for v in r.extra.get("info_nodule_radii", "").split()] for r in test.records]
        if all(len(rs) == len(b) for rs, b in zip(radii, test.boxes, strict=True)):
            by_group["nodule_radius"] = sg.nodule_size_sensitivity(test_dets, test.boxes, radii, threshold)
        metrics: dict[str, Any] = {
            "test": {
                "froc": test_froc.summary(),
                "at_threshold": {"sensitivity": sens, "fp_per_image": fp, "image_level": image_level},
                "n_images": test_froc.n_images,
                "n_lesions": test_froc.n_lesions,
                "subgroups": by_group,
            },
            "validation": {"froc": val_froc.summary(), "n_images": val_froc.n_images},
            "hit_rule": f"detection centre inside a true box or IoU >= {ev.HIT_IOU}; one hit per lesion",
            "positives": _positives(val, test),
            "aim": sg.aim_verdict(title, test_froc.summary()["sensitivity_at_1_fp"]),
        }
        rule = f"lowest detection score with <= {FP_RATE_TARGET:g} false positive per image on validation"
        return threshold, rule, metrics, [plot]
    val_p, test_p = val_out["probability"][:, 0], test_out["probability"][:, 0]
    metrics = {}
    unit = "image"
    if plan_task == "series_classification":
        unit = "series"
        has_both = len(np.unique(test.labels)) == 2
        metrics["slice_auc_test"] = ev.roc_auc(test.labels, test_p) if has_both else None
        _, val_y, val_s, _ = series_units(val, val_p)
        _, test_y, test_s, key_hits = series_units(test, test_p)
        true_pos = [h for h, y in zip(key_hits, test_y, strict=True) if y == 1]
        metrics["key_slice_on_hemorrhage_fraction"] = float(np.mean(true_pos)) if true_pos else None
    else:
        val_y, val_s, test_y, test_s = val.labels, val_p, test.labels, test_p
    operating = sg.operating_point(
        val_y,
        val_s,
        _patients(val, unit),
        lambda y, s: ev.threshold_for_sensitivity(y, s, sensitivity_target),
    )
    threshold = operating["threshold"]
    auc = ev.roc_auc(test_y, test_s)
    ci = ev.bootstrap_auc_ci(test_y, test_s, n_boot=1000, seed=0)
    patients = _patients(test, unit)
    plot, reliability = out_dir / "roc.png", out_dir / "reliability.png"
    ev.plot_roc(test_y, test_s, threshold, plot, title, ci)
    calibration = st.calibration(test_y, test_s)
    st.plot_reliability(calibration, reliability, f"{title}: calibration ({unit}s)")
    at = ev.binary_metrics(test_y, test_s, threshold)
    cm = at["confusion_matrix"]
    patient_ci = st.patient_bootstrap_auc_ci(test_y, test_s, patients)
    extras = _extras(test, unit)
    lesion_key = "info_hemorrhage_type" if unit == "series" else "info_ptx_size"
    keys = CT_SUBGROUP_KEYS if unit == "series" else SUBGROUP_KEYS
    shortcut: dict[str, Any] | None = None
    if unit == "image":
        feature = [sc.lung_asymmetry(image[0]) for image in test.images]
        name = "left-right difference of mean lung-zone brightness"
        shortcut = {"feature": name, "auc": sc.feature_auc(test_y, feature), "model_auc": auc}
    elif all(r.path.exists() for r in test.records):  # the HU rule needs the files' HU, not the window
        blood = sc.series_blood_fraction(test.records)
        feature = [blood[uid] for uid in series_units(test, test_p)[0]]
        name = "largest fraction of head pixels at 50-90 HU (acute-blood range) over slices"
        shortcut = {"feature": name, "auc": sc.feature_auc(test_y, feature), "model_auc": auc}
    metrics.update(
        {
            "operating_point": operating,
            "subgroups": sg.subgroups(test_y, test_s, threshold, extras, keys),
            "lesion_subgroups": sg.lesion_subgroups(
                test_y, test_s, threshold, [e.get(lesion_key, "") for e in extras]
            ),
            "shortcut": shortcut,
            "positives": _positives(val, test, val_y, test_y),
            "aim": sg.aim_verdict(title, auc, patient_ci),
        }
    )
    metrics.update(
        {
            "unit": unit,
            "auc": auc,
            "auc_ci95": [ci[0], ci[1]],
            "auc_ci95_patient_bootstrap": list(patient_ci),
            "at_threshold": {
                **at,
                "sensitivity_ci95_wilson": st.wilson_interval(cm["tp"], cm["tp"] + cm["fn"]),
                "specificity_ci95_wilson": st.wilson_interval(cm["tn"], cm["tn"] + cm["fp"]),
            },
            "calibration": calibration,
            "validation_auc": ev.roc_auc(val_y, val_s),
            "validation_sensitivity_at_threshold": ev.binary_metrics(val_y, val_s, threshold)["sensitivity"],
        }
    )
    rule = f"highest {unit} probability with sensitivity >= {sensitivity_target:g} on validation"
    return threshold, rule, metrics, [plot, reliability]


def _positives(
    val: PreprocessedSet, test: PreprocessedSet, val_y: Any = None, test_y: Any = None
) -> dict[str, Any]:
    """Positive units (images, series; for the detector images with a lesion and lesions) against the aim."""
    if val_y is None:
        return {
            "validation_images": int(sum(len(b) > 0 for b in val.boxes)),
            "validation_lesions": int(sum(len(b) for b in val.boxes)),
            "test_images": int(sum(len(b) > 0 for b in test.boxes)),
            "test_lesions": int(sum(len(b) for b in test.boxes)),
            "aim_per_set": sg.MIN_POSITIVES,
        }
    return {"validation": int(np.sum(val_y)), "test": int(np.sum(test_y)), "aim_per_set": sg.MIN_POSITIVES}


def _extras(data: PreprocessedSet, unit: str) -> list[dict[str, str]]:
    """Per scored unit, the record's ``extra`` (for a series, its first slice's, plus its modality)."""
    if unit == "image":
        return [{**r.extra} for r in data.records]
    first: dict[str, dict[str, str]] = {}
    for r in data.records:
        first.setdefault(r.series_uid, {**r.extra})
    order = series_units(data, np.zeros(len(data.records)))[0]
    return [first[s] for s in order]


def _patients(data: PreprocessedSet, unit: str) -> list[str]:
    """The patient of each scored unit: per image, or per series in :func:`_series`' order."""
    if unit == "image":
        return [r.patient_id for r in data.records]
    by_series = {r.series_uid: r.patient_id for r in data.records}
    ids = [r.series_uid for r in data.records]
    idx = [r.slice_index if r.slice_index is not None else i for i, r in enumerate(data.records)]
    return [by_series[s] for s in ev.series_scores(np.zeros(len(ids)), ids, idx, window=AGGREGATION_WINDOW)]
