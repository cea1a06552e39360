"""The C-STORE path's parse without a Dataset (:mod:`service.store.attributes`).

That it agrees with the full parse on every case is checked where the cases are many: the fuzzer
(tests/reliability/test_fuzz_dicom.py, ``check_instance``) runs both on pydicom's own files and on every
mutation it draws. Here: that plain data really takes the walk (else the answer path is silently slow
again), that unusual data falls back to the full parse, and that both give the same instance.
"""

from __future__ import annotations

import pickle
from dataclasses import MISSING, fields, replace
from io import BytesIO
from typing import Any

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ImplicitVRLittleEndian,
    RLELossless,
)

from service.store.attributes import walk
from service.store.validate import DEFER_BYTES, OWN_MANUFACTURER, ParsedInstance, parse_instance
from tests.service.dicom_factory import make_dataset, to_bytes


def _ct(**changes: object) -> Dataset:
    ds = make_dataset(modality="CT", body_part="HEAD", rows=32, columns=32)
    ds.ImagesInAcquisition = 40
    for keyword, value in changes.items():
        setattr(ds, keyword, value)
    return ds


def _with_syntax(ds: Dataset, syntax: str) -> bytes:
    ds.file_meta.TransferSyntaxUID = UID(syntax)
    return to_bytes(ds)


def _same_both_ways(data: bytes) -> None:
    walked = parse_instance(data, "part 1", images_only=False, with_dataset=False)
    whole = parse_instance(data, "part 1", images_only=False)
    assert walked.dataset is None and whole.dataset is not None
    assert walked == replace(whole, dataset=None)


def _rle() -> bytes:
    ds = _ct()
    ds.PixelData = encapsulate([bytes(64)])  # what is checked here is the walk, not the codec
    ds["PixelData"].VR = "OB"
    return _with_syntax(ds, RLELossless)


@pytest.mark.parametrize(
    "name, data",
    [
        ("explicit VR little endian", to_bytes(_ct())),
        ("implicit VR little endian", _with_syntax(_ct(), ImplicitVRLittleEndian)),
        ("encapsulated pixel data", _rle()),
        ("no pixel data", to_bytes(_ct(PixelData=None))),
        ("our own result coming back", to_bytes(_ct(Manufacturer=OWN_MANUFACTURER))),
        ("padded values", to_bytes(_ct(Modality="CT ", AccessionNumber=" A12 "))),
    ],
)
def test_plain_data_is_walked_and_agrees(name: str, data: bytes) -> None:
    if name == "no pixel data":  # built with the element, then removed: the factory always adds it
        ds = dcmread(BytesIO(data))
        del ds.PixelData
        data = to_bytes(ds)
    assert walk(data, DEFER_BYTES) is not None, name
    _same_both_ways(data)


def test_what_the_walk_reads() -> None:
    ds = _ct(Manufacturer=OWN_MANUFACTURER, AccessionNumber="A12")
    p = parse_instance(to_bytes(ds), "part 1", images_only=False, with_dataset=False)
    assert (p.study_uid, p.series_uid, p.sop_instance_uid) == (
        ds.StudyInstanceUID,
        ds.SeriesInstanceUID,
        ds.SOPInstanceUID,
    )
    assert (p.modality, p.body_part, p.accession_number, p.expected_in_series) == ("CT", "HEAD", "A12", 40)
    assert p.role == "ours" and p.truncated is None


def _unusual() -> dict[str, bytes]:
    two_values = _ct()
    two_values.ImageType = ["ORIGINAL", "PRIMARY"]
    two_values.add_new(0x00080060, "CS", "CT\\MR")  # Modality with two values
    latin = _ct(SpecificCharacterSet="ISO_IR 100")
    latin.add_new(0x00080050, "SH", "Ä12")  # AccessionNumber outside ASCII
    wrong_vr = _ct()
    wrong_vr.add_new(0x00080060, "LO", "CT")  # Modality is CS
    # the dataset of an implicit VR file under an explicit VR file's meta: dcmread notices and switches
    body, implicit = to_bytes(_ct()), _with_syntax(_ct(), ImplicitVRLittleEndian)
    implicit_under_explicit = (
        body[: 144 + int.from_bytes(body[140:144], "little")]
        + implicit[144 + int.from_bytes(implicit[140:144], "little") :]
    )
    return {
        "several values": to_bytes(two_values),
        "another character set": to_bytes(latin),
        "a wrong VR": to_bytes(wrong_vr),
        "implicit VR under an explicit syntax": implicit_under_explicit,
        "deflated": _with_syntax(_ct(), DeflatedExplicitVRLittleEndian),
        "big endian": _with_syntax(_ct(), ExplicitVRBigEndian),
        "cut in the middle of an element header": to_bytes(_ct())[:400],
    }


