"""Reading a dataset ahead from its first bytes (:func:`service.store.validate.read_ahead`).

The promise: an instance parsed with what its first bytes said is exactly the instance parsed whole, and
anything wrong with the whole (cut short, an element after the pixel data, a bad UID) is answered as
before, because the whole is parsed whenever it does not end where the first bytes said it would.
"""

from __future__ import annotations

import struct
import warnings
import zlib
from collections.abc import Iterator
from io import BytesIO
from pathlib import Path

import numpy as np
import pytest
from pydicom import config as pydicom_config
from pydicom import dcmread
from pydicom.data import DATA_ROOT
from pydicom.uid import DeflatedExplicitVRLittleEndian

from service.errors import PacsTriageError, TruncatedDatasetError
from service.store.validate import ParsedInstance, parse_instance, read_ahead
from tests.service.dicom_factory import chest, head_ct_series, make_dataset, to_bytes

_TEST_FILES = sorted(p for p in (Path(DATA_ROOT) / "test_files").glob("*.dcm") if p.stat().st_size < 1 << 20)
"""The files that ship inside pydicom: every transfer syntax it reads, odd encodings, cut-short files."""

_READ_AHEAD = {"chest", "head CT", "256 x 256 CT", "MR_small_implicit.dcm"}
"""Seeds whose pixel data (native, longer than DEFER_BYTES or not) ends the file: some prefix must be used."""


@pytest.fixture(autouse=True)
def _as_the_service_reads() -> Iterator[None]:
    """pydicom's reading validation off, as :func:`service.app.create_app` sets it."""
    mode = pydicom_config.settings.reading_validation_mode
    pydicom_config.settings.reading_validation_mode = pydicom_config.IGNORE
    yield
    pydicom_config.settings.reading_validation_mode = mode


def _seeds() -> list[tuple[str, bytes]]:
    large = make_dataset(modality="CT", body_part="HEAD", rows=256, columns=256)
    seeds = [("chest", chest()), ("head CT", head_ct_series(1)[0]), ("256 x 256 CT", to_bytes(large))]
    return seeds + [(path.name, path.read_bytes()) for path in _TEST_FILES]


def _cuts(size: int) -> list[int]:
    """Cut points: every 61st byte of the first 4 KiB (headers end anywhere there), then fractions."""
    return sorted({*range(1, min(size, 4096), 61), *(size * k // 16 for k in range(1, 16)), size - 1})


def _outcome(data: bytes, **kwargs: object) -> ParsedInstance | tuple[type, str]:
    try:
        return parse_instance(data, "C-STORE dataset", images_only=False, **kwargs)  # type: ignore[arg-type]
    except PacsTriageError as exc:
        return type(exc), str(exc)


@pytest.mark.parametrize(("name", "data"), _seeds(), ids=[n for n, _ in _seeds()])
def test_whatever_was_read_ahead_the_whole_parses_the_same(name: str, data: bytes) -> None:
    whole = _outcome(data)
    used = 0
    for cut in _cuts(len(data)):
        with warnings.catch_warnings(record=True) as warned:
            warnings.simplefilter("always")
            ahead = read_ahead(data[:cut], "C-STORE dataset", images_only=False)
        # a prefix read must not warn: pydicom logs each warning too, once per instance received
        assert not [w for w in warned if "pydicom" in w.filename], f"cut at {cut}: {warned[0].message}"
        if ahead is None:
            continue
        used += ahead.end == len(data)
        assert _outcome(data, ahead=ahead) == whole, f"cut at {cut}"
    if name in _READ_AHEAD:
        assert isinstance(whole, ParsedInstance)
        assert used, "no prefix was read ahead of a dataset whose pixel data is its last element"


def test_an_element_after_the_pixel_data_is_parsed_whole() -> None:
    data = head_ct_series(1)[0]
    padding = struct.pack("<HH2sHI", 0xFFFC, 0xFFFC, b"OB", 0, 16) + bytes(16)  # Data Set Trailing Padding
    ahead = read_ahead(data[: len(data) // 2], "part", images_only=False)
    assert ahead is not None and ahead.end == len(data)
    padded = data + padding
    assert parse_instance(padded, "part", images_only=False, ahead=ahead) == parse_instance(
        padded, "part", images_only=False
    )
    assert parse_instance(padded, "part", images_only=False, ahead=ahead).dataset is not None  # parsed whole


def test_pixel_data_cut_short_is_refused_as_before() -> None:
    data = to_bytes(make_dataset(modality="CT", rows=128, columns=128, pixels=np.ones((128, 128), np.uint16)))
    ahead = read_ahead(data[:4096], "part", images_only=False)
    assert ahead is not None
    short = data[:-100]
    with pytest.raises(TruncatedDatasetError) as with_ahead:
        parse_instance(short, "part", images_only=False, ahead=ahead)
    with pytest.raises(TruncatedDatasetError) as without:
        parse_instance(short, "part", images_only=False)
    assert str(with_ahead.value) == str(without.value)


def test_a_deflated_dataset_is_not_read_ahead() -> None:
    ds = dcmread(BytesIO(head_ct_series(1)[0]))
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    out = BytesIO()
    ds.save_as(out, enforce_file_format=True)
    data = out.getvalue()
    assert zlib.crc32(data)  # a real deflated file
    assert all(read_ahead(data[:cut], "part", images_only=False) is None for cut in _cuts(len(data)))


def test_the_instance_read_ahead_carries_the_whole_bytes_and_no_dataset() -> None:
    data = head_ct_series(1)[0]
    ahead = read_ahead(data[:1024], "part", images_only=False)
    assert ahead is not None
    parsed = parse_instance(data, "part", images_only=False, ahead=ahead)
    assert parsed.data is data and parsed.dataset is None and parsed.truncated is None
    assert parsed == parse_instance(data, "part", images_only=False)
