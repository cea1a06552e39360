"""service.study_inputs: headers first, pixels per slice; the VOI output shared by models that agree.

The shared path must give every model exactly what :func:`preprocess_dataset` gives it alone (the function
training used), compute the units once per instance for models that agree, never hold units no other model
will take, and pass a preprocessing failure to every model that reads the instance. A stored instance is read
whole only when a model needs its pixels, and a truncated one is said to be so.
"""

from __future__ import annotations

import threading
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydicom.dataset import Dataset

import service.study_inputs as study_inputs
from service.errors import PreprocessError
from service.inference.card import ModelCard
from service.inference.grayscale import Window, window_unit
from service.inference.preprocess import PreprocessSpec, model_input, preprocess_dataset, unit_frames
from service.store.instances import InstanceRecord
from service.study_inputs import Item, SharedUnits, read_study
from tests.service.dicom_factory import make_dataset

MODELS = Path(__file__).resolve().parents[2] / "models"


def _card(name: str, **spec: Any) -> ModelCard:
    """A shipped chest card with another name and preprocessing (only those two matter here)."""
    card = ModelCard.model_validate_json((MODELS / "cxr-nodule" / "card.json").read_text())
    base = card.preprocessing.model_dump()
    return card.model_copy(update={"name": name, "preprocessing": PreprocessSpec(**{**base, **spec})})


def _radiograph(seed: int = 0) -> Dataset:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(200, 3800, size=(300, 240)).astype(np.uint16)
    ds = make_dataset(rows=300, columns=240, pixels=pixels)
    ds.WindowCenter, ds.WindowWidth = 2000, 3000
    return ds


@pytest.fixture
def counted(monkeypatch: pytest.MonkeyPatch) -> Counter[str]:
    """How often each instance's units are computed."""
    calls: Counter[str] = Counter()
    real = unit_frames  # what study_inputs imported

    def counting(ds: Dataset, spec: PreprocessSpec) -> np.ndarray:
        calls[str(ds.SOPInstanceUID)] += 1
        return real(ds, spec)

    monkeypatch.setattr(study_inputs, "unit_frames", counting)
    return calls


def _record(ds: Dataset, path: Path | None = None) -> InstanceRecord:
    return InstanceRecord(
        sop_instance_uid=str(ds.SOPInstanceUID),
        series_uid=str(ds.SeriesInstanceUID),
        sop_class_uid=str(ds.SOPClassUID),
        modality=str(ds.Modality),
        body_part="CHEST",
        path=path or Path("/nonexistent"),
    )


def _item(ds: Dataset) -> Item:
    return Item(_record(ds), ds)


def _uses(uid: str, *cards: ModelCard) -> Counter[tuple[str, tuple[object, ...]]]:
    return Counter((uid, c.preprocessing.unit_key) for c in cards)


def test_models_that_agree_get_their_own_input_from_one_decode(counted: Counter[str]) -> None:
    ds = _radiograph()
    small, large = _card("a", height=128, width=128), _card("b", height=256, width=192)
    units = SharedUnits(_uses(ds.SOPInstanceUID, small, large))
    for card in (small, large):
        got = units.preprocess(_item(ds), card)
        alone = preprocess_dataset(_radiograph(), card.preprocessing)
        assert np.array_equal(got.array, alone.array) and got.geometry == alone.geometry
    assert counted[ds.SOPInstanceUID] == 1
    assert not units._held  # the last reader took it: nothing is kept for the rest of the study


def test_models_that_disagree_compute_their_own(counted: Counter[str]) -> None:
    ds = _radiograph()
    dicom, fixed = _card("a"), _card("b", window_source="model", window_center=1000.0, window_width=500.0)
    units = SharedUnits(_uses(ds.SOPInstanceUID, dicom, fixed))
    for card in (dicom, fixed):
        got = units.preprocess(_item(ds), card)
        assert np.array_equal(got.array, preprocess_dataset(_radiograph(), card.preprocessing).array)
    assert counted[ds.SOPInstanceUID] == 2
    assert not units._held


def test_a_failure_reaches_every_model_and_is_computed_once(counted: Counter[str]) -> None:
    ds = _radiograph()
    ds.PhotometricInterpretation = "RGB"
    a, b = _card("a"), _card("b", height=64, width=64)
    units = SharedUnits(_uses(ds.SOPInstanceUID, a, b))
    for card in (a, b):
        with pytest.raises(PreprocessError, match="MONOCHROME1/2"):
            units.preprocess(_item(ds), card)
    assert counted[ds.SOPInstanceUID] == 1


