"""The shipped classifiers' heat maps point at the lesion, as a rate over fresh generator cases.

Run through the service's own path (preprocess, ONNX Runtime, domain gate, findings, heat map on the key
image: service.inference.heatmap), on images no model saw (seeds 2070/2071 are used nowhere else). Per
true-positive case (truly positive and flagged, the cases a reader sees a heat map on):

- head CT: the map's peak on the key slice lies inside the generator's blood mask, grown by half a map
  cell (the map's own resolution: 16 model pixels per cell at 128 px, 64 source pixels at 512);
- chest radiograph: the generator draws no pneumothorax mask, only its side; the peak lies on that half.

Skips, saying why, while the shipped card has no ``cam`` output: ``python -m training explain`` adds it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from scipy.ndimage import binary_dilation

from service.inference.card import ModelCard
from service.inference.domain import assess_domain
from service.inference.heatmap import attach_heatmaps
from service.inference.postprocess import ModelImage, findings_from_outputs
from service.inference.preprocess import preprocess_dataset
from service.results.heatmap import decode_heatmap
from service.results.schema import Finding
from tests.training.generator_version import require_current_generator
from training import export as ex

MODELS = Path(__file__).resolve().parents[2] / "models"
SEED = 2070
CT_PATIENTS, CXR_PATIENTS = 40, 120
MIN_RATE = {"ct-hemorrhage": 0.7, "cxr-pneumothorax": 0.7}
"""Fraction of true-positive cases whose heat map peaks on the lesion (CT) or on its side (chest)."""


def _card(name: str) -> ModelCard:
    path = MODELS / name / "card.json"
    if not path.exists():
        pytest.skip(f"models/{name} is not shipped")
    card = ModelCard.read(path)
    if card.cam_output is None:
        pytest.skip(
            f"models/{name}/card.json has no cam output yet: add it from the checkpoint with "
            "`python -m training explain --models-dir models --runs-dir var/runs`"
        )
    require_current_generator(card)
    return card


@pytest.fixture
def ct_card() -> ModelCard:
    return _card("ct-hemorrhage")  # before `fresh`: a skip costs no generated images


@pytest.fixture
def chest_card() -> ModelCard:
    return _card("cxr-pneumothorax")


@pytest.fixture(scope="module")
def fresh(tmp_path_factory):
    from training.data.formats.generic import load_generic
    from training.data.synthetic import generate_ct, generate_cxr

    root = tmp_path_factory.mktemp("fresh-heatmap")
    generate_cxr(root / "cxr", CXR_PATIENTS, SEED + 1, workers=2)
    generate_ct(root / "ct", CT_PATIENTS, SEED, workers=2)
    return {kind: (root / kind, load_generic(root / kind)) for kind in ("cxr", "ct")}


def _flagged(card: ModelCard, series_uid: str, records: list) -> tuple[Finding, dict[str, Dataset]] | None:
    """The finding the service would make on one series (with its heat map), or None if not positive."""
    datasets: dict[str, Dataset] = {r.sop_uid: dcmread(r.path) for r in records}
    images = [ModelImage(uid, preprocess_dataset(ds, card.preprocessing)) for uid, ds in datasets.items()]
    inputs = np.concatenate([img.pre.array for img in images])
    out = ex.ort_predict(ex.ort_session(MODELS / card.name / card.file), inputs)
    verdict = assess_domain(card, inputs, out, [len(img.pre.array) for img in images])
    kept = [images[i] for i in verdict.kept]
    if not kept:
        return None
    selected = verdict.select(out)
    (finding,) = attach_heatmaps(
        card, findings_from_outputs(card, series_uid, kept, selected), kept, selected
    )
    return (finding, datasets) if finding.positive else None


def _peak(finding, ds) -> tuple[int, int]:
    """The heat map's peak in source pixels (row, column)."""
    hm = finding.heatmap
    grid = decode_heatmap(hm.values, hm.rows, hm.columns)
    gy, gx = np.unravel_index(np.argmax(grid), grid.shape)
    rows, columns = int(ds.Rows), int(ds.Columns)
    return int((gy + 0.5) * rows / hm.rows), int((gx + 0.5) * columns / hm.columns)


def test_head_ct_heat_map_peaks_inside_the_bleed(ct_card, fresh):
    from training.data.synthetic.writer import read_mask

    card = ct_card
    root, records = fresh["ct"]
    by_series: dict[str, list] = {}
    for r in records:
        by_series.setdefault(r.series_uid, []).append(r)
    hits, cases = 0, 0
    for series_uid, group in sorted(by_series.items()):
        group = sorted(group, key=lambda r: r.slice_index or 0)
        if not any(int(r.labels.get("hemorrhage", 0)) for r in group):
            continue
        flagged = _flagged(card, series_uid, group)
        if flagged is None:
            continue
        finding, datasets = flagged
        assert finding.heatmap is not None, "a positive finding of a model with a cam has a heat map"
        cases += 1
        key = next(r for r in group if r.sop_uid == finding.key_instance_uid)
        ds = datasets[key.sop_uid]
        y, x = _peak(finding, ds)
        cells = card.explanations["cam"]["shape"][-1] if card.explanations else 8
        grow = round(0.5 * int(ds.Columns) / cells)
        mask = binary_dilation(read_mask(root, key).astype(bool), iterations=grow)
        hits += bool(mask[y, x])
    assert cases >= 5, f"only {cases} true-positive series: too few to judge"
    assert hits / cases >= MIN_RATE[card.name], f"heat map inside the bleed on {hits} of {cases} series"


def test_chest_heat_map_peaks_on_the_pneumothorax_side(chest_card, fresh):
    card = chest_card
    _, records = fresh["cxr"]
    hits, cases = 0, 0
    for r in records:
        if not int(r.labels.get("pneumothorax", 0)) or r.extra.get("info_view") not in ("PA", "AP"):
            continue  # a lateral view has no left and right half
        flagged = _flagged(card, r.series_uid, [r])
        if flagged is None:
            continue
        finding, datasets = flagged
        assert finding.heatmap is not None
        cases += 1
        ds = datasets[r.sop_uid]
        _, x = _peak(finding, ds)
        right = r.extra["info_ptx_side"] == "R"  # the patient's right: the image's left on a frontal view
        hits += (x < int(ds.Columns) / 2) == right
    assert cases >= 10, f"only {cases} true-positive images: too few to judge"
    assert hits / cases >= MIN_RATE[card.name], f"heat map on the pneumothorax side on {hits} of {cases}"
