"""The one-pass scan of a received instance's elements (:mod:`service.store.element_scan`).

Its promise: wherever it answers, it answers what the generator walk (:func:`service.store.attributes.walk`)
answers, and it answers for the data senders really send (else the answer path is silently slow again).
The fuzzer (tests/reliability/test_fuzz_dicom.py) runs the C-STORE parse, and so the scan, against the
full parse on every mutation it draws; here: pydicom's own files, sequences and items of every length
form, byte flips in the header region, and what the scan leaves to the walk.
"""

from __future__ import annotations

import mmap
import random
import warnings
from io import BytesIO
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.data import DATA_ROOT
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate
from pydicom.uid import UID, ImplicitVRLittleEndian, RLELossless

from service.store.attributes import walk
from service.store.element_scan import scan
from service.store.validate import DEFER_BYTES
from tests.service.dicom_factory import make_dataset, to_bytes


def _agrees(data: bytes) -> bool:
    """The scan agrees with the walk; True when it answered (False: it left the data to the walk)."""
    scanned = scan(data, len(data), DEFER_BYTES)
    if scanned is None:
        return False
    assert scanned == walk(data, DEFER_BYTES)
    return True


def _ct(*, syntax: UID | None = None, undefined: bool = False) -> bytes:
    """A CT slice with a sequence of two items, the first holding a sequence of its own: every length
    written undefined (delimiters, PS3.5 7.5.2) or defined."""
    ds = make_dataset(modality="CT", body_part="HEAD", rows=32, columns=32)
    ds.ImagesInAcquisition = 40
    code = Dataset()
    code.CodeValue, code.CodingSchemeDesignator = "121311", "DCM"
    first = Dataset()
    first.ReferencedSOPInstanceUID = "1.2.3.4"
    first.PurposeOfReferenceCodeSequence = [code]
    ds.ReferencedImageSequence = [first, Dataset()]
    if undefined:
        for element in (ds["ReferencedImageSequence"], first["PurposeOfReferenceCodeSequence"]):
            element.is_undefined_length = True
            for item in element.value:
                item.is_undefined_length_sequence_item = True
    if syntax is not None:
        ds.file_meta.TransferSyntaxUID = syntax
    return to_bytes(ds)


def _rle() -> bytes:
    ds = make_dataset(modality="CT", body_part="HEAD", rows=32, columns=32)
    ds.PixelData = encapsulate([bytes(64), bytes(32)])
    ds["PixelData"].VR = "OB"
    ds.file_meta.TransferSyntaxUID = RLELossless
    return to_bytes(ds)


@pytest.mark.parametrize(
    "name, data",
    [
        ("explicit VR, defined lengths", _ct()),
        ("explicit VR, undefined lengths", _ct(undefined=True)),
        ("implicit VR, defined lengths", _ct(syntax=ImplicitVRLittleEndian)),
        ("implicit VR, undefined lengths", _ct(syntax=ImplicitVRLittleEndian, undefined=True)),
        ("encapsulated pixel data", _rle()),
    ],
)
def test_what_senders_send_is_scanned_and_agrees(name: str, data: bytes) -> None:
    if "undefined" in name:
        assert b"\xfe\xff\xdd\xe0" in data and b"\xfe\xff\x0d\xe0" in data  # the delimiters are there
    assert _agrees(data), name


def test_a_larger_buffer_is_read_to_the_size_given() -> None:
    data = _ct(undefined=True)
    with mmap.mmap(-1, 1 << 20) as buf:  # the page-aligned buffer an instance is written from
        buf[: len(data)] = data
        assert scan(buf, len(data), DEFER_BYTES) == walk(data, DEFER_BYTES)
        assert scan(memoryview(buf), len(data), DEFER_BYTES) == walk(data, DEFER_BYTES)
    assert scan(data, len(data) + 1, DEFER_BYTES) is None  # a size beyond the data: not read


@pytest.mark.filterwarnings("ignore")  # pydicom warns about some of its own files
def test_every_pydicom_file_agrees() -> None:
    answered = 0
    for path in sorted((Path(DATA_ROOT) / "test_files").rglob("*")):  # the files pydicom ships, no download
        if path.is_file() and path.suffix in ("", ".dcm"):
            answered += _agrees(path.read_bytes())
    assert answered >= 80  # most of them are plain data (90 of 168 with pydicom 3.0)


def _left_to_the_walk() -> dict[str, bytes]:
    data = _ct()
    undefined = _ct(undefined=True)
    empty_count = make_dataset(modality="CT", body_part="HEAD", rows=32, columns=32)
    empty_count.add_new(0x00201002, "IS", None)  # ImagesInAcquisition present and empty
    empty_uid = make_dataset(modality="CT", body_part="HEAD", rows=32, columns=32)
    empty_uid.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    empty_uid.add_new(0x00080050, "SH", None)  # AccessionNumber empty, implicit VR: pydicom gives None
    long_value = make_dataset(modality="CT", body_part="HEAD", rows=32, columns=32)
    with warnings.catch_warnings():  # too long for LO, as it is meant to be
        warnings.simplefilter("ignore")
        long_value.add_new(0x00080070, "LO", "x" * (DEFER_BYTES + 2))  # Manufacturer beyond the defer size
        long_bytes = to_bytes(long_value)
    sequence_end = undefined.rindex(b"\xfe\xff\xdd\xe0")
    return {
        "pixel data cut short": data[:-100],
        "a few bytes after the last element": data + b"\x00" * 6,
        "an empty count": to_bytes(empty_count),
        "an empty implicit value": to_bytes(empty_uid),
        "a value the walk defers": long_bytes,
        "a sequence without its delimiter": undefined[:sequence_end]
        + b"\x00" * 8
        + undefined[sequence_end + 8 :],
        "an item tag at the top level": data + b"\xfe\xff\x00\xe0\x00\x00\x00\x00",
    }


@pytest.mark.parametrize("name", sorted(_left_to_the_walk()))
@pytest.mark.filterwarnings("ignore")  # pydicom warns about most of these
def test_unusual_data_is_left_to_the_walk(name: str) -> None:
    data = _left_to_the_walk()[name]
    assert scan(data, len(data), DEFER_BYTES) is None, name


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("base", ["defined", "undefined", "implicit"])
def test_byte_flips_in_the_header_agree_or_are_left(base: str) -> None:
    """Every header byte damaged in turn, some of them twice: the scan agrees with the walk or abstains."""
    data = {
        "defined": _ct(),
        "undefined": _ct(undefined=True),
        "implicit": _ct(syntax=ImplicitVRLittleEndian, undefined=True),
    }[base]
    pixel = len(data) - len(dcmread(BytesIO(data)).PixelData)
    rng = random.Random(20)
    answered = 0
    for position in range(128, pixel):
        for value in (rng.randrange(256), 0xFF):
            mutated = bytearray(data)
            mutated[position] = value
            answered += _agrees(bytes(mutated))
    assert answered > 0
