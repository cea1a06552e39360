"""A native decoder's panic on corrupt pixel data is contained: a "cannot be decoded" answer, not a crash."""

from __future__ import annotations

import random

import pytest
from pydicom import dcmread

from service.dicom.decode import contained_decoder, is_decoder_panic
from service.errors import DecoderPanicError, PreprocessError
from service.inference.preprocess import modality_frames
from tests.pydicom_files import pydicom_testdata


def _panicking_rle():
    """MR_small_RLE.dcm with bytes of its RLE header changed until pylibjpeg-rle panics (found by fuzzing:
    'index out of bounds'); None when the installed decoder raises instead (a later, fixed release)."""
    pytest.importorskip("rle", reason="the codecs extra (pylibjpeg-rle) is not installed")
    rng = random.Random(1)
    clean = bytes(dcmread(pydicom_testdata("MR_small_RLE.dcm")).PixelData)
    for _ in range(200):
        ds = dcmread(pydicom_testdata("MR_small_RLE.dcm"))
        data = bytearray(clean)
        for _ in range(rng.randint(1, 8)):
            data[rng.randrange(0, min(len(data), 200))] = rng.randrange(256)
        ds.PixelData = bytes(data)
        try:
            _ = ds.pixel_array
        except Exception:
            continue
        except BaseException as exc:
            if is_decoder_panic(exc):
                return dcmread(pydicom_testdata("MR_small_RLE.dcm")), bytes(data)
            raise
    return None


def test_a_decoder_panic_becomes_a_value_error() -> None:
    found = _panicking_rle()
    if found is None:
        pytest.skip("the installed RLE decoder no longer panics on corrupt data")
    ds, data = found
    ds.PixelData = data
    with pytest.raises(DecoderPanicError, match="corrupt data"), contained_decoder():
        _ = ds.pixel_array


def test_preprocessing_says_cannot_be_decoded() -> None:
    found = _panicking_rle()
    if found is None:
        pytest.skip("the installed RLE decoder no longer panics on corrupt data")
    ds, data = found
    ds.PixelData = data
    with pytest.raises(PreprocessError, match="cannot be decoded"):
        modality_frames(ds)


def test_other_base_exceptions_pass() -> None:
    with pytest.raises(KeyboardInterrupt), contained_decoder():
        raise KeyboardInterrupt


def test_gdcm_is_dropped_where_another_decoder_reads_the_syntax(monkeypatch: pytest.MonkeyPatch) -> None:
    """GDCM aborts the process on some corrupt JPEG data (the fuzzer's named case): wherever pylibjpeg or
    Pillow reads the syntax too, it is removed before our first decode. A stand-in registered under
    GDCM's label plays it here (CI does not install python-gdcm)."""
    import contextlib
    import importlib.util
    import sys
    import threading
    import types

    from pydicom.pixels import get_decoder
    from pydicom.uid import JPEGBaseline8Bit

    import service.dicom.decode as decode

    stand_in = types.ModuleType("stand_in_gdcm")
    stand_in.is_available = lambda uid: True  # type: ignore[attr-defined]
    stand_in._decode_frame = lambda src, runner: b""  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "stand_in_gdcm", stand_in)
    decoder = get_decoder(JPEGBaseline8Bit)
    if "gdcm" not in decoder.available_plugins:
        with contextlib.suppress(ValueError):  # registered as unavailable (python-gdcm not installed)
            decoder.remove_plugin("gdcm")
        decoder.add_plugin("gdcm", ("stand_in_gdcm", "_decode_frame"))
    assert "gdcm" in decoder.available_plugins and len(decoder.available_plugins) > 1
    monkeypatch.setattr(decode, "_gdcm_checked", threading.Event())  # as in a fresh process
    try:
        with contained_decoder():
            pass
        assert "gdcm" not in decoder.available_plugins
        assert decoder.is_available  # pylibjpeg and Pillow still read it
    finally:  # as before: without python-gdcm, pydicom's own (unavailable) registration; with it, dropped
        with contextlib.suppress(ValueError):
            decoder.remove_plugin("gdcm")
        if importlib.util.find_spec("gdcm") is None:
            decoder.add_plugin("gdcm", ("pydicom.pixels.decoders.gdcm", "_decode_frame"))
