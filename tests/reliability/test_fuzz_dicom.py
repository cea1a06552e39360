"""DICOM fuzzing: mutated instances through the real validate → read → preprocess path (issue 9, part 2).

Each case starts from a valid instance (the service factory's chest radiographs and head CT slices, a few
hand-built odd ones, the files that ship inside pydicom) and applies hypothesis-drawn mutations: element
values (absurd Rows/Columns/NumberOfFrames, BitsAllocated against the pixel data length, colour layouts,
garbled rescale and window values, Modality LUTs), deleted elements, a wrong or missing transfer syntax,
encapsulated pixel data with bogus fragments, and byte-level damage (truncation, flips, wrong VRs,
declared lengths such as 0xFFFFFFF0). The promise under test is the one the service makes to a sender:

* :func:`parse_instance` either accepts the part or raises a :class:`PacsTriageError` with a 4xx status;
* an accepted part reads back, and :func:`preprocess_dataset` with every shipped model card's spec
  either gives a finite model input of the card's shape or raises :class:`PreprocessError` (which the
  worker turns into "not analysed: <reason>");
* anything else (IndexError, MemoryError, a NaN input, ...) is a bug.

Decompression bombs (a few hundred bytes claiming gigapixels) are checked one by one with tracemalloc.
Warnings are ignored inside a case, as in the service (pydicom warns about most of these files), and
pydicom's reading validation is off, as :func:`service.app.create_app` sets it.
"""

from __future__ import annotations

import functools
import resource
import struct
import time
import tracemalloc
import warnings
import zlib
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import replace
from io import BytesIO
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st
from PIL import Image
from pydicom import config as pydicom_config
from pydicom import dcmread
from pydicom.data import DATA_ROOT
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate, generate_fragments
from pydicom.filereader import _read_file_meta_info, read_preamble
from pydicom.sequence import Sequence
from pydicom.uid import (
    UID,
    BasicTextSRStorage,
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGLSLossless,
    MultiFrameGrayscaleWordSecondaryCaptureImageStorage,
    RLELossless,
    SecondaryCaptureImageStorage,
    generate_uid,
)

from service.errors import PacsTriageError, PreprocessError
from service.inference.card import ModelCard
from service.inference.preprocess import PreprocessSpec, preprocess_dataset
from service.store.validate import MAX_INFLATED_BYTES, parse_instance
from tests.reliability.conftest import examples
from tests.service.dicom_factory import chest, head_ct_series, make_dataset, to_bytes

MODELS_DIR = Path(__file__).resolve().parents[2] / "models"
RSS_GROWTH_LIMIT_MIB = 512
"""Peak RSS may grow by at most this much over a whole fuzzing run (and tracemalloc's peak per bomb)."""


@pytest.fixture(autouse=True, scope="module")
def _pydicom_as_in_the_service() -> Iterator[None]:
    saved = (pydicom_config.settings.reading_validation_mode, pydicom_config.settings.writing_validation_mode)
    pydicom_config.settings.reading_validation_mode = pydicom_config.IGNORE
    pydicom_config.settings.writing_validation_mode = pydicom_config.IGNORE  # to write garbage on purpose
    yield
    pydicom_config.settings.reading_validation_mode, pydicom_config.settings.writing_validation_mode = saved


@functools.cache
def specs() -> dict[str, PreprocessSpec]:
    """Every shipped model's preprocessing spec, as the service reads it from the card."""
    cards = [ModelCard.read(p) for p in sorted(MODELS_DIR.glob("*/card.json"))]
    assert cards, f"no model cards under {MODELS_DIR}"
    return {c.name: c.preprocessing for c in cards}


# ---------------------------------------------------------------- seeds: valid instances to start from


def _encoded(ds: Dataset, tsuid: str) -> Dataset:
    ds.compress(tsuid)  # RLE, JPEG 2000 and JPEG-LS encoders ship with pydicom and its plugins
    return ds


def _rgb(planar: int) -> Dataset:
    ds = make_dataset(sop_class=SecondaryCaptureImageStorage, modality="OT")
    rgb = np.random.default_rng(1).integers(0, 255, (32, 32, 3), dtype=np.uint8)
    ds.Rows = ds.Columns = 32
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", planar
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
    ds.PixelData = (rgb.transpose(2, 0, 1) if planar else rgb).tobytes()
    return ds


def _multiframe() -> Dataset:
    frames = np.arange(4 * 32 * 32, dtype=np.uint16).reshape(4, 32, 32)
    ds = make_dataset(sop_class=MultiFrameGrayscaleWordSecondaryCaptureImageStorage, rows=32, columns=32)
    ds.NumberOfFrames = 4
    ds.PixelData = frames.tobytes()
    return ds


def _mono1_signed_8bit() -> Dataset:
    ds = make_dataset(modality="DX")
    ds.PhotometricInterpretation = "MONOCHROME1"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 1
    ds.PixelData = np.linspace(-100, 100, 64 * 64).astype(np.int8).tobytes()
    ds.WindowCenter, ds.WindowWidth = [0, 10], [100, 20]
    return ds


