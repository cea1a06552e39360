"""The shipped models in models/ are what their cards say: re-measured, not trusted.

For each ``models/<name>/``: the ONNX file's sha256 and size match ``card.json``; the card validates with
the service's ``ModelCard``; and the ONNX model, run through ONNX Runtime on a **freshly generated** synthetic
set (another seed than training used, so no image was seen in training, validation or the card's test set),
reproduces the card's headline metric within a tolerance that reflects the fresh set's size:

- AUC (image-level for cxr-pneumothorax, series-level for ct-hemorrhage):
  ``fresh >= card - max(0.05, 2 * SE)``, SE the larger Hanley-McNeil standard error at the card's and at the
  fresh AUC, with the fresh set's numbers of positives and negatives (an AUC of 1.0 has SE 0, hence both);
- detection (cxr-nodule): FROC sensitivity at 1 FP/image ``fresh >= card - max(0.10, 2 * SE)``, SE the
  binomial standard error at the card's sensitivity with the fresh set's number of nodules.

Only lower bounds: a fresh set may be easier than the test set by chance, and that does not make a card
dishonest. No metric value is typed in here; every number comes from the card or the fresh run.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from service.inference.card import ModelCard, sha256_file
from tests.training.generator_version import current_for, require_current_generator, trained_on

MODELS = Path(__file__).resolve().parents[2] / "models"
NAMES = ("cxr-pneumothorax", "cxr-nodule", "ct-hemorrhage")
FRESH_SEED = 2026
FRESH_CXR_PATIENTS = 110
FRESH_CT_PATIENTS = 40
MAX_ONNX_BYTES = 25 * 1024 * 1024

if not all((MODELS / n / "card.json").exists() for n in NAMES):
    pytest.skip(
        "models/ has no shipped models (card.json missing); build them with scripts/retrain-models",
        allow_module_level=True,
    )


def hanley_mcneil_se(auc: float, n_pos: int, n_neg: int) -> float:
    """Standard error of an AUC estimate (Hanley & McNeil 1982)."""
    q1, q2 = auc / (2 - auc), 2 * auc**2 / (1 + auc)
    var = (auc * (1 - auc) + (n_pos - 1) * (q1 - auc**2) + (n_neg - 1) * (q2 - auc**2)) / (n_pos * n_neg)
    return math.sqrt(max(var, 0.0))


@pytest.fixture(scope="module")
def fresh(tmp_path_factory):
    """Fresh CXR and CT records, generated once for the module with a seed training never used."""
    from training.data.formats.generic import load_generic
    from training.data.synthetic import generate_ct, generate_cxr

    root = tmp_path_factory.mktemp("fresh")
    cxr = generate_cxr(root / "cxr", FRESH_CXR_PATIENTS, FRESH_SEED, workers=2)
    ct = generate_ct(root / "ct", FRESH_CT_PATIENTS, FRESH_SEED + 1, workers=2)
    return {"cxr": load_generic(cxr.parent), "ct": load_generic(ct.parent)}


@pytest.mark.parametrize("name", NAMES)
def test_card_validates_and_sha256_matches(name):
    folder = MODELS / name
    card = ModelCard.read(folder / "card.json")
    onnx_path = folder / card.file
    assert card.name == name
    assert sha256_file(onnx_path) == card.sha256
    assert onnx_path.stat().st_size == card.size_bytes <= MAX_ONNX_BYTES
    assert card.intended_use == "demonstration model, not for clinical use"
    assert card.parity["max_abs_diff"] <= 1e-4 and card.parity["n_inputs"] == 32
    assert (folder / "card.md").exists() and (folder / "training_curve.png").exists()
    assert (folder / ("froc.png" if card.task == "detection" else "roc.png")).exists()


@pytest.mark.parametrize("name", NAMES)
def test_trained_on_the_current_generator(name):
    """Fails until the shipped models are retrained after the generator changed (the remedy is named)."""
    card = ModelCard.read(MODELS / name / "card.json")
    assert trained_on(card) == current_for(card), (
        f"{name}: trained on generator version {trained_on(card)}, the generator is at {current_for(card)}; "
        "run scripts/retrain-models"
    )


@pytest.mark.parametrize("name", ["cxr-pneumothorax", "ct-hemorrhage"])
def test_fresh_auc_matches_the_card(name, fresh):
    from training.ship import remeasure

    card = ModelCard.read(MODELS / name / "card.json")
    require_current_generator(card)
    records = fresh["ct" if name.startswith("ct-") else "cxr"]
    got = remeasure(MODELS / name, records)
    n_pos = got["at_threshold"]["n_positive"]
    n_neg = got["at_threshold"]["n"] - n_pos
    claimed = card.metrics["auc"]
    se = max(hanley_mcneil_se(claimed, n_pos, n_neg), hanley_mcneil_se(got["auc"], n_pos, n_neg))
    tolerance = max(0.05, 2 * se)
    assert got["auc"] >= claimed - tolerance, (got, claimed, tolerance)


def test_fresh_froc_matches_the_card(fresh):
    from training.ship import remeasure

    card = ModelCard.read(MODELS / "cxr-nodule" / "card.json")
    require_current_generator(card)
    got = remeasure(MODELS / "cxr-nodule", fresh["cxr"])
    claimed = card.metrics["test"]["froc"]["sensitivity_at_1_fp"]
    se = math.sqrt(claimed * (1 - claimed) / max(1, got["n_lesions"]))
    tolerance = max(0.10, 2 * se)
    assert got["froc"]["sensitivity_at_1_fp"] >= claimed - tolerance, (got, claimed, tolerance)


def test_preprocessing_version_2_gives_the_same_input_as_version_1(tmp_path):
    """The shipped cards moved to preprocessing version 2 without retraining: that is only honest if
    version 2 feeds the models bit-identical input on the images they were trained and measured on."""
    import numpy as np
    from pydicom import dcmread

    from service.inference.preprocess import preprocess_dataset
    from training.data.synthetic import generate_ct, generate_cxr

    generate_cxr(tmp_path / "cxr", 12, FRESH_SEED + 7)
    generate_ct(tmp_path / "ct", 1, FRESH_SEED + 8)
    for name in NAMES:
        spec = ModelCard.read(MODELS / name / "card.json").preprocessing
        assert spec.version == 2
        files = sorted((tmp_path / ("ct" if name.startswith("ct-") else "cxr")).rglob("*.dcm"))
        assert len(files) >= 12
        for path in files:
            ds = dcmread(path)
            old = preprocess_dataset(ds, spec.model_copy(update={"version": 1})).array
            np.testing.assert_array_equal(preprocess_dataset(ds, spec).array, old)
