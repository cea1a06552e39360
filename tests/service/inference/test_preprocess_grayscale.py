"""The standard grayscale pipeline (service.inference.grayscale) and preprocessing versions 1 and 2.

Known answers come from three places: pydicom's own test files with a VOI LUT and a Modality LUT Sequence
(the values pydicom's tests assert), pydicom's ``apply_windowing`` (an independent implementation of the
three VOILUTFunction formulas), and hand-computed points of PS3.3 C.11.2.1.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.data import DATA_ROOT, get_testdata_file
from pydicom.data.download import get_data_dir
from pydicom.dataset import Dataset
from pydicom.pixels import apply_modality_lut, apply_voi_lut, apply_windowing
from pydicom.sequence import Sequence

from service.inference.card import ModelCard
from service.inference.grayscale import (
    Window,
    dataset_window,
    display_unit,
    inverts,
    percentile_window,
    voi_lut_unit,
    window_unit,
)
from service.inference.preprocess import PreprocessSpec, modality_frames, preprocess_dataset
from tests.service.dicom_factory import make_dataset

VENDORED = Path(__file__).resolve().parents[2] / "fixtures" / "pydicom_data"
MODELS = Path(__file__).resolve().parents[3] / "models"


def pydicom_file(name: str) -> Path:
    """pydicom's copy of one of its test files when it has one (never downloaded), else ours."""
    found = get_testdata_file(name, download=False)
    return Path(str(found)) if found else VENDORED / name


def voi_lut_files() -> list[Path]:
    """Every pydicom test file whose dataset carries a VOI LUT Sequence: the wheel's own, pydicom's
    download cache and our vendored copies (``get_testdata_files`` would try to download: not here)."""
    roots = [Path(DATA_ROOT) / "test_files", Path(get_data_dir()), VENDORED]
    paths: dict[str, Path] = {}
    for root in roots:
        for path in sorted(root.rglob("*.dcm")) if root.is_dir() else []:
            paths.setdefault(path.name, path)
    out = []
    for path in sorted(paths.values()):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # several test files are deliberately odd
                ds = dcmread(path, stop_before_pixels=True)
        except Exception:  # pydicom ships deliberately broken files too
            continue
        if ds.get("VOILUTSequence"):
            out.append(path)
    return out


def unit_spec(ds: Dataset, version: int, **kwargs: object) -> PreprocessSpec:
    """A spec that leaves the [0, 1] VOI output untouched: source size, mean 0, std 1."""
    return PreprocessSpec(version=version, height=ds.Rows, width=ds.Columns, mean=0.0, std=1.0, **kwargs)


def ramp_dataset(**attrs: object) -> Dataset:
    """A 16 x 256 image whose columns run 0..4080 in steps of 16 (12-bit unsigned), with ``attrs`` set."""
    pixels = np.tile(np.arange(0, 4096, 16, dtype=np.uint16), (16, 1))
    ds = make_dataset(rows=16, columns=256, pixels=pixels)
    ds.BitsStored, ds.HighBit = 12, 11
    for key, value in attrs.items():
        setattr(ds, key, value)
    return ds