def _modality_lut() -> Dataset:
    ds = make_dataset(modality="CR")
    item = Dataset()
    item.LUTDescriptor = [4096, 0, 16]
    item.ModalityLUTType = "US"
    item.add_new("LUTData", "OW", np.arange(4096, dtype=np.uint16).tobytes())
    ds.ModalityLUTSequence = Sequence([item])
    return ds


def _float_pixels() -> Dataset:
    ds = make_dataset(modality="OT", rows=16, columns=16)
    del ds.PixelData, ds.PixelRepresentation, ds.BitsStored, ds.HighBit
    ds.BitsAllocated = 32
    ds.FloatPixelData = np.linspace(0, 1, 256, dtype=np.float32).tobytes()
    return ds


def _with_ts(ds: Dataset, tsuid: str) -> Dataset:
    ds.file_meta.TransferSyntaxUID = UID(tsuid)
    return ds


def _sr_with_pixels() -> Dataset:
    ds = make_dataset(sop_class=BasicTextSRStorage, modality="SR")
    ds.file_meta.MediaStorageSOPClassUID = BasicTextSRStorage
    return ds


def _no_pixels() -> Dataset:
    ds = make_dataset(sop_class=BasicTextSRStorage, modality="SR")
    del ds.PixelData
    return ds


_BUILT: dict[str, Callable[[], bytes]] = {
    "chest": chest,
    "head-ct": lambda: head_ct_series(1)[0],
    "mono1-signed-8bit": lambda: to_bytes(_mono1_signed_8bit()),
    "multiframe": lambda: to_bytes(_multiframe()),
    "rgb-planar0": lambda: to_bytes(_rgb(0)),
    "rgb-planar1": lambda: to_bytes(_rgb(1)),
    "modality-lut": lambda: to_bytes(_modality_lut()),
    "float-pixels": lambda: to_bytes(_float_pixels()),
    "rle": lambda: to_bytes(_encoded(make_dataset(), RLELossless)),
    "rle-multiframe": lambda: to_bytes(_encoded(_multiframe(), RLELossless)),
    "j2k": lambda: to_bytes(_encoded(make_dataset(), JPEG2000Lossless)),
    "jpeg-ls": lambda: to_bytes(_encoded(make_dataset(), JPEGLSLossless)),
    "implicit-ct": lambda: to_bytes(
        _with_ts(make_dataset(modality="CT", body_part="HEAD"), ImplicitVRLittleEndian)
    ),
    "deflated": lambda: to_bytes(_with_ts(make_dataset(), DeflatedExplicitVRLittleEndian)),
    "sr-with-pixels": lambda: to_bytes(_sr_with_pixels()),
    "no-pixels": lambda: to_bytes(_no_pixels()),
}


