"""The robustness battery (training/robustness.py) as a test: rates, not timings.

Each shipped card lists every perturbation with a verdict measured on the domain reference's held-out set.
Here the battery runs again on fresh images (seeds 2060/2061, used nowhere else): a perturbation the card
says *holds* or is *caught* must not come out *neither*. The fresh sets are small, so "holds" allows the
card's tolerance plus two binomial standard errors of this set (each rate against the same images' before
the perturbation, as on the card). What the card reports as *neither* is a
known weakness: those cases run as non-strict expected failures (a set this small can neither confirm nor
refute a borderline weakness: several are caught or hold here), and a separate test requires card.md to
list every one of them, so none is hidden.

Also checked by hand-made cases: the perturbations do what their names say (rotation maps boxes with the
pixels, partial volume touches only the skull edge, HU offsets move HU).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from service.inference.card import ModelCard
from tests.service.dicom_factory import make_dataset
from tests.training.generator_version import current_for, require_current_generator, trained_on
from training import robustness as rb
from training.export import ort_session
from training.ood import with_pixels

MODELS = Path(__file__).resolve().parents[2] / "models"
NAMES = ("cxr-pneumothorax", "cxr-nodule", "ct-hemorrhage")


def _card(name: str) -> ModelCard | None:
    path = MODELS / name / "card.json"
    return ModelCard.read(path) if path.exists() else None


CASES = [
    (name, perturbation.name)
    for name in NAMES
    if (card := _card(name)) is not None and card.robustness
    for perturbation in (rb.CT_BATTERY if name.startswith("ct-") else rb.CXR_BATTERY)
]


@pytest.fixture(scope="module")
def fresh(tmp_path_factory):
    from training.data.formats.generic import load_generic
    from training.data.synthetic import generate_ct, generate_cxr

    root = tmp_path_factory.mktemp("fresh-robustness")
    cxr = generate_cxr(root / "cxr", 40, 2060, workers=2)
    # 30 head CT series (~15 with blood): a series sensitivity on the 10 series of session 6 rested on two to
    # four positives, so one series flipping moved it by 0.25-0.5, beyond any tolerance
    ct = generate_ct(root / "ct", 30, 2061, workers=2)
    return {"cxr": load_generic(cxr.parent), "ct": load_generic(ct.parent)}


@pytest.fixture(scope="module")
def battery(fresh):
    """The whole battery per model on the fresh images, computed once."""
    results = {}
    for name in NAMES:
        card = _card(name)
        if card is None or not card.robustness or trained_on(card) != current_for(card):
            continue  # nothing to compare (the test skips with the reason)
        series = card.task == "series_classification"
        cases = rb.cases_from_records(fresh["ct" if series else "cxr"], card.labels[0].name, series)
        results[name] = rb.run_battery(
            card, ort_session(MODELS / name / card.file), cases, rb.CT_BATTERY if series else rb.CXR_BATTERY
        )
    return results


def _widened(base: float | None, n: int) -> float:
    p = 0.5 if base is None else min(max(base, 0.05), 0.95)
    return rb.TOLERANCE + 2 * math.sqrt(p * (1 - p) / max(n, 1))


@pytest.mark.parametrize(("name", "perturbation"), CASES)
def test_battery_matches_the_card(name, perturbation, battery, request):
    card = _card(name)
    assert card is not None and card.robustness is not None, name
    require_current_generator(card)
    claimed = card.robustness["perturbations"][perturbation]["verdict"]
    if claimed == "neither":
        reason = f"{name}: the card reports {perturbation!r} as neither"
        request.applymarker(pytest.mark.xfail(reason=reason, strict=False))
    result = battery[name]
    row = result["perturbations"][perturbation]
    base = row["unperturbed"]  # the same images before the perturbation (paired, as the card's verdict)
    if row["rejected"] >= rb.CAUGHT:
        return  # caught on fresh images too
    for key in ("sensitivity", "specificity"):
        if row[key] is not None and base[key] is not None:
            # the standard error of a rate rests on its own denominator (the negatives for specificity),
            # not on every image: with all 54 films the nodule detector's flip row failed at 0.233 > 0.220
            # (session 10) where its ~30 clean films give 0.26
            assert abs(row[key] - base[key]) <= _widened(base[key], row[f"n_{key}"]), (
                name,
                perturbation,
                key,
                row,
                base,
            )


@pytest.mark.parametrize("name", [n for n in NAMES if (c := _card(n)) is not None and c.robustness])
def test_card_md_lists_every_weakness(name):
    card = _card(name)
    assert card is not None and card.robustness is not None
    rows = card.robustness["perturbations"]
    assert set(rows) == {p.name for p in (rb.CT_BATTERY if name.startswith("ct-") else rb.CXR_BATTERY)}
    text = (MODELS / name / "card.md").read_text(encoding="utf-8")
    for perturbation, row in rows.items():
        assert f"| {perturbation} |" in text
        if row["verdict"] == "neither":
            assert perturbation in text.split("Neither held nor caught")[1]


# ------------------------------------------------------------------------------ the perturbations themselves


def test_rotation_maps_boxes_with_the_pixels():
    pixels = np.zeros((64, 64), np.uint16)
    pixels[10:14, 40:44] = 4000  # a bright square, centre (41.5, 11.5) in (x, y)
    ds = make_dataset(rows=64, columns=64, pixels=pixels)
    ds.BitsStored = 12
    for degrees in (10.0, -20.0, 90.0):
        moved, mapper = rb._rotate(degrees)(ds, 0)
        ys, xs = np.nonzero(moved.pixel_array > 2000)
        x0, y0, x1, y1 = mapper((40.0, 10.0, 44.0, 14.0))
        assert x0 - 1 <= xs.mean() <= x1 + 1 and y0 - 1 <= ys.mean() <= y1 + 1, degrees


def test_crop_and_flip_map_boxes():
    ds = make_dataset(rows=100, columns=80, pixels=np.arange(8000, dtype=np.uint16).reshape(100, 80) % 4096)
    ds.BitsStored = 12
    cropped, mapper = rb._crop(0.10)(ds, 0)
    assert (cropped.Rows, cropped.Columns) == (84, 64) and mapper((20, 20, 30, 30)) == (12, 12, 22, 22)
    padded, mapper = rb._crop(-0.10)(ds, 0)
    assert (padded.Rows, padded.Columns) == (116, 96) and mapper((20, 20, 30, 30)) == (28, 28, 38, 38)
    flipped, mapper = rb._flip(ds, 0)
    assert flipped.pixel_array[0, 0] == ds.pixel_array[0, -1] and mapper((10, 5, 20, 6)) == (60, 5, 70, 6)


def test_partial_volume_only_at_the_skull_edge_and_hu_offsets():
    hu = np.full((32, 32), 30.0)
    hu[:, :8] = 1200.0  # bone on the left, brain on the right: the edge is columns 7 and 8
    hu[:, 28:] = -1000.0  # air on the right: no bone there, untouched
    template = make_dataset(modality="CT", rows=32, columns=32, pixels=(hu + 1024).astype(np.uint16))
    template.BitsStored, template.RescaleIntercept, template.RescaleSlope = 12, -1024, 1
    ds = with_pixels(template, (hu + 1024).astype(np.uint16))
    out, _ = rb._partial_volume(ds, 0)
    changed = np.nonzero((out.pixel_array.astype(int) != ds.pixel_array.astype(int)).any(axis=0))[0]
    assert list(changed) == [7, 8]
    assert out.pixel_array[5, 8] - 1024 == round((3 * 1200 + 6 * 30) / 9)
    plus, _ = rb._hu_offset(5)(ds, 0)
    np.testing.assert_array_equal(plus.pixel_array.astype(int), ds.pixel_array.astype(int) + 5)


def test_the_detector_holds_or_is_caught_inside_the_console_pass_it_trained_with():
    """cxr-nodule trains with one more console pass (training.ship.CONSOLE_PASS: unsharp masking up to amount
    2, gamma 0.5-2, noise up to 2 %); inside that range its card must not list a weakness (amount 2, the
    range's edge, is allowed to: measured "neither", sensitivity up by 0.14, in session 6)."""
    card = _card("cxr-nodule")
    if card is None or not card.robustness:
        pytest.skip("models/ has no shipped nodule model with a robustness battery")
    rows = card.robustness["perturbations"]
    inside = [
        "unsharp masking, amount 0.5, sigma 2% of the width",
        "unsharp masking, amount 1, sigma 2% of the width",
        *(f"tone curve gamma {g:g}" for g in (0.8, 1.25, 0.5, 2.0)),
        "noise sd 2% of the window",
    ]
    assert {p: rows[p]["verdict"] for p in inside if rows[p]["verdict"] == "neither"} == {}
