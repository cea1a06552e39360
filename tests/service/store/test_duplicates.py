"""What counts as the same instance again (a retry) and what as a SOP Instance UID conflict (STOW-RS)."""

from __future__ import annotations

from io import BytesIO

from pydicom import dcmread
from pydicom.uid import ImplicitVRLittleEndian

from service.ingest.dimse import trailing_padding
from service.store.duplicates import dataset_bytes, same_content
from tests.service.dicom_factory import make_dataset, to_bytes


def test_same_data_set_with_other_file_meta_is_the_same_content() -> None:
    ds = make_dataset()
    first = to_bytes(ds)
    ds.file_meta.ImplementationVersionName = "OTHER_SENDER"  # another sender's meta group, same data set
    second = to_bytes(ds)
    assert first != second and dataset_bytes(first) == dataset_bytes(second)
    assert same_content(first, second)


def test_other_content_or_transfer_syntax_is_not_the_same() -> None:
    ds = make_dataset()
    first = to_bytes(ds)
    edited = dcmread(BytesIO(first))
    edited.SeriesDescription = "edited"
    assert not same_content(first, to_bytes(edited))
    implicit = dcmread(BytesIO(first))
    implicit.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    assert not same_content(first, to_bytes(implicit))
    assert not same_content(first, b"") and not same_content(b"junk", first)


def test_meta_without_group_length_falls_back_to_parsing() -> None:
    data = to_bytes(make_dataset())
    assert dataset_bytes(data[:132] + b"\x02\x00\x01\x00" + data[136:]) is None
    assert same_content(data, data)


def test_the_listeners_trailing_padding_is_not_content() -> None:
    """An instance received by C-STORE is stored with a Data Set Trailing Padding element (PS3.10 7.2):
    the same instance sent again by STOW-RS is a retry, not a conflict; other content still differs."""
    data = to_bytes(make_dataset())
    padded = data + trailing_padding(len(data), implicit=False)
    assert len(padded) % 4096 == 0 and same_content(padded, data) and same_content(data, padded)
    edited = dcmread(BytesIO(data))
    edited.SeriesDescription = "edited"
    assert not same_content(padded, to_bytes(edited))