class TestPydicomTestFiles:
    def test_voi_lut_files_are_found(self):
        assert "vlut_04.dcm" in [p.name for p in voi_lut_files()]

    @pytest.mark.parametrize("path", voi_lut_files(), ids=lambda p: p.name)
    def test_version_2_applies_the_voi_lut_sequence(self, path):
        ds = dcmread(path)
        bits = int(ds.VOILUTSequence[0].LUTDescriptor[2])
        expected = apply_voi_lut(apply_modality_lut(ds.pixel_array, ds), ds).astype(np.float64) / (
            2**bits - 1
        )
        got = preprocess_dataset(ds, unit_spec(ds, 2)).array[0, 0]
        if ds.PhotometricInterpretation == "MONOCHROME1":
            expected = 1.0 - expected
        np.testing.assert_allclose(got, expected, atol=1e-6)

    def test_vlut_04_known_values(self):
        """pydicom's tests: stored 0, 76, 178, 255 map to LUT entries 0, 19532, 45746, 65535."""
        ds = dcmread(pydicom_file("vlut_04.dcm"))
        got = preprocess_dataset(ds, unit_spec(ds, 2)).array[0, 0]
        for (row, col), stored, lut in [
            ((387, 448), 0, 0),
            ((178, 126), 76, 19532),
            ((186, 389), 178, 45746),
            ((129, 79), 255, 65535),
        ]:
            assert ds.pixel_array[row, col] == stored
            assert got[row, col] == pytest.approx(lut / 65535, abs=1e-6)

    def test_version_1_ignores_the_voi_lut(self):
        """Old cards keep their behaviour: no window in vlut_04, so version 1 uses the percentile window."""
        ds = dcmread(pydicom_file("vlut_04.dcm"))
        v1 = preprocess_dataset(ds, unit_spec(ds, 1)).array[0, 0]
        x = ds.pixel_array.astype(np.float32)
        np.testing.assert_allclose(v1, window_unit(x, percentile_window(x, 0.5, 99.5)), atol=1e-6)

    def test_modality_lut_sequence(self):
        """mlut_18: a 4096-entry Modality LUT starting at -2048; stored -2048..2047 → LUTData[0..4095]."""
        ds = dcmread(pydicom_file("mlut_18.dcm"))
        lut = np.asarray(ds.ModalityLUTSequence[0].LUTData)
        stored = ds.pixel_array
        values = modality_frames(ds)[0]
        np.testing.assert_array_equal(values, lut[stored.astype(np.int64) + 2048].astype(np.float32))
        np.testing.assert_array_equal(values, apply_modality_lut(stored, ds).astype(np.float32))
        assert stored[129, 79] == 2047 and values[129, 79] == lut[-1]


class TestWindowFunctions:
    @pytest.mark.parametrize("function", ["LINEAR", "LINEAR_EXACT", "SIGMOID"])
    @pytest.mark.parametrize(("center", "width"), [(2048.0, 4096.0), (1000.0, 300.0), (3000.5, 1.5)])
    def test_matches_pydicom_apply_windowing(self, function, center, width):
        """12-bit unsigned, no rescale: pydicom's output range is 0..4095, ours 0..1."""
        ds = ramp_dataset(WindowCenter=center, WindowWidth=width, VOILUTFunction=function)
        values = ds.pixel_array.astype(np.float32)
        with np.errstate(over="ignore"):  # pydicom's SIGMOID overflows exp far from the centre (to 0, right)
            expected = apply_windowing(ds.pixel_array, ds) / 4095.0
        window = dataset_window(ds)
        assert window is not None
        got = window_unit(values, window)
        np.testing.assert_allclose(got, expected, atol=1e-5)

    def test_sigmoid_known_points(self):
        """C.11.2.1.3.1: 0.5 at the centre, 1 / (1 + e^-2) half a width above, 1 / (1 + e^2) below."""
        got = window_unit(np.array([100.0, 125.0, 75.0, 1e6, -1e6]), Window(100.0, 50.0, "SIGMOID"))
        np.testing.assert_allclose(
            got, [0.5, 1 / (1 + math.exp(-2)), 1 / (1 + math.exp(2)), 1.0, 0.0], atol=1e-6
        )

    def test_linear_exact_known_points(self):
        """C.11.2.1.3.2: (x - c) / w + 0.5 between c - w/2 and c + w/2, clipped outside."""
        got = window_unit(
            np.array([74.0, 75.0, 87.5, 100.0, 125.0, 126.0]), Window(100.0, 50.0, "LINEAR_EXACT")
        )
        np.testing.assert_allclose(got, [0.0, 0.0, 0.25, 0.5, 1.0, 1.0], atol=1e-6)

    def test_linear_known_points_and_width_one(self):
        """C.11.2.1.2.1: centre - 0.5 maps to 0.5; a width of 1 is a step at centre - 0.5."""
        got = window_unit(np.array([74.5, 99.5, 124.5]), Window(100.0, 51.0))
        np.testing.assert_allclose(got, [0.0, 0.5, 1.0], atol=1e-6)
        np.testing.assert_array_equal(window_unit(np.array([99.5, 99.6]), Window(100.0, 1.0)), [0.0, 1.0])

    @pytest.mark.parametrize(
        ("attrs", "expected"),
        [
            ({"WindowCenter": 10, "WindowWidth": 0.5}, None),  # LINEAR needs >= 1
            (
                {"WindowCenter": 10, "WindowWidth": 0.5, "VOILUTFunction": "SIGMOID"},
                Window(10, 0.5, "SIGMOID"),
            ),
            ({"WindowCenter": 10, "WindowWidth": 0, "VOILUTFunction": "LINEAR_EXACT"}, None),
            ({"WindowCenter": [10, 20], "WindowWidth": [30, 40]}, Window(10, 30)),
            ({"WindowCenter": 10, "WindowWidth": 30, "VOILUTFunction": "LOG"}, Window(10, 30)),
            ({"WindowCenter": 10}, None),
        ],
    )
    def test_dataset_window(self, attrs, expected):
        assert dataset_window(ramp_dataset(**attrs)) == expected


