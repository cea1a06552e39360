"""Fit each shipped model's input-domain reference and write it into its card (no retraining).

``python -m training domain`` runs :func:`ship_domain` for every model folder. In order:

1. :func:`add_embedding_output`: the ONNX graph gets one more output, ``embedding``, the penultimate-layer
   features (the input of the classifier's final linear layer; for the detector the global average of the
   deepest encoder stage, what its feature pyramid starts from). Only nodes are added; the old outputs are
   checked bit-identical on real inputs (:func:`check_outputs_unchanged`) before the file replaces the old
   one, and the card's sha256, size and outputs are updated;
2. three fresh generator sets with seeds training never used: *fit* (mean and shrunk covariance),
   *calibration*, pooled and scored out of fold (the thresholds: together they turn away at most
   :data:`IN_DOMAIN_REJECTION` of in-domain images or series), and *held-out* (the in-domain rejection rate
   the card reports, positives and negatives apart);
3. the constructed out-of-domain sets of :mod:`training.ood`, run through the card's own gate
   (:func:`service.inference.domain.assess_domain`): the card reports the fraction of each it catches.

Covariance: Ledoit & Wolf (2004) shrinkage towards a scaled identity, on standardised features (the input
statistics have unlike scales), so 128 embedding dimensions fit on a few hundred images stay invertible.
"""

from __future__ import annotations

import logging
import re
import shutil
import tempfile
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from statistics import NormalDist
from typing import Any

import numpy as np

from service.inference.card import DomainScore, DomainSpec, ModelCard, encode_floats, sha256_file
from service.inference.domain_features import (
    INPUT_FEATURES,
    TEXTURE_FEATURES,
    input_statistics,
    texture_statistics,
)
from training.data.records import Record
from training.dataset import PreprocessedSet, preprocess_records
from training.export import ort_predict, ort_session

__all__ = [
    "EMBEDDING_OUTPUT",
    "IN_DOMAIN_REJECTION",
    "SCORES",
    "add_embedding_output",
    "check_outputs_unchanged",
    "fit_score",
    "ledoit_wolf",
    "ship_domain",
]

log = logging.getLogger(__name__)

EMBEDDING_OUTPUT = "embedding"
CROSS_FIT_FOLDS = 5
IN_DOMAIN_REJECTION = 0.01
"""What the gate may turn away of in-domain inputs, all scores together: half the issue's 2 % aim, because
a held-out set of a few hundred images (or 40 series) measures a rate with a standard error near 1 %. Each
of the k scores gets ``IN_DOMAIN_REJECTION / k`` (a union bound: session 6's three scores, each at its own
0.995 quantile of 211 calibration images, turned away 4 of 67 fresh films)."""
SCORES: dict[str, tuple[str, tuple[str, ...]]] = {
    "input": ("input", INPUT_FEATURES),
    "texture": ("texture", TEXTURE_FEATURES),
    "embedding": ("output", ()),
}
"""Each domain score's name → (its DomainScore source, its feature names)."""


def add_embedding_output(src: Path, dst: Path) -> int:
    """Write ``src`` with an extra ``embedding`` output ``[N, dim]`` to ``dst``; returns ``dim``."""
    import onnx
    from onnx import TensorProto, helper

    model = onnx.load(str(src))
    graph = model.graph
    if any(o.name == EMBEDDING_OUTPUT for o in graph.output):
        raise ValueError(f"{src} already has an output {EMBEDDING_OUTPUT!r}")
    weights = {init.name: list(init.dims) for init in graph.initializer}
    head = [n for n in graph.node if n.op_type == "Gemm" and "head.weight" in n.input]
    if head:  # classifier: the pooled, flattened features the final linear layer reads
        source, dim = head[0].input[0], weights["head.weight"][1]
        graph.node.append(helper.make_node("Identity", [source], [EMBEDDING_OUTPUT], name="embedding_out"))
    else:  # detector: the deepest encoder stage, the input of the last lateral 1x1 convolution
        lateral = {}
        for node in graph.node:
            for name in node.input:
                match = re.fullmatch(r"backbone\.lateral\.(\d+)\.weight", name)
                if match and node.op_type == "Conv":
                    lateral[int(match.group(1))] = (node.input[0], weights[name][1])
        if not lateral:
            raise ValueError(f"{src}: no classifier head or detector lateral convolution to tap")
        source, dim = lateral[max(lateral)]
        graph.node.append(
            helper.make_node("GlobalAveragePool", [source], ["embedding_pool"], name="embedding_gap")
        )
        graph.node.append(
            helper.make_node("Flatten", ["embedding_pool"], [EMBEDDING_OUTPUT], axis=1, name="embedding_out")
        )
    batch = graph.output[0].type.tensor_type.shape.dim[0]
    batch_dim = batch.dim_param or (batch.dim_value if batch.dim_value else "batch")
    graph.output.append(helper.make_tensor_value_info(EMBEDDING_OUTPUT, TensorProto.FLOAT, [batch_dim, dim]))
    onnx.checker.check_model(model)
    onnx.save(model, str(dst))
    return int(dim)