@pytest.mark.parametrize("name", sorted(_unusual()))
@pytest.mark.filterwarnings("ignore")  # as in the service: pydicom warns about most of these
def test_unusual_data_is_parsed_in_full(name: str) -> None:
    data = _unusual()[name]
    if name != "cut in the middle of an element header":
        assert walk(data, DEFER_BYTES) is None, name
    try:
        expected = replace(parse_instance(data, "part 1", images_only=False), dataset=None)
    except Exception as exc:  # the same refusal either way
        with pytest.raises(type(exc)) as got:
            parse_instance(data, "part 1", images_only=False, with_dataset=False)
        assert str(got.value) == str(exc)
        return
    assert parse_instance(data, "part 1", images_only=False, with_dataset=False) == expected


def test_truncated_pixel_data_is_named_the_same_way() -> None:
    data = to_bytes(_ct())[:-100]
    assert walk(data, DEFER_BYTES) is not None  # a cut the walk measures itself
    for with_dataset in (True, False):
        p = parse_instance(data, "part 1", keep_truncated=True, with_dataset=with_dataset)
        assert p.truncated == "PixelData declares 2048 bytes and only 1948 are present"


_CLEARED: dict[str, Any] = {"data": b"", "dataset": None}
"""What :meth:`ParsedInstance.attributes_only` drops: every other field is passed on as it is."""


def test_attributes_only_keeps_every_field_but_the_bytes_and_dataset() -> None:
    """``attributes_only`` names the fields by hand (``dataclasses.replace`` was too slow for the answer
    path): it must stay what ``replace`` gives, field by field (``==`` skips ``dataset``, compare=False),
    and a field added to ParsedInstance must fail here until it is passed on (or cleared) there."""
    p = parse_instance(to_bytes(_ct(AccessionNumber="A12")), "part 1", images_only=False)
    p = replace(p, truncated="a reason", role="ours")  # every field set to something
    assert p.dataset is not None and p.data
    got, expected = p.attributes_only(), replace(p, **_CLEARED)
    assert got == expected
    assert got.dataset is None and got.data == b""
    kept = [f for f in fields(ParsedInstance) if f.name not in _CLEARED]
    assert set(_CLEARED) <= {f.name for f in fields(ParsedInstance)}  # a field renamed or removed
    for f in fields(ParsedInstance):
        assert getattr(got, f.name) == getattr(expected, f.name), f.name
    for f in kept:  # a field left at its default would pass whether attributes_only passes it on or not
        assert f.default is MISSING or getattr(p, f.name) != f.default, f"set {f.name} in this test"
        assert f.default_factory is MISSING or getattr(p, f.name) != f.default_factory(), f.name
    values = [getattr(p, f.name) for f in kept]  # a field passed on from another one would pass otherwise
    assert all(values.count(v) == 1 for v in values), values


def test_fields_cross_a_process_and_come_back_as_attributes_only() -> None:
    """What a listener process sends the service (``fields``, pickled) comes back (``from_fields``) as
    ``attributes_only`` would make it, every field kept; and such an instance is its own attributes-only
    copy (the service's row path takes it as it is)."""
    p = parse_instance(to_bytes(_ct(AccessionNumber="A12")), "part 1", images_only=False)
    p = replace(p, truncated="a reason", role="ours", expected_in_series=7)
    back = ParsedInstance.from_fields(pickle.loads(pickle.dumps(p.fields())))
    expected = p.attributes_only()
    for f in fields(ParsedInstance):
        assert getattr(back, f.name) == getattr(expected, f.name), f.name
    assert back.attributes_only() is back
