"""The input-domain gate, training side: the embedding output, the shrinkage estimate, and the shipped
references on fresh in-domain images and on out-of-domain images constructed here (training.ood).

Seeds 2050/2051 are used nowhere else (training 0/1, the card's fit sets 3101-3203, the shipped-model test
2026-2034), so these in-domain images are new to the gate as well as to the model.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from pydicom.dataset import Dataset

from service.inference.card import ModelCard
from service.inference.domain import assess_domain
from service.inference.preprocess import preprocess_dataset
from tests.training.generator_version import require_current_generator
from training import export as ex
from training import ood
from training.domain import (
    EMBEDDING_OUTPUT,
    add_embedding_output,
    check_outputs_unchanged,
    fit_score,
    ledoit_wolf,
)
from training.models.classifier import ResNetClassifier
from training.models.detector import CenterNetDetector

MODELS = Path(__file__).resolve().parents[2] / "models"
NAMES = ("cxr-pneumothorax", "cxr-nodule", "ct-hemorrhage")
SIZE = 32


class TestEmbeddingOutput:
    @pytest.mark.parametrize("kind", ["classifier", "detector"])
    def test_added_output_is_the_penultimate_features_and_old_outputs_are_unchanged(self, kind, tmp_path):
        torch.manual_seed(0)
        widths = (4, 8, 8, 16)
        model = (ResNetClassifier(widths) if kind == "classifier" else CenterNetDetector(widths)).eval()
        old, new = tmp_path / "old.onnx", tmp_path / "new.onnx"
        ex.export_onnx(model, old, SIZE, SIZE)
        assert add_embedding_output(old, new) == 16
        x = np.random.default_rng(0).normal(0, 1, (5, 1, SIZE, SIZE)).astype(np.float32)
        check_outputs_unchanged(old, new, x)
        got = ex.ort_predict(ex.ort_session(new), x)[EMBEDDING_OUTPUT]
        with torch.no_grad():
            t = torch.from_numpy(x)
            if isinstance(model, ResNetClassifier):
                expected = model.pool(model.backbone(t)).flatten(1)
            else:
                encoder = model.backbone.encoder
                out = model.backbone.pool(encoder.stem(t))
                for stage in encoder.stages:
                    out = stage(out)
                expected = out.mean(dim=(2, 3))
        np.testing.assert_allclose(got, expected.numpy(), atol=1e-5)
        with pytest.raises(ValueError, match="already has"):
            add_embedding_output(new, tmp_path / "twice.onnx")


class TestShrinkage:
    def test_known_answer(self):
        """x = (+-1, 0), (0, +-2): S = diag(0.5, 2), mu 1.25, delta 0.5625, beta 17/32, s = 0.9444."""
        x = np.array([[1.0, 0], [-1, 0], [0, 2], [0, -2]])
        mean, cov, shrink = ledoit_wolf(x)
        s = (17 / 32) / 0.5625
        assert shrink == pytest.approx(s)
        np.testing.assert_allclose(mean, [0, 0])
        np.testing.assert_allclose(cov, (1 - s) * np.diag([0.5, 2.0]) + s * 1.25 * np.eye(2))

    def test_scaled_identity_needs_no_shrinkage_target_change(self):
        x = np.concatenate([np.eye(3) * math.sqrt(3), -np.eye(3) * math.sqrt(3)])  # S = I exactly
        _, cov, shrink = ledoit_wolf(x)
        assert shrink == 1.0
        np.testing.assert_allclose(cov, np.eye(3))

    def test_more_dimensions_than_samples_stays_invertible(self):
        x = np.random.default_rng(1).normal(size=(20, 50)) * np.linspace(1, 100, 50)
        mean, precision, shrink = fit_score(x)
        assert 0 < shrink <= 1 and np.all(np.linalg.eigvalsh(precision) > 0)
        np.testing.assert_allclose(mean, x.mean(axis=0))


class TestThreshold:
    def test_three_scores_share_one_percent(self):
        from training.domain import IN_DOMAIN_REJECTION, score_level

        assert IN_DOMAIN_REJECTION == 0.01
        assert score_level(3) == pytest.approx(1 - 0.01 / 3)

    def test_per_image_is_the_empirical_quantile(self):
        from training.domain import _threshold

        scores = np.arange(1, 1001, dtype=float)
        assert _threshold(scores, "image", 0.995) == pytest.approx(np.quantile(scores, 0.995))

    def test_per_series_extrapolates_the_tail_of_few_series(self):
        """80 log-normal scores: the fitted 0.995 quantile (z 2.5758), beyond the sample's own quantile."""
        from training.domain import _threshold

        logs = np.random.default_rng(0).normal(1.0, 0.3, 80)
        got = _threshold(np.exp(logs), "series", 0.995)
        assert got == pytest.approx(np.exp(logs.mean() + 2.5758293 * logs.std(ddof=1)))
        assert got >= np.quantile(np.exp(logs), 0.995)


# ----------------------------------------------------------------------------- the shipped references

shipped = pytest.mark.skipif(
    not all((MODELS / n / "card.json").exists() for n in NAMES), reason="models/ has no shipped models"
)


@pytest.fixture(scope="module")
def fresh(tmp_path_factory):
    from training.data.formats.generic import load_generic
    from training.data.synthetic import generate_ct, generate_cxr

    root = tmp_path_factory.mktemp("fresh-domain")
    # Sizes: the in-domain test's bound is the card's 2 % plus two binomial standard errors of this set, so
    # a set too small has a bound that a gate meeting the aim fails by chance: 50 films (bound 5.4 %) turned
    # 4 of 67 away in session 7 while three other seeds' sets turned away 0-1 of ~67 (the gate's rate on the
    # four together, 1.5 %); 150 patients (~200 films, bound 4.0 %) and 20 series (bound 8.3 %) measure it.
    cxr = generate_cxr(root / "cxr", 150, 2050, workers=2)
    ct = generate_ct(root / "ct", 20, 2051, workers=2)
    return {"cxr": load_generic(cxr.parent), "ct": load_generic(ct.parent)}