def check_outputs_unchanged(
    old: Path, new: Path, inputs: np.ndarray, except_outputs: Collection[str] = ()
) -> None:
    """Every output of ``old`` but ``except_outputs`` (ones being rebuilt on purpose) must come out of
    ``new`` bit-identical on ``inputs``; raises AssertionError otherwise."""
    before, after = ort_predict(ort_session(old), inputs), ort_predict(ort_session(new), inputs)
    for name, value in before.items():
        if name in except_outputs:
            continue
        if name not in after or not np.array_equal(value, after[name]):
            raise AssertionError(f"output {name!r} changed after adding an output to the graph")


def ledoit_wolf(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """Mean, shrunk covariance ``(1 - s) S + s mu I`` and the shrinkage ``s`` (Ledoit & Wolf 2004)."""
    x = np.asarray(x, dtype=np.float64)
    n, p = x.shape
    mean = x.mean(axis=0)
    z = x - mean
    sample = z.T @ z / n
    mu = np.trace(sample) / p
    delta = np.sum((sample - mu * np.eye(p)) ** 2) / p
    beta = (np.sum(np.sum(z**2, axis=1) ** 2) - n * np.sum(sample**2)) / (n * n * p)
    shrink = float(min(max(beta, 0.0), delta) / delta) if delta > 0 else 1.0
    return mean, (1 - shrink) * sample + shrink * mu * np.eye(p), shrink


def fit_score(features: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """(mean, precision, shrinkage) in the features' own units, fitted on standardised features."""
    scale = np.asarray(features, dtype=np.float64).std(axis=0)
    scale = np.where(scale > 1e-9, scale, 1.0)
    mean, cov, shrink = ledoit_wolf(features / scale)
    precision = np.linalg.inv(cov) / np.outer(scale, scale)
    return mean * scale, precision, shrink


def _aggregate(scores: np.ndarray, data: PreprocessedSet, unit: str) -> tuple[np.ndarray, np.ndarray]:
    """Per image, or per series the median over its slices; returns (scores, labels: any positive)."""
    if unit == "image":
        return scores, data.labels
    series = [r.series_uid for r in data.records]
    keys = sorted(set(series))
    grouped = {k: [i for i, s in enumerate(series) if s == k] for k in keys}
    return (
        np.array([np.median(scores[grouped[k]]) for k in keys]),
        np.array([float(data.labels[grouped[k]].max()) for k in keys]),
    )


def score_level(n_scores: int) -> float:
    """The quantile each of ``n_scores`` scores is thresholded at (:data:`IN_DOMAIN_REJECTION`)."""
    return 1.0 - IN_DOMAIN_REJECTION / n_scores


def _threshold(calibration: np.ndarray, unit: str, level: float) -> float:
    """The ``level`` quantile of the (out-of-fold) calibration scores.

    Per image (~630 chest films) the empirical quantile. Per series there are only ~160 head CT series,
    and an empirical 0.997 quantile of so few values is their maximum: with 80, session 6 measured 7.5 % of
    held-out series above it. There the tail is estimated instead: the log-scores' mean plus ``z(level)``
    standard deviations (a log-normal fit; Mahalanobis distances are positive and right-skewed), never
    below the empirical quantile.
    """
    empirical = float(np.quantile(calibration, level))
    if unit != "series":
        return empirical
    logs = np.log(np.maximum(np.asarray(calibration, dtype=np.float64), 1e-12))
    z = NormalDist().inv_cdf(level)
    return max(empirical, float(np.exp(logs.mean() + z * logs.std(ddof=1))))


def _features(
    name: str, data: PreprocessedSet, outputs: dict[str, np.ndarray], card: ModelCard
) -> np.ndarray:
    if name == "input":
        return input_statistics(data.images, card.preprocessing)
    if name == "texture":
        return texture_statistics(data.images, card.preprocessing)
    return outputs[EMBEDDING_OUTPUT]


def _rates(outside: np.ndarray, labels: np.ndarray) -> dict[str, Any]:
    return {
        "rejected": float(outside.mean()),
        "n": int(len(outside)),
        "rejected_positive": float(outside[labels == 1].mean()) if (labels == 1).any() else None,
        "rejected_negative": float(outside[labels == 0].mean()) if (labels == 0).any() else None,
    }


def _pooled(a: PreprocessedSet, b: PreprocessedSet) -> PreprocessedSet:
    return PreprocessedSet(
        [*a.records, *b.records], np.concatenate([a.images, b.images]), np.concatenate([a.labels, b.labels]),
        [*a.boxes, *b.boxes],
    )  # fmt: skip


def _out_of_fold(features: np.ndarray, data: PreprocessedSet) -> np.ndarray:
    """Each row's score under a reference fitted without its series (:data:`CROSS_FIT_FOLDS` folds)."""
    from service.inference.domain import mahalanobis

    series = [r.series_uid for r in data.records]
    fold_of = {key: i % CROSS_FIT_FOLDS for i, key in enumerate(sorted(set(series)))}
    folds = np.array([fold_of[s] for s in series])
    out = np.zeros(len(series))
    for fold in range(CROSS_FIT_FOLDS):
        mean, precision, _ = fit_score(features[folds != fold])
        out[folds == fold] = mahalanobis(features[folds == fold], mean, precision)
    return out


def fit_domain(
    card: ModelCard, onnx_path: Path, sets: dict[str, PreprocessedSet], seeds: dict[str, int]
) -> DomainSpec:
    """The :class:`DomainSpec` of ``card`` from the *fit*, *calibration* and *held-out* sets.

    *fit* and *calibration* are pooled and every series (a chest film is a series of one) is scored by a
    reference fitted without it (5 folds by series): a reference scores the images it was fitted on too
    kindly, and slices of one head CT series are far from independent, so a reference fitted on 40
    patients' slices is tighter than the next patient. The thresholds are quantiles of those out-of-fold
    scores, per image (chest) or per series (the median over its slices, head CT), at
    :func:`score_level`; the reference itself is fitted on the whole pool. Session 6 thresholded the chest
    scores on the 211 calibration images alone: each 0.995 quantile was about their second-largest value.
    """
    from service.inference.domain import mahalanobis

    unit = "series" if card.task == "series_classification" else "image"
    sets = {"fit": _pooled(sets["fit"], sets["calibration"]), "held_out": sets["held_out"]}
    level = score_level(len(SCORES))
    session = ort_session(onnx_path)
    outputs = {part: ort_predict(session, data.images) for part, data in sets.items()}
    scores, outside_cal, outside_test = [], [], []
    for name, (source, names) in SCORES.items():
        features = {part: _features(name, data, outputs[part], card) for part, data in sets.items()}
        mean, precision, shrink = fit_score(features["fit"])
        cal, cal_y = _aggregate(_out_of_fold(features["fit"], sets["fit"]), sets["fit"], unit)
        test, test_y = _aggregate(mahalanobis(features["held_out"], mean, precision), sets["held_out"], unit)
        threshold = _threshold(cal, unit, level)
        outside_cal.append(cal > threshold)
        outside_test.append(test > threshold)
        log.info("%s %s: shrinkage %.3f, threshold %.3g", card.name, name, shrink, threshold)
        scores.append(
            DomainScore(
                name=name,
                source=source,
                output=EMBEDDING_OUTPUT if source == "output" else None,
                features=list(names),
                dim=len(mean),
                mean=encode_floats(mean),
                precision=encode_floats(precision),
                threshold=threshold,
            )
        )
    report = {
        "method": (
            "Mahalanobis distance to the pooled fit and calibration sets (Ledoit-Wolf shrunk covariance) of "
            "the input statistics, of the finest-scale texture (noise and Laplacian at two scales) and of "
            f"the penultimate-layer embedding; threshold per score at the {level:.4f} quantile of its "
            f"out-of-fold {unit} scores (5 folds by series)"
            f"{', log-normal tail fit, never below the empirical quantile' if unit == 'series' else ''}; "
            f"outside when any score is above its threshold (at most {IN_DOMAIN_REJECTION:.0%} of in-domain "
            f"{unit}s in all, a union bound)"
        ),
        "seeds": seeds,
        "fit": {"images": len(sets["fit"]), "series": len({r.series_uid for r in sets["fit"].records})},
        "calibration": _rates(np.any(outside_cal, axis=0), cal_y),
        "held_out": _rates(np.any(outside_test, axis=0), test_y),
    }
    return DomainSpec(unit=unit, scores=scores, report=report)


def ship_domain(
    model_dir: Path,
    sets: Mapping[str, Sequence[Record]],
    seeds: dict[str, int],
    ood: dict[str, list[list[Any]]],
) -> ModelCard:
    """Add the embedding output and the domain reference to ``model_dir``'s model and card.

    ``sets`` has *fit*, *calibration* and *held_out* records; ``ood`` maps a description to a list of
    "series" (lists of pydicom datasets) built by :mod:`training.ood`, whose caught fraction the card
    reports. Rewrites model.onnx, card.json and card.md.
    """
    from training.export import write_card_md

    card = ModelCard.read(model_dir / "card.json")
    label = card.labels[0].name
    data = {part: preprocess_records(records, card.preprocessing, label) for part, records in sets.items()}
    onnx_path = model_dir / card.file
    with tempfile.TemporaryDirectory() as tmp:
        candidate = Path(tmp) / card.file
        if EMBEDDING_OUTPUT not in card.outputs:
            add_embedding_output(onnx_path, candidate)
            check_outputs_unchanged(onnx_path, candidate, data["held_out"].images[:64])
        else:
            shutil.copy2(onnx_path, candidate)
        outputs = [o for o in card.outputs if o != EMBEDDING_OUTPUT] + [EMBEDDING_OUTPUT]
        staged = card.model_copy(update={"outputs": outputs, "domain": None})
        domain = fit_domain(staged, candidate, data, seeds)
        staged = staged.model_copy(update={"domain": domain})
        domain.report["out_of_domain_caught"] = _ood_report(staged, candidate, ood)
        shutil.copy2(candidate, onnx_path)
    final = ModelCard.model_validate(
        {
            **staged.model_dump(mode="json"),
            "sha256": sha256_file(onnx_path),
            "size_bytes": onnx_path.stat().st_size,
        }
    )
    final.write(model_dir / "card.json")
    plots = sorted(model_dir.glob("*.png"))
    write_card_md(final, model_dir, plots)
    return final


def _ood_report(card: ModelCard, onnx_path: Path, ood: dict[str, list[list[Any]]]) -> dict[str, Any]:
    """The fraction of each constructed out-of-domain set the card's gate turns away."""
    from service.inference.domain import assess_domain
    from service.inference.preprocess import preprocess_dataset

    session = ort_session(onnx_path)
    report = {}
    for description, groups in ood.items():
        caught = 0
        for datasets in groups:
            pre = [preprocess_dataset(ds, card.preprocessing).array for ds in datasets]
            inputs = np.concatenate(pre)
            verdict = assess_domain(card, inputs, ort_predict(session, inputs), [len(p) for p in pre])
            caught += (
                len(datasets) - len(verdict.kept)
                if card.domain and card.domain.unit == "image"
                else (0 if verdict.kept else 1)
            )
        total = sum(len(g) for g in groups) if card.domain and card.domain.unit == "image" else len(groups)
        report[description] = {"caught": caught / total if total else None, "n": total}
    return report
