"""The hand-built codecs against pydicom and pynetdicom: DIMSE commands and responses (PS3.7 9.3, E.1), the
Part 10 wrapper (PS3.10 7.1) and its trailing padding (7.2), PDV parsing and the A-ASSOCIATE-RQ walk
(PS3.8 9.3)."""

from __future__ import annotations

from io import BytesIO

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import ComputedRadiographyImageStorage, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom.dsutils import encode
from pynetdicom.pdu_primitives import UserIdentityNegotiation

from service.errors import CommandError, MalformedPduError
from service.ingest import pdu
from service.ingest.dimse import (
    C_ECHO_RQ,
    C_STORE_RQ,
    Command,
    decode_command,
    part10_head,
    response,
    trailing_padding,
)
from tests.service.dicom_factory import chest
from tests.service.ingest.raw_peer import associate_rq, c_store_rq, dataset_bytes


def _decoded(data: bytes):
    return dcmread(BytesIO(data), force=True)


def test_a_store_request_from_pydicom_is_decoded() -> None:
    cmd = decode_command(c_store_rq(ComputedRadiographyImageStorage, "1.2.3.4", message_id=42))
    assert cmd == Command(C_STORE_RQ, 42, True, ComputedRadiographyImageStorage, "1.2.3.4")


def test_store_response_has_the_elements_of_ps3_7_table_9_3_2() -> None:
    cmd = Command(C_STORE_RQ, 7, True, ComputedRadiographyImageStorage, "1.2.3.4")
    rsp = _decoded(response(cmd, 0xA700, "disk full"))
    assert rsp.CommandField == 0x8001 and rsp.MessageIDBeingRespondedTo == 7
    assert rsp.AffectedSOPClassUID == ComputedRadiographyImageStorage
    assert rsp.AffectedSOPInstanceUID == "1.2.3.4"
    assert rsp.CommandDataSetType == 0x0101 and rsp.Status == 0xA700 and rsp.ErrorComment == "disk full"
    assert rsp.CommandGroupLength == len(response(cmd, 0xA700, "disk full")) - 12


def test_echo_response_and_no_comment_on_success() -> None:
    rsp = _decoded(response(Command(C_ECHO_RQ, 1, False, "1.2.840.10008.1.1", ""), 0x0000, "ignored"))
    assert rsp.CommandField == 0x8030 and rsp.Status == 0
    assert "ErrorComment" not in rsp and "AffectedSOPInstanceUID" not in rsp


@pytest.mark.parametrize(
    "data",
    [b"\x00\x00", b"\x00\x00\x00\x01\x04\x00\x00\x00\x01\x00\x00\x00", b"\x08\x00\x16\x00\x02\x00\x00\x00ab"],
    ids=["truncated", "no-command-field", "not-group-0000"],
)
def test_unreadable_commands_are_refused(data: bytes) -> None:
    with pytest.raises(CommandError):
        decode_command(data)


def test_uids_that_are_not_uids_come_back_empty() -> None:
    cmd = decode_command(
        c_store_rq(ComputedRadiographyImageStorage, "1.2.3").replace(b"1.2.3\x00", b"../x\x00\x00")
    )
    assert cmd.sop_instance_uid == ""


def _head(ds: Dataset, syntax: str = ExplicitVRLittleEndian) -> bytes:
    return part10_head(
        sop_class_uid=ds.SOPClassUID,
        sop_instance_uid=ds.SOPInstanceUID,
        transfer_syntax_uid=syntax,
        implementation_uid="1.2.3",
        implementation_version="X",
        source_ae="CT01",
    )


def test_part10_reads_back_as_the_sent_dataset() -> None:
    ds = dcmread(BytesIO(chest()))
    data = dataset_bytes(ds)
    wrapped = _head(ds) + data
    back = dcmread(BytesIO(wrapped))
    assert back.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
    assert back.file_meta.SourceApplicationEntityTitle == "CT01"
    assert back.PixelData == ds.PixelData and wrapped.endswith(data)


@pytest.mark.parametrize("implicit", [False, True], ids=["explicit", "implicit"])
def test_trailing_padding_fills_the_last_block(implicit: bool) -> None:
    header = 8 if implicit else 12
    for length in range(0, 3 * 4096, 2):
        padding = trailing_padding(length, implicit=implicit)
        assert (length + len(padding)) % 4096 == 0 and header <= len(padding) < 4096 + header
    with pytest.raises(ValueError):
        trailing_padding(1001, implicit=implicit)  # a whole Part 10 file has an even length


@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
def test_a_padded_file_reads_back_as_the_dataset_and_its_padding(syntax: str) -> None:
    ds = dcmread(BytesIO(chest()))
    body = encode(ds, syntax == ImplicitVRLittleEndian, True)
    assert body is not None
    data = _head(ds, syntax) + body
    padded = data + trailing_padding(len(data), implicit=syntax == ImplicitVRLittleEndian)
    back = dcmread(BytesIO(padded))
    assert len(padded) % 4096 == 0
    assert list(back.keys())[-1] == 0xFFFCFFFC and back.DataSetTrailingPadding == bytes(
        len(back.DataSetTrailingPadding)
    )
    del back.DataSetTrailingPadding
    assert back == ds


def test_pdvs_must_fit_their_pdu() -> None:
    assert [(c, h, bytes(f)) for c, h, f in pdu.iter_pdvs(b"\x00\x00\x00\x04\x01\x03ab")] == [(1, 3, b"ab")]
    for bad in (b"", b"\x00\x00\x00\x09\x01\x03ab", b"\x00\x00\x00\x01\x01"):
        with pytest.raises(MalformedPduError):
            pdu.iter_pdvs(bad)


def test_user_identity_is_dropped_before_pynetdicom_decodes() -> None:
    identity = UserIdentityNegotiation()
    identity.user_identity_type = 1
    identity.primary_field = b"someone"
    rq = pdu.decode_associate_rq(associate_rq(extra=[identity])[6:])
    assert not [i for i in rq.user_information if isinstance(i, UserIdentityNegotiation)]
    assert rq.calling_ae_title == "RAW"