def _series(records):
    from pydicom import dcmread

    groups: dict[str, list] = {}
    for r in records:
        groups.setdefault(r.series_uid, []).append(r)
    return [[dcmread(r.path) for r in sorted(g, key=lambda r: r.slice_index or 0)] for g in groups.values()]


def _rejected(name: str, series: list[list]) -> list[bool]:
    """Per series (CT) or per image (CXR): did the shipped gate turn it away?"""
    card = ModelCard.read(MODELS / name / "card.json")
    session = ex.ort_session(MODELS / name / card.file)
    out = []
    for datasets in series:
        arrays = [preprocess_dataset(ds, card.preprocessing).array for ds in datasets]
        inputs = np.concatenate(arrays)
        verdict = assess_domain(card, inputs, ex.ort_predict(session, inputs), [len(a) for a in arrays])
        if card.domain is not None and card.domain.unit == "series":
            out.append(not verdict.kept)
        else:
            out.extend(i not in verdict.kept for i in range(len(datasets)))
    return out


@shipped
@pytest.mark.parametrize("name", NAMES)
def test_card_carries_the_reference_and_reports_at_most_2_percent(name):
    card = ModelCard.read(MODELS / name / "card.json")
    assert card.domain is not None and EMBEDDING_OUTPUT in card.outputs
    assert {s.name for s in card.domain.scores} == {"input", "texture", "embedding"}
    held_out = card.domain.report["held_out"]
    # The aim is <= 2 %; the held-out sets are 219 images or 40 series, so allow two binomial SEs over it.
    assert held_out["rejected"] <= 0.02 + 2 * math.sqrt(0.02 * 0.98 / held_out["n"]), held_out
    assert all(r["caught"] >= 0.9 for r in card.domain.report["out_of_domain_caught"].values())
    assert "Validated input domain" in (MODELS / name / "card.md").read_text(encoding="utf-8")


@shipped
@pytest.mark.parametrize("name", NAMES)
def test_fresh_in_domain_images_pass(name, fresh):
    """At most the card's 2 % plus two binomial standard errors of this small set."""
    require_current_generator(ModelCard.read(MODELS / name / "card.json"))
    rejected = _rejected(name, _series(fresh["ct" if name.startswith("ct-") else "cxr"]))
    bound = 0.02 + 2 * math.sqrt(0.02 * 0.98 / len(rejected))
    assert np.mean(rejected) <= bound, (name, sum(rejected), len(rejected))


@shipped
@pytest.mark.parametrize("name", ["cxr-pneumothorax", "cxr-nodule"])
def test_chest_models_turn_away_other_sources_and_processing(name, fresh):
    from pydicom import dcmread

    from tests.pydicom_files import pydicom_testdata

    films = [s[0] for s in _series(fresh["cxr"])]
    images = films[:4]
    # Heavy unsharp masking is a processing chain, not another source: the gate's aim there is the battery's
    # "caught" rule (>= 90 %, training/robustness.py), and the card reports the rate on 30 films. Both chest
    # models now train with one console pass (unsharp <= 2), which leaves their embeddings less moved by it:
    # measured on 200 fresh films, cxr-pneumothorax turns away 91.5 % and cxr-nodule 96.5 %; on the 8.5 %
    # let through the pneumothorax model raised no false flag (it misses more, 6 of 10 found against 8 of 10
    # unprocessed). So: the rate on 40 films, at least 90 % less two binomial standard errors.
    sharpened = _rejected(name, [[ood.unsharp(ds, 4.0)] for ds in films[:40]])
    bound = 0.9 - 2 * math.sqrt(0.9 * 0.1 / len(sharpened))
    assert np.mean(sharpened) >= bound, (name, "unsharp masking amount 4", sum(sharpened), len(sharpened))
    built: dict[str, list[Dataset]] = {
        # beyond training's extra console pass (unsharp <= 2, gamma 0.5-2, noise <= 2 %: the robustness
        # battery asks the model to hold there, tests/training/test_robustness.py)
        "noise 10%": [ood.noise(ds, 0.10, i) for i, ds in enumerate(images)],
        "heavy smoothing": [ood.blur(ds, 4.0) for ds in images],
        "chest made another way": [ood.other_chest(images[0], seed=100 + i, size=768) for i in range(4)],
        "limb": [ood.limb(images[0], seed=100 + i) for i in range(4)],
        "uniform noise": [ood.noise_image(images[0], seed=7)],
        "real MR labelled chest": [dcmread(pydicom_testdata("MR_small.dcm"))],
    }
    for description, datasets in built.items():
        rejected = _rejected(name, [[ds] for ds in datasets])
        assert all(rejected), (name, description, rejected)


@shipped
def test_head_ct_model_turns_away_other_phantoms(fresh):
    heads = _series(fresh["ct"])[:2]
    built = {
        "Shepp-Logan head phantom": [ood.shepp_logan_head(s, i) for i, s in enumerate(heads)],
        "noise series": [[ood.noise_image(ds, i) for i, ds in enumerate(heads[0])]],
        "heavy unsharp masking": [[ood.unsharp(ds, 3.0, 0.01) for ds in heads[0]]],
    }
    for description, series in built.items():
        assert all(_rejected("ct-hemorrhage", series)), description