def test_concurrent_readers_share_one_computation(counted: Counter[str]) -> None:
    datasets = [_radiograph(seed) for seed in range(4)]
    cards = [_card(f"m{i}", height=64 + 32 * i, width=64 + 32 * i) for i in range(3)]
    uses: Counter[tuple[str, tuple[object, ...]]] = Counter()
    for ds in datasets:
        uses += _uses(ds.SOPInstanceUID, *cards)
    units = SharedUnits(uses)
    results: dict[tuple[str, str], np.ndarray] = {}

    def read(card: ModelCard) -> None:
        for ds in datasets:
            results[(card.name, ds.SOPInstanceUID)] = units.preprocess(_item(ds), card).array

    threads = [threading.Thread(target=read, args=(c,)) for c in cards]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(counted[ds.SOPInstanceUID] == 1 for ds in datasets)
    for card in cards:
        for seed, ds in enumerate(datasets):
            alone = preprocess_dataset(_radiograph(seed), card.preprocessing).array
            assert np.array_equal(results[(card.name, ds.SOPInstanceUID)], alone)
    assert not units._held


def test_float_pixels_are_not_overwritten_in_the_datasets_cache() -> None:
    """The VOI step works in place: on float pixel data without a rescale, pydicom's cached array must
    not be what it overwrites (the second model would read windowed values as modality values)."""
    ds = _radiograph()
    del ds.PixelData
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 32, 32, 31
    del ds.PixelRepresentation
    ds.FloatPixelData = np.random.default_rng(2).uniform(0, 4000, (300, 240)).astype(np.float32).tobytes()
    before = ds.pixel_array.copy()
    assert before.dtype == np.float32
    spec = _card("a").preprocessing
    first = preprocess_dataset(ds, spec).array
    assert np.array_equal(ds.pixel_array, before)
    assert np.array_equal(preprocess_dataset(ds, spec).array, first)


def test_window_unit_in_place_matches_the_formulas_and_leaves_input_alone() -> None:
    x = np.linspace(-200.0, 300.0, 1001, dtype=np.float32)
    kept = x.copy()
    for function in ("LINEAR", "LINEAR_EXACT", "SIGMOID"):
        window = Window(40.0, 80.0, function)
        out = window_unit(x, window)
        assert np.array_equal(x, kept) and out.dtype == np.float32
        if function == "LINEAR":
            expected = np.clip((kept - 39.5) / 79.0 + 0.5, 0, 1)
        elif function == "LINEAR_EXACT":
            expected = np.clip((kept - 40.0) / 80.0 + 0.5, 0, 1)
        else:
            expected = 1 / (1 + np.exp(-4 * (kept.astype(np.float64) - 40.0) / 80.0))
        assert np.allclose(out, expected, atol=1e-6)
        scratch = kept.copy()
        assert window_unit(scratch, window, overwrite=True) is scratch
        assert np.array_equal(scratch, out)


def test_model_input_only_reads_the_units() -> None:
    units = np.random.default_rng(1).random((2, 50, 40), dtype=np.float32)
    kept = units.copy()
    pre = model_input(units, _card("a", height=32, width=32).preprocessing)
    assert pre.array.shape == (2, 1, 32, 32) and np.array_equal(units, kept)


def test_stored_instances_are_read_as_headers_then_pixels_per_slice(tmp_path: Path) -> None:
    """What a job reads from disk: headers up front (pixel data left on disk), the pixels when a model
    needs them, the same model input as from the whole dataset; a truncated file is a reason whether or not
    a model reads it."""
    whole, cut = _radiograph(3), _radiograph(4)
    paths = []
    for name, ds in (("whole", whole), ("cut", cut)):
        path = tmp_path / f"{name}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    data = paths[1].read_bytes()
    paths[1].write_bytes(data[: len(data) - 1000])  # kept by store.keep_truncated, say
    records = [_record(whole, paths[0]), _record(cut, paths[1])]
    by_series, skipped = read_study(records, {})
    reason = f"not analysed: instance {cut.SOPInstanceUID} is truncated (PixelData declares"
    assert [series for series, _ in skipped] == [str(cut.SeriesInstanceUID)]
    assert skipped[0][1].startswith(reason)
    (item,) = by_series[str(whole.SeriesInstanceUID)]
    assert (
        item.pixels_from is not None and item.dataset.get_item(0x7FE00010, keep_deferred=True).value is None
    )
    card = _card("a")
    units = SharedUnits.plan([(card, [item])])
    got = units.preprocess(item, card)
    assert np.array_equal(got.array, preprocess_dataset(_radiograph(3), card.preprocessing).array)
    assert item.dataset.get_item(0x7FE00010, keep_deferred=True).value is None  # the header stays light


def test_an_unreadable_file_is_said_and_the_rest_goes_on(tmp_path: Path) -> None:
    good, bad = _radiograph(5), _radiograph(6)
    good_path, bad_path = tmp_path / "good.dcm", tmp_path / "bad.dcm"
    good.save_as(good_path, enforce_file_format=True)
    bad_path.write_bytes(b"not a DICOM file at all")
    by_series, skipped = read_study([_record(good, good_path), _record(bad, bad_path)], {})
    assert [item.record.sop_instance_uid for items in by_series.values() for item in items] == [
        good.SOPInstanceUID
    ]
    assert skipped == [(str(bad.SeriesInstanceUID), "not analysed: a stored instance cannot be read back")]