class TestPipelineVersions:
    def test_sigmoid_dataset_in_version_2_linear_in_version_1(self):
        ds = ramp_dataset(WindowCenter=2048, WindowWidth=1024, VOILUTFunction="SIGMOID")
        x = ds.pixel_array.astype(np.float64)
        v1 = preprocess_dataset(ds, unit_spec(ds, 1)).array[0, 0]
        v2 = preprocess_dataset(ds, unit_spec(ds, 2)).array[0, 0]
        np.testing.assert_allclose(v2, 1 / (1 + np.exp(-4 * (x - 2048) / 1024)), atol=1e-6)
        np.testing.assert_allclose(v1, np.clip((x - 2047.5) / 1023 + 0.5, 0, 1), atol=1e-6)

    def test_monochrome1_is_inverted(self):
        ds = ramp_dataset(WindowCenter=2048, WindowWidth=4096, PhotometricInterpretation="MONOCHROME1")
        x = ds.pixel_array.astype(np.float64)
        for version in (1, 2):
            got = preprocess_dataset(ds, unit_spec(ds, version)).array[0, 0]
            np.testing.assert_allclose(got, 1 - np.clip((x - 2047.5) / 4095 + 0.5, 0, 1), atol=1e-6)

    def test_monochrome1_with_presentation_lut_inverse_is_inverted_once(self):
        """DX/MG/IO require INVERSE with MONOCHROME1 (PS3.3 C.8.11.7): one inversion, not two."""
        plain = ramp_dataset(WindowCenter=2048, WindowWidth=4096, PhotometricInterpretation="MONOCHROME1")
        dx = ramp_dataset(
            WindowCenter=2048,
            WindowWidth=4096,
            PhotometricInterpretation="MONOCHROME1",
            PresentationLUTShape="INVERSE",
        )
        spec = unit_spec(plain, 2)
        np.testing.assert_array_equal(
            preprocess_dataset(dx, spec).array, preprocess_dataset(plain, spec).array
        )
        assert inverts(dx) and inverts(plain)

    def test_presentation_lut_inverse_on_monochrome2(self):
        ds = ramp_dataset(WindowCenter=2048, WindowWidth=4096, PresentationLUTShape="INVERSE")
        v1 = preprocess_dataset(ds, unit_spec(ds, 1)).array[0, 0]
        v2 = preprocess_dataset(ds, unit_spec(ds, 2)).array[0, 0]
        np.testing.assert_allclose(v2, 1.0 - v1, atol=1e-6)
        assert v2[0, 0] == 1.0 and v2[0, -1] < 0.01
        assert not inverts(ramp_dataset(PresentationLUTShape="IDENTITY"))

    def test_model_window_overrides_the_file(self):
        """The CT hemorrhage card's own 40/80 HU window wins over the file's LUT, window and function."""
        ds = ramp_dataset(
            WindowCenter=300, WindowWidth=2000, VOILUTFunction="SIGMOID", RescaleIntercept=-1024
        )
        ds.RescaleSlope = 1
        with_lut = _with_voi_lut(ramp_dataset(RescaleIntercept=-1024, RescaleSlope=1))
        spec = unit_spec(ds, 2, window_source="model", window_center=40.0, window_width=80.0)
        hu = ds.pixel_array.astype(np.float64) - 1024
        expected = np.clip((hu - 39.5) / 79 + 0.5, 0, 1)
        for case in (ds, with_lut):
            np.testing.assert_allclose(preprocess_dataset(case, spec).array[0, 0], expected, atol=1e-6)
        np.testing.assert_array_equal(
            preprocess_dataset(ds, spec).array,
            preprocess_dataset(ds, spec.model_copy(update={"version": 1})).array,
        )

    def test_generator_style_dx_is_identical_in_both_versions(self):
        """What the shipped CXR models were trained on (LINEAR window, MONOCHROME1 + INVERSE, a rescale):
        version 2 gives bit-identical input, so moving their cards to version 2 changes nothing."""
        rng = np.random.default_rng(0)
        pixels = rng.integers(0, 4096, size=(40, 30), dtype=np.uint16)
        ds = make_dataset(rows=40, columns=30, pixels=pixels)
        ds.BitsStored, ds.HighBit = 12, 11
        ds.PhotometricInterpretation, ds.PresentationLUTShape = "MONOCHROME1", "INVERSE"
        ds.WindowCenter, ds.WindowWidth, ds.VOILUTFunction = 1800.4, 2500.2, "LINEAR"
        ds.RescaleIntercept, ds.RescaleSlope = 0, 1
        spec = PreprocessSpec(height=64, width=64, mean=0.5, std=0.25)
        v1 = preprocess_dataset(ds, spec).array
        v2 = preprocess_dataset(ds, spec.model_copy(update={"version": 2})).array
        np.testing.assert_array_equal(v1, v2)

    def test_garbled_voi_lut_falls_back_to_the_window(self):
        ds = _with_voi_lut(ramp_dataset(WindowCenter=2048, WindowWidth=4096))
        ds.VOILUTSequence[0].LUTDescriptor = [256, 0, 3]  # 3 bits per entry is not allowed (C.11.2.1.1)
        assert voi_lut_unit(ds, ds.pixel_array.astype(np.float32)) is None
        expected = window_unit(ds.pixel_array.astype(np.float32), Window(2048, 4096))
        np.testing.assert_allclose(preprocess_dataset(ds, unit_spec(ds, 2)).array[0, 0], expected, atol=1e-6)

    def test_voi_lut_preferred_to_window_and_display_unit(self):
        ds = _with_voi_lut(ramp_dataset(WindowCenter=2048, WindowWidth=4096))
        x = ds.pixel_array
        expected = np.sqrt(np.clip(x, 0, 4095) / 4095.0)  # the LUT below: a square-root tone curve
        np.testing.assert_allclose(preprocess_dataset(ds, unit_spec(ds, 2)).array[0, 0], expected, atol=2e-5)
        unit, voi = display_unit(ds, x.astype(np.float32))
        np.testing.assert_allclose(unit, expected, atol=2e-5)
        assert voi == "the first VOI LUT"

    def test_cards_without_version_are_version_1(self):
        data = ModelCard.read(MODELS / "cxr-pneumothorax" / "card.json").model_dump(mode="json")
        data["preprocessing"].pop("version")
        assert ModelCard.model_validate(data).preprocessing.version == 1
        assert PreprocessSpec(height=8, width=8).version == 1


def _with_voi_lut(ds: Dataset) -> Dataset:
    """Add a 4096-entry, 16-bit VOI LUT Sequence: ``sqrt(x / 4095)`` scaled to 0..65535."""
    item = Dataset()
    item.LUTDescriptor = [4096, 0, 16]
    item.LUTData = [round(65535 * math.sqrt(i / 4095)) for i in range(4096)]
    item["LUTData"].VR = "US"
    item.LUTExplanation = "square root"
    ds.VOILUTSequence = Sequence([item])
    return ds