def _pydicom_file(path: Path) -> bytes:
    """The file's bytes, rewritten with fresh UIDs where it lacks them (so it gets past validation and is
    really decoded); as shipped when it cannot be rewritten (those are fuzz seeds too)."""
    raw = path.read_bytes()
    try:
        ds = dcmread(BytesIO(raw))
        if all(k in ds for k in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID")):
            return raw
        ds.SOPClassUID = ds.get("SOPClassUID") or SecondaryCaptureImageStorage
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = (generate_uid() for _ in range(3))
        buf = BytesIO()
        ds.save_as(buf)
        return buf.getvalue()
    except Exception:
        return raw


@functools.cache
def seeds() -> dict[str, bytes]:
    """Seed name → bytes: the built instances, then every pydicom test file under 1 MiB (no download)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = {name: build() for name, build in _BUILT.items()}
        for path in sorted((Path(DATA_ROOT) / "test_files").rglob("*")):
            if path.is_file() and path.suffix in ("", ".dcm") and path.stat().st_size < 1 << 20:
                out[f"pydicom:{path.name}"] = _pydicom_file(path)
    return out


# ---------------------------------------------------------------- mutations


_TS_CHOICES = [
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    ExplicitVRBigEndian,
    DeflatedExplicitVRLittleEndian,
    RLELossless,
    JPEGBaseline8Bit,
    JPEG2000Lossless,
    JPEGLSLossless,
    "1.2.840.10008.1.2.4.100",  # MPEG2: no decoder
    "1.2.3.4",
    "not a uid",
    "",
]
_NUMBER_TEXT = st.sampled_from(["0", "1", "-1", "nan", "inf", "-inf", "1e308", "1e-308", "abc", "", "3\\4"])

# keyword → strategy of values to set it to
_VALUES: dict[str, st.SearchStrategy[Any]] = {
    "Rows": st.one_of(st.sampled_from([0, 1, 2, 63, 65, 4096, 65535]), st.integers(0, 65535)),
    "Columns": st.one_of(st.sampled_from([0, 1, 2, 63, 65, 4096, 65535]), st.integers(0, 65535)),
    "NumberOfFrames": st.one_of(
        st.sampled_from(["0", "-1", "1", "2", "3", "abc", "2147483647", "99999999999", "1.5", ""]),
        st.integers(-5, 10**6).map(str),
    ),
    "BitsAllocated": st.sampled_from([0, 1, 8, 12, 16, 24, 32, 64, 65535]),
    "BitsStored": st.integers(0, 65),
    "HighBit": st.integers(0, 65),
    "PixelRepresentation": st.sampled_from([0, 1, 2]),
    "SamplesPerPixel": st.sampled_from([0, 1, 2, 3, 4, 65535]),
    "PlanarConfiguration": st.sampled_from([0, 1, 2]),
    "PhotometricInterpretation": st.sampled_from(
        ["MONOCHROME1", "MONOCHROME2", "RGB", "YBR_FULL", "YBR_FULL_422", "PALETTE COLOR", "", "GARBAGE"]
    ),
    "RescaleSlope": _NUMBER_TEXT,
    "RescaleIntercept": _NUMBER_TEXT,
    "WindowCenter": st.one_of(_NUMBER_TEXT, st.lists(_NUMBER_TEXT, min_size=2, max_size=3)),
    "WindowWidth": st.one_of(_NUMBER_TEXT, st.lists(_NUMBER_TEXT, min_size=2, max_size=3)),
    "VOILUTFunction": st.sampled_from(["LINEAR", "SIGMOID", "LINEAR_EXACT", "garbage"]),
    "Modality": st.sampled_from(["CT", "CR", "DX", "MR", "SR", "", "X" * 64]),
    "BodyPartExamined": st.sampled_from(["CHEST", "HEAD", "", "\x00", "é" * 20]),
    "SOPClassUID": st.sampled_from(
        [BasicTextSRStorage, "1.2.840.10008.5.1.4.1.1.11.1", CTImageStorage, "1.2"]
    ),
    "StudyInstanceUID": st.sampled_from(["", "1..2", "a.b", "1." * 40, "../../etc"]),
    "ImagesInAcquisition": st.sampled_from(["abc", "-1", "99999999999", "8"]),
}
_DELETABLE = [
    "Rows", "Columns", "BitsAllocated", "BitsStored", "HighBit", "PixelRepresentation", "SamplesPerPixel",
    "PhotometricInterpretation", "PixelData", "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID",
    "SOPClassUID", "RescaleSlope", "NumberOfFrames",
]  # fmt: skip


def _fragment() -> st.SearchStrategy[bytes]:
    """Fragments of encapsulated pixel data: noise, or a codestream header claiming some size."""
    dims = st.tuples(st.integers(0, 65535), st.integers(0, 65535), st.integers(0, 4))
    jpeg = dims.map(lambda d: b"\xff\xd8\xff\xc0\x00\x0b\x08" + struct.pack(">HHB", *d) + b"\x01\x11\x00")
    jpeg_ls = dims.map(lambda d: b"\xff\xd8\xff\xf7\x00\x0b\x08" + struct.pack(">HHB", *d) + b"\x01\x11\x00")
    j2k = dims.map(
        lambda d: (
            b"\xff\x4f\xff\x51\x00\x29\x00\x00"
            + struct.pack(">IIIIIIIIH", d[1], d[0], 0, 0, d[1], d[0], 0, 0, d[2])
            + b"\x07\x01\x01" * max(d[2], 1)
        )
    )
    rle = st.tuples(st.integers(0, 20), st.lists(st.integers(0, 2**32 - 1), max_size=15)).map(
        lambda h: struct.pack("<I", h[0]) + b"".join(struct.pack("<I", o) for o in h[1]).ljust(60, b"\0")
    )
    return st.one_of(st.binary(max_size=64), jpeg, jpeg_ls, j2k, rle).flatmap(
        lambda head: st.binary(max_size=32).map(lambda tail: head + tail)
    )


_DATASET_OP = st.one_of(
    st.sampled_from(sorted(_VALUES)).flatmap(lambda k: _VALUES[k].map(lambda v: ("set", k, v))),
    st.sampled_from(_DELETABLE).map(lambda k: ("delete", k)),
    st.tuples(
        st.just("pixels"),
        st.sampled_from(["truncate", "extend", "odd", "empty", "noise"]),
        st.integers(0, 9000),
    ),
    st.sampled_from(_TS_CHOICES).map(lambda ts: ("ts", ts)),
    st.just(("ts", None)),
    st.tuples(
        st.just("encap"),
        st.sampled_from(_TS_CHOICES[4:8]),
        st.lists(_fragment(), max_size=4),
        st.booleans(),
    ),
    st.tuples(
        st.just("modality-lut"),
        st.lists(st.integers(0, 65535), max_size=4),
        st.lists(st.integers(0, 65535), max_size=8),
    ),
)  # fmt: skip

_TAGS = {  # tag → (group, element): where byte-level mutations aim
    "PixelData": (0x7FE0, 0x0010),
    "Rows": (0x0028, 0x0010),
    "BitsAllocated": (0x0028, 0x0100),
    "PatientName": (0x0010, 0x0010),
    "StudyInstanceUID": (0x0020, 0x000D),
    "TransferSyntaxUID": (0x0002, 0x0010),
    "FileMetaInformationGroupLength": (0x0002, 0x0000),
}
_ELEMENTS = {  # keyword → (group, element) of dataset elements re-encoded with another VR and value
    "Rows": (0x0028, 0x0010),
    "Columns": (0x0028, 0x0011),
    "NumberOfFrames": (0x0028, 0x0008),
    "SamplesPerPixel": (0x0028, 0x0002),
    "PhotometricInterpretation": (0x0028, 0x0004),
    "BitsAllocated": (0x0028, 0x0100),
    "BitsStored": (0x0028, 0x0101),
    "PixelRepresentation": (0x0028, 0x0103),
    "WindowCenter": (0x0028, 0x1050),
    "WindowWidth": (0x0028, 0x1051),
    "RescaleIntercept": (0x0028, 0x1052),
    "RescaleSlope": (0x0028, 0x1053),
    "Modality": (0x0008, 0x0060),
    "BodyPartExamined": (0x0018, 0x0015),
    "SOPClassUID": (0x0008, 0x0016),
    "SeriesInstanceUID": (0x0020, 0x000E),
    "InstanceNumber": (0x0020, 0x0013),
    "ImagePositionPatient": (0x0020, 0x0032),
    "AccessionNumber": (0x0008, 0x0050),
    "PatientName": (0x0010, 0x0010),
}
_ELEMENT_VALUES = st.one_of(
    st.binary(max_size=12),
    st.sampled_from([b"abc", b"nan", b"inf", b"1e99", b"-1", b"64", b"1\\2", b"1.2.3", b"", b"\x00" * 4]),
)
_LONG_VRS = (b"OB", b"OW", b"OF", b"OD", b"OL", b"OV", b"UN", b"SQ", b"UT", b"UC", b"UR")
_LENGTHS = [0xFFFFFFF0, 0xFFFFFFFF, 0x7FFFFFFF, 0, 1, 3, 0xFFFF, 0x10000]
_VRS = [b"OB", b"OW", b"UN", b"SQ", b"US", b"UL", b"DS", b"IS", b"LO", b"UT", b"FD", b"XX", b"\x00\x00"]

_BYTE_OP = st.one_of(
    st.tuples(st.just("truncate"), st.floats(0, 1)),
    st.tuples(
        st.just("flip"),
        st.lists(st.tuples(st.floats(0, 1), st.integers(0, 255)), min_size=1, max_size=16),
    ),
    st.tuples(st.just("insert"), st.floats(0, 1), st.binary(min_size=1, max_size=64)),
    st.tuples(st.just("cut"), st.floats(0, 1), st.integers(1, 512)),
    st.tuples(st.just("length"), st.sampled_from(sorted(_TAGS)), st.sampled_from(_LENGTHS)),
    st.tuples(st.just("vr"), st.sampled_from(sorted(_TAGS)), st.sampled_from(_VRS)),
    st.tuples(
        st.just("element"), st.sampled_from(sorted(_ELEMENTS)), st.sampled_from(_VRS), _ELEMENT_VALUES
    ),
)  # fmt: skip


def _apply_dataset_op(ds: Dataset, op: tuple[Any, ...]) -> None:
    kind = op[0]
    if kind == "set":
        setattr(ds, op[1], op[2])
    elif kind == "delete":
        if op[1] in ds:
            delattr(ds, op[1])
    elif kind == "pixels":
        how, n = op[1], op[2]
        data = bytes(ds.get("PixelData") or b"")
        ds.PixelData = {
            "truncate": data[: n % (len(data) + 1)],
            "extend": data + bytes(n),
            "odd": data[:-1] if len(data) % 2 == 0 else data + b"\0",
            "empty": b"",
            "noise": np.random.default_rng(n).bytes(n),
        }[how]
    elif kind == "ts":
        if op[1] is None:
            if "TransferSyntaxUID" in ds.file_meta:
                del ds.file_meta.TransferSyntaxUID
        else:
            ds.file_meta.TransferSyntaxUID = op[1]
    elif kind == "encap":
        _, tsuid, fragments, with_bot = op
        ds.file_meta.TransferSyntaxUID = UID(tsuid)
        ds.PixelData = encapsulate(
            [f if len(f) % 2 == 0 else f + b"\0" for f in fragments] or [b""], has_bot=with_bot
        )
        ds["PixelData"].VR = "OB"
    elif kind == "modality-lut":
        item = Dataset()
        item.LUTDescriptor, item.ModalityLUTType = op[1], "HU"
        item.add_new("LUTData", "OW", struct.pack(f"<{len(op[2])}H", *op[2]))
        ds.ModalityLUTSequence = Sequence([item])


def _element_offset(data: bytes, tag: tuple[int, int]) -> int:
    """Offset of a tag's first little-endian occurrence after the preamble, or -1."""
    return data.find(struct.pack("<HH", *tag), 128)


def _apply_byte_op(data: bytes, op: tuple[Any, ...]) -> bytes:
    kind, n = op[0], len(data)
    if n == 0:
        return data
    if kind == "truncate":
        return data[: int(op[1] * n)]
    if kind == "flip":
        out = bytearray(data)
        for where, value in op[1]:
            out[min(int(where * n), n - 1)] = value
        return bytes(out)
    if kind == "insert":
        at = int(op[1] * n)
        return data[:at] + op[2] + data[at:]
    if kind == "cut":
        at = int(op[1] * n)
        return data[:at] + data[at + op[2] :]
    if kind == "element":
        return _reencode(data, _ELEMENTS[op[1]], op[2], op[3])
    at = _element_offset(data, _TAGS[op[1]])
    if at < 0 or at + 12 > n:
        return data
    vr = data[at + 4 : at + 6]
    if kind == "vr":
        return data[: at + 4] + op[2] + data[at + 6 :]
    # "length": explicit VR with a 4-byte length (OB, OW, UN, SQ, UT...), explicit with 2, or implicit
    if vr in _LONG_VRS:
        return data[: at + 8] + struct.pack("<I", op[2]) + data[at + 12 :]
    if vr.isalpha() and vr.isupper():
        return data[: at + 6] + struct.pack("<H", op[2] & 0xFFFF) + data[at + 8 :]
    return data[: at + 4] + struct.pack("<I", op[2]) + data[at + 8 :]


def _reencode(data: bytes, tag: tuple[int, int], vr: bytes, value: bytes) -> bytes:
    """Replace one element with the same tag written with ``vr`` and ``value``, length fields consistent:
    a wrong VR or a value pydicom cannot convert, in an otherwise well-formed file (pydicom itself refuses
    to write such an element)."""
    at = _element_offset(data, tag)
    if at < 0 or at + 12 > len(data):
        return data
    old_vr = data[at + 4 : at + 6]
    explicit = old_vr.isalpha() and old_vr.isupper()
    if explicit and old_vr in _LONG_VRS:
        header, length = 12, struct.unpack("<I", data[at + 8 : at + 12])[0]
    elif explicit:
        header, length = 8, struct.unpack("<H", data[at + 6 : at + 8])[0]
    else:
        header, length = 8, struct.unpack("<I", data[at + 4 : at + 8])[0]
    if length == 0xFFFFFFFF:
        return data
    value += b"\0" * (len(value) % 2)
    if not explicit:
        encoded = struct.pack("<HHI", *tag, len(value))
    elif vr in _LONG_VRS:
        encoded = struct.pack("<HH", *tag) + vr + struct.pack("<HI", 0, len(value))
    else:
        encoded = struct.pack("<HH", *tag) + vr + struct.pack("<H", len(value))
    return data[:at] + encoded + value + data[at + header + length :]


CASES = st.tuples(
    st.sampled_from(sorted(_BUILT)) | st.deferred(lambda: st.sampled_from(sorted(seeds()))),
    st.lists(_DATASET_OP, max_size=4),
    st.lists(_BYTE_OP, max_size=2),
)
"""(seed name, dataset mutations, byte mutations); built instances are drawn as often as pydicom files."""


def mutate(seed: str, dataset_ops: list[tuple[Any, ...]], byte_ops: list[tuple[Any, ...]]) -> bytes:
    return _mutate_bytes(seeds()[seed], dataset_ops, byte_ops)


def _mutate_bytes(data: bytes, dataset_ops: list[tuple[Any, ...]], byte_ops: list[tuple[Any, ...]]) -> bytes:
    if dataset_ops:
        try:
            ds = dcmread(BytesIO(data), force=True)
            for op in dataset_ops:
                with suppress(Exception):  # a value pydicom will not take (DS "abc"): skip that one op
                    _apply_dataset_op(ds, op)
            buf = BytesIO()
            ds.save_as(buf)
            data = buf.getvalue()
        except Exception:
            pass  # pydicom would not write this combination: fall back to the seed's own bytes
    for op in byte_ops:
        data = _apply_byte_op(data, op)
    return data


# ---------------------------------------------------------------- the property


def _attributes_only(data: bytes) -> object:
    """What the C-STORE path's parse (no Dataset) makes of ``data``: the instance less its dataset, or
    the error's type and message."""
    try:
        return replace(parse_instance(data, "part 1", with_dataset=False), dataset=None)
    except PacsTriageError as exc:
        return type(exc), str(exc)


def check_instance(data: bytes) -> str:
    """Run ``data`` down the service's path; the outcome's name, or an AssertionError for a bug.

    The C-STORE path's parse without a Dataset (:mod:`service.store.attributes`) must agree with the full
    one on every case: the same attributes, or the same refusal."""
    walked = _attributes_only(data)
    try:
        parsed = parse_instance(data, "part 1")
    except PacsTriageError as exc:
        assert walked == (type(exc), str(exc)), (walked, exc)
        assert 400 <= exc.http_status < 500, f"{type(exc).__name__} maps to {exc.http_status}"
        assert exc.part == "part 1" and exc.detail
        return f"refused {exc.http_status} {type(exc).__name__}"
    assert walked == replace(parsed, dataset=None), walked
    ds = dcmread(BytesIO(data))  # what the worker does with the stored bytes (service.analyse._read)
    outcomes = []
    for name, spec in specs().items():
        try:
            pre = preprocess_dataset(ds, spec)
        except PreprocessError as exc:
            assert exc.reason, "a PreprocessError must say why"
            outcomes.append("not analysed")
            continue
        assert pre.array.dtype == np.float32, name
        assert pre.array.ndim == 4 and pre.array.shape[1:] == (1, spec.height, spec.width), (
            name,
            pre.array.shape,
        )
        assert np.isfinite(pre.array).all(), f"{name}: model input has NaN or infinity"
        outcomes.append("analysed")
    return "accepted, " + "/".join(sorted(set(outcomes)))


@contextmanager
def _quiet() -> Iterator[None]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def test_seeds_are_valid() -> None:
    """The built seeds pass validation, so mutations start from the accepted side."""
    with _quiet():
        outcomes = {name: check_instance(seeds()[name]) for name in _BUILT}
    assert outcomes.pop("no-pixels").startswith("refused 422")
    assert all(o.startswith("accepted") for o in outcomes.values()), outcomes
    assert "analysed" in outcomes["chest"] and "analysed" in outcomes["j2k"]
    assert len(seeds()) > 100  # the pydicom files are there


def test_pydicom_files_unmutated() -> None:
    """Every file that ships inside pydicom, as it is: accepted or refused, never a crash."""
    with _quiet():
        outcomes = Counter(check_instance(data).split(",")[0] for data in seeds().values())
    assert outcomes["accepted"] >= 60, outcomes


def test_fuzz_dicom() -> None:
    """Short form ~300 mutated instances, long form 10,000: every one accepted or refused cleanly."""
    n = examples(300, 10_000)
    outcomes: Counter[str] = Counter()
    seeds()  # built outside the timed, memory-watched part
    rss_before, t0 = _peak_rss_mib(), time.perf_counter()

    @settings(
        max_examples=n,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(case=CASES)
    def run(case: tuple[str, list[tuple[Any, ...]], list[tuple[Any, ...]]]) -> None:
        note(f"case: {case!r}")
        with _quiet():
            outcomes[check_instance(mutate(*case))] += 1

    run()
    elapsed, growth = time.perf_counter() - t0, _peak_rss_mib() - rss_before
    print(f"\n{sum(outcomes.values())} cases in {elapsed:.1f} s, peak RSS +{growth:.0f} MiB")  # noqa: T201
    for outcome, count in outcomes.most_common():
        print(f"  {count:6d}  {outcome}")  # noqa: T201
    assert growth < RSS_GROWTH_LIMIT_MIB
    assert sum(c for o, c in outcomes.items() if o.startswith("accepted")) > n // 10, outcomes


NAMED: dict[str, tuple[str, list[tuple[Any, ...]], list[tuple[Any, ...]]]] = {
    # name → (seed, dataset mutations, byte mutations): what the brief lists, each once, by name
    "PixelData length 0xFFFFFFF0": ("chest", [], [("length", "PixelData", 0xFFFFFFF0)]),
    "PatientName length 0xFFFFFFF0 (implicit VR)": (
        "implicit-ct",
        [],
        [("length", "PatientName", 0xFFFFFFF0)],
    ),
    "PixelData of undefined length, not encapsulated": ("chest", [], [("length", "PixelData", 0xFFFFFFFF)]),
    "Rows with VR UL and two bytes": ("chest", [], [("element", "Rows", b"UL", b"@\x00")]),
    "TransferSyntaxUID with VR US": ("chest", [], [("vr", "TransferSyntaxUID", b"US")]),
    "no TransferSyntaxUID": ("chest", [("ts", None)], []),
    "garbage TransferSyntaxUID": ("chest", [("ts", "1.2.3.4")], []),
    "BitsAllocated 32, 16-bit data": ("chest", [("set", "BitsAllocated", 32)], []),
    "BitsAllocated 1": ("chest", [("set", "BitsAllocated", 1)], []),
    "BitsAllocated 8, 16-bit data": ("chest", [("set", "BitsAllocated", 8)], []),
    "RGB planar 1 told planar 0": ("rgb-planar1", [("set", "PlanarConfiguration", 0)], []),
    "multi-frame told 3 frames of 4": ("multiframe", [("set", "NumberOfFrames", "3")], []),
    "RescaleSlope NaN": ("head-ct", [("set", "RescaleSlope", "nan")], []),
    "WindowCenter 'abc'": ("mono1-signed-8bit", [], [("element", "WindowCenter", b"DS", b"abc")]),
    "Modality LUT descriptor of one value": ("modality-lut", [("modality-lut", [4096], [1, 2])], []),
    "RLE header with 15 segments past the end": (
        "rle",
        [("encap", RLELossless, [struct.pack("<16I", 15, *([0xFFFFFF00] * 15))], True)],
        [],
    ),
    "J2K fragment of noise": (
        "j2k",
        [("encap", JPEG2000Lossless, [b"\xff\x4f\xff\x51" + bytes(60)], False)],
        [],
    ),
    "SR SOP class with pixel data": ("sr-with-pixels", [], []),
    "truncated in the file meta": ("chest", [], [("truncate", 0.02)]),
    "truncated in the pixel data": ("chest", [], [("truncate", 0.9)]),
    # GDCM aborted the process on this one (std::terminate in gdcmJPEGCodec.cxx): service/dicom/decode.py
    "JPEG Baseline, 15 frames, fragments of noise (GDCM abort)": (
        "pydicom:rtdose_rle.dcm",
        [("ts", None), ("encap", JPEGBaseline8Bit, [b"\xbc\xf8\x9a", b""], True)],
        [],
    ),
}


@pytest.mark.parametrize("name", sorted(NAMED))
def test_named_cases(name: str) -> None:
    """The mutations the fuzzer draws at random, named: each ends accepted or refused, never a crash."""
    with _quiet():
        outcome = check_instance(mutate(*NAMED[name]))
    assert outcome.startswith(("refused", "accepted")), outcome


# ---------------------------------------------------------------- decompression bombs, one by one


def _jpeg(rows: int, columns: int) -> bytes:
    buf = BytesIO()
    Image.fromarray(np.zeros((rows, columns), np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def _patch_jpeg_size(codestream: bytes, rows: int, columns: int) -> bytes:
    for marker in (b"\xff\xc0", b"\xff\xf7"):
        at = codestream.find(marker)
        if at >= 0:
            return codestream[: at + 5] + struct.pack(">HH", rows, columns) + codestream[at + 9 :]
    raise AssertionError("no frame header")


def _patch_j2k_size(codestream: bytes, rows: int, columns: int) -> bytes:
    at = codestream.find(b"\xff\x4f\xff\x51") + 4
    return codestream[: at + 4] + struct.pack(">II", columns, rows) + codestream[at + 12 :]


def _compressed_8bit(
    tsuid: str, fragment: bytes, rows: int = 64, columns: int = 64, frames: int = 1
) -> bytes:
    ds = make_dataset(rows=rows, columns=columns)
    ds.file_meta.TransferSyntaxUID = UID(tsuid)
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
    ds.NumberOfFrames = frames
    ds.PixelData = encapsulate([fragment] * min(frames, 16))
    ds["PixelData"].VR = "OB"
    return to_bytes(ds)


def _j2k_64() -> bytes:
    ds = _encoded(make_dataset(), JPEG2000Lossless)
    return list(generate_fragments(ds.PixelData))[1]  # after the Basic Offset Table


def _jls_64() -> bytes:
    ds = _encoded(make_dataset(), JPEGLSLossless)
    return list(generate_fragments(ds.PixelData))[1]  # after the Basic Offset Table


def _claiming(rows: int, columns: int, frames: int = 1, tsuid: str = RLELossless) -> bytes:
    """A valid small image whose dataset then claims another size."""
    ds = _encoded(make_dataset(), tsuid) if tsuid != ExplicitVRLittleEndian else make_dataset()
    ds.Rows, ds.Columns, ds.NumberOfFrames = rows, columns, frames
    return to_bytes(ds)


def _meta_end(data: bytes) -> int:
    fp = BytesIO(data)
    read_preamble(fp, False)
    _read_file_meta_info(fp)
    return fp.tell()


def _deflate_bomb(inflated: int) -> bytes:
    """A Deflated Explicit VR LE file whose dataset inflates to ``inflated`` bytes, deflated in chunks so
    the test itself never holds the inflated dataset."""
    ds = make_dataset()
    del ds.PixelData
    plain = to_bytes(ds)
    meta = to_bytes(_with_ts(ds, DeflatedExplicitVRLittleEndian))
    meta = meta[: _meta_end(meta)]
    body = plain[_meta_end(plain) :]
    pixels = inflated - len(body) - 12
    deflater = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    out = [meta, deflater.compress(body + b"\xe0\x7f\x10\x00OW\0\0" + struct.pack("<I", pixels))]
    chunk = bytes(1 << 20)
    for _ in range(pixels // len(chunk)):
        out.append(deflater.compress(chunk))
    out.append(deflater.compress(bytes(pixels % len(chunk))) + deflater.flush())
    return b"".join(out)


BOMBS: dict[str, Callable[[], bytes]] = {
    "native 65535x65535": lambda: _claiming(65535, 65535, tsuid=ExplicitVRLittleEndian),
    "native 2**31-1 frames": lambda: _claiming(64, 64, 2**31 - 1, tsuid=ExplicitVRLittleEndian),
    "rle 65535x65535": lambda: _claiming(65535, 65535),
    "rle 10**6 frames": lambda: _claiming(64, 64, 10**6),
    "j2k 65535x65535 dataset": lambda: _claiming(65535, 65535, tsuid=JPEG2000Lossless),
    "j2k codestream 65535x65535 in a 64x64 dataset": lambda: _compressed_8bit(
        JPEG2000Lossless, _patch_j2k_size(_j2k_64(), 65535, 65535)
    ),
    "j2k codestream 8192x8192 in a 64x64 dataset": lambda: _compressed_8bit(JPEG2000Lossless, _j2k_8192()),
    "jpeg codestream 65535x65535 in a 64x64 dataset": lambda: _compressed_8bit(
        JPEGBaseline8Bit, _patch_jpeg_size(_jpeg(64, 64), 65535, 65535)
    ),
    "jpeg codestream 4096x4096 in a 64x64 dataset": lambda: _compressed_8bit(
        JPEGBaseline8Bit, _jpeg(4096, 4096)
    ),
    "jpeg-ls codestream 65535x65535 in a 64x64 dataset": lambda: _compressed_8bit(
        JPEGLSLossless, _patch_jpeg_size(_jls_64(), 65535, 65535)
    ),
    "jpeg 1000 frames of 64x64 claimed, 16 sent": lambda: _compressed_8bit(
        JPEGBaseline8Bit, _jpeg(64, 64), frames=1000
    ),
    "deflate inflating past the limit": lambda: _deflate_bomb(MAX_INFLATED_BYTES + (1 << 20)),
}


def _j2k_8192() -> bytes:
    from openjpeg import encode

    return bytes(encode(np.zeros((8192, 8192), np.uint8), bits_stored=8))


@pytest.mark.parametrize("name", sorted(BOMBS))
def test_decompression_bomb(name: str) -> None:
    """A small file claiming a huge image is refused, or decoded, within a bounded allocation."""
    with _quiet():
        data = BOMBS[name]()
    assert len(data) < 16 << 20
    tracemalloc.start()
    try:
        with _quiet():
            outcome = check_instance(data)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    print(f"\n{name}: {len(data)} bytes → {outcome}; traced peak {peak / 2**20:.1f} MiB")  # noqa: T201
    assert peak < RSS_GROWTH_LIMIT_MIB * 2**20
    assert outcome.startswith("refused") or "analysed" in outcome


# ---------------------------------------------------------------- whole studies through analyse_study


class _FakeEngine:
    """Outputs of the right shape for each card; checks every batch it is given is a finite model input."""

    def __init__(self, cards: dict[str, ModelCard]) -> None:
        self.cards = cards

    async def run(self, model_name: str, images: np.ndarray, priority: int = 2) -> dict[str, np.ndarray]:
        card = self.cards[model_name]
        spec = card.preprocessing
        assert images.dtype == np.float32 and images.shape[1:] == (1, spec.height, spec.width)
        assert np.isfinite(images).all(), f"{model_name} was given NaN or infinity"
        n = images.shape[0]
        rng = np.random.default_rng(n)
        if card.detection is None:
            return {"probability": rng.random((n, len(card.labels)), dtype=np.float32)}
        s = card.detection.stride
        h, w = spec.height // s, spec.width // s
        return {
            card.detection.heatmap_output: rng.random((n, 1, h, w), dtype=np.float32),
            card.detection.size_output: rng.random((n, 2, h, w), dtype=np.float32) * 20,
        }

    def providers_for(self, name: str) -> list[str]:
        return ["CPUExecutionProvider"]


@functools.cache
def _cards() -> dict[str, ModelCard]:
    return {c.name: c for c in (ModelCard.read(p) for p in sorted(MODELS_DIR.glob("*/card.json")))}


def _study(kind: str) -> list[bytes]:
    """A head CT series long enough for ct-hemorrhage (ordering by position runs), or two chest films."""
    study = generate_uid()
    if kind == "head-ct":
        return head_ct_series(9, study_uid=study)
    return [chest(study_uid=study), chest(study_uid=study, instance_number=2)]


STUDIES = st.tuples(
    st.sampled_from(["head-ct", "chest"]),
    st.lists(
        st.tuples(st.integers(0, 8), st.lists(_DATASET_OP, max_size=3), st.lists(_BYTE_OP, max_size=1)),
        max_size=4,
    ),
)
"""(study kind, [(which instance, dataset mutations, byte mutations)])."""


async def _analyse(instances: list[bytes], tmp: Path) -> tuple[Any, int]:
    from service.analyse import analyse_study
    from service.routing import load_rules
    from service.store.instances import InstanceRecord

    records = []
    for i, data in enumerate(instances):
        try:
            parsed = parse_instance(data, f"part {i + 1}")
        except PacsTriageError:
            continue  # refused at the door: never stored, never analysed
        path = tmp / f"{i}.dcm"
        path.write_bytes(data)
        records.append(
            InstanceRecord(
                parsed.sop_instance_uid, parsed.series_uid, parsed.sop_class_uid, parsed.modality,
                parsed.body_part, path,
            )
        )  # fmt: skip
    rules = load_rules(Path(__file__).resolve().parents[2] / "service" / "routing_rules.yaml")
    analysis = await analyse_study(
        records, rules=rules, cards=_cards(), load_errors={}, engine=_FakeEngine(_cards()), priority=2
    )
    return analysis, len(records)


def test_fuzz_analyse_study(tmp_path: Path) -> None:
    """Short form 60 studies, long form 1,000: with mutated instances mixed into a study, the analysis
    ends with findings and "not analysed: <reason>" entries, never an exception (which would fail the job
    and leave the study without a reason)."""
    import asyncio

    n = examples(60, 1_000)
    outcomes: Counter[str] = Counter()

    @settings(
        max_examples=n,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(case=STUDIES)
    def run(case: tuple[str, list[tuple[int, list[Any], list[Any]]]]) -> None:
        note(f"case: {case!r}")
        kind, mutations = case
        with _quiet():
            instances = _study(kind)
            for which, dataset_ops, byte_ops in mutations:
                i = which % len(instances)
                instances[i] = _mutate_bytes(instances[i], dataset_ops, byte_ops)
            analysis, stored = asyncio.run(_analyse(instances, tmp_path))
        for na in analysis.not_analysed:
            assert na.reason.startswith("not analysed: "), na
        for f in analysis.findings:
            assert 0 <= f.probability <= 1
        if stored:
            assert analysis.findings or analysis.not_analysed, "a stored study ended in silence"
        outcomes[
            "nothing stored"
            if not stored
            else f"{'findings' if analysis.findings else 'no findings'}, "
            f"{'some' if analysis.not_analysed else 'none'} not analysed"
        ] += 1

    run()
    print(f"\n{n} studies: {dict(outcomes)}")  # noqa: T201
