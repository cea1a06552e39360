"""The upper layer as the standard describes it (PS3.8, PS3.7 Annex D): negotiation seen from a pynetdicom
requestor, P-DATA fragment reassembly, aborts mid-dataset, and the DIMSE answers a raw requestor gets.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from io import BytesIO
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import ComputedRadiographyImageStorage, CTImageStorage, ExplicitVRLittleEndian
from pynetdicom import AE, build_role
from pynetdicom.pdu_primitives import UserIdentityNegotiation
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]  # made at import
from sqlalchemy import select
from sqlalchemy.orm import Session

from service.config import DicomSettings
from service.dicom.ae import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME
from service.ingest import pdu
from service.ingest.scp import DicomListener
from service.store.db import InstanceRow
from service.store.instances import Instances
from tests.service.dicom_factory import chest
from tests.service.ingest.raw_peer import (
    A_ABORT,
    A_ASSOCIATE_AC,
    A_ASSOCIATE_RJ,
    A_RELEASE_RP,
    RawPeer,
    associate_rq,
    async_window,
    c_store_rq,
    command,
    dataset_bytes,
    p_data,
)

CR_CONTEXT = [(ComputedRadiographyImageStorage, [ExplicitVRLittleEndian])]


@pytest.fixture
def listener(store: Instances) -> Iterator[DicomListener]:
    lst = DicomListener(
        DicomSettings(host="127.0.0.1", port=0, max_pdu=65536, max_dataset_bytes=200_000),
        store,
        quiet_seconds=60,
    )
    lst.start()
    yield lst
    lst.stop()


@pytest.fixture
def peer(listener: DicomListener) -> Iterator[RawPeer]:
    p = RawPeer(listener.port)
    yield p
    p.close()


def _rows(store: Instances) -> list[InstanceRow]:
    with Session(store.db.engine) as s:
        return list(s.scalars(select(InstanceRow)))


def _leftovers(store: Instances) -> list[Path]:
    return [p for p in store.instances_dir.rglob("*") if p.is_file()]


def _cr() -> Dataset:
    return dcmread(BytesIO(chest()))


# ---- negotiation, seen from pynetdicom ---------------------------------------------------------------------


def test_accept_carries_our_identity_and_maximum(listener: DicomListener) -> None:
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", listener.port, ae_title="PACS_TRIAGE")
    assert assoc.is_established
    assert assoc.acceptor.implementation_class_uid == IMPLEMENTATION_CLASS_UID
    assert assoc.acceptor.implementation_version_name == IMPLEMENTATION_VERSION_NAME
    assert assoc.acceptor.maximum_length == 65536
    assoc.release()
    assert assoc.is_released


def test_async_window_is_answered_one_by_one_and_user_identity_ignored(listener: DicomListener) -> None:
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(Verification)
    identity = UserIdentityNegotiation()
    identity.user_identity_type = 2
    identity.primary_field = b"user"
    identity.secondary_field = b"password"
    identity.positive_response_requested = True
    assoc = ae.associate(
        "127.0.0.1", listener.port, ae_title="PACS_TRIAGE", ext_neg=[async_window(5, 5), identity]
    )
    assert assoc.is_established
    assert assoc.acceptor.asynchronous_operations == (1, 1)  # PS3.7 D.3.3.3: refused cleanly
    assert assoc.acceptor.user_identity is None  # ignored, no response item (D.3.3.7)
    assert assoc.send_c_echo().Status == 0
    assoc.release()


def test_role_selection_is_answered(listener: DicomListener) -> None:
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    role = build_role(CTImageStorage, scu_role=True, scp_role=False)
    assoc = ae.associate("127.0.0.1", listener.port, ae_title="PACS_TRIAGE", ext_neg=[role])
    assert assoc.is_established
    (cx,) = assoc.accepted_contexts
    assert cx.as_scu  # the requestor sends, we store
    assoc.release()


def test_unknown_syntaxes_are_refused_per_context(listener: DicomListener) -> None:
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(CTImageStorage, ["1.2.840.10008.1.2.4.9999"])  # no such transfer syntax
    ae.add_requested_context("1.2.3.4.5.6", ExplicitVRLittleEndian)  # no such SOP class
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", listener.port, ae_title="PACS_TRIAGE")
    assert assoc.is_established
    assert [cx.abstract_syntax for cx in assoc.accepted_contexts] == [Verification]
    assert len(assoc.rejected_contexts) == 2
    assoc.release()


def _decodes(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The lengths of the A-ASSOCIATE-RQ bodies the negotiator decodes from now on."""
    seen: list[int] = []
    real = pdu.decode_associate_rq

    def counted(body: bytes) -> object:
        seen.append(len(body))
        return real(body)

    monkeypatch.setattr("service.ingest.negotiation.decode_associate_rq", counted)
    return seen


def _store_one(peer: RawPeer) -> None:
    """A fresh chest radiograph on context 1, in PDUs the listener's 64 KiB maximum takes."""
    ds = _cr()
    peer.send(p_data(1, 0x03, c_store_rq(ComputedRadiographyImageStorage, ds.SOPInstanceUID)))
    data = dataset_bytes(ds)
    for i in range(0, len(data), 60_000):
        peer.send(p_data(1, 0x02 if i + 60_000 >= len(data) else 0x00, data[i : i + 60_000]))
    assert peer.response_status().Status == 0


def test_a_proposal_seen_before_is_not_decoded_again(
    store: Instances, listener: DicomListener, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A sender proposes the same contexts on every association: the second request's items are the
    first's, decoded once; its own AE titles are read (the fixed fields only) and echoed in its AC
    (PS3.8 9.3.3), and what was agreed is the same."""
    decoded = _decodes(monkeypatch)
    contexts = [
        *CR_CONTEXT,
        (CTImageStorage, [ExplicitVRLittleEndian]),
        ("1.2.3.4.5.6", ["1.2.840.10008.1.2"]),  # refused: no such SOP class
    ]
    answers = []
    for calling in ("FIRST", "SECOND"):
        peer = RawPeer(listener.port)
        try:
            pdu_type, body = peer.associate(calling=calling, contexts=contexts, max_pdu=65536)
            assert pdu_type == A_ASSOCIATE_AC
            assert body[4:36] == b"PACS_TRIAGE".ljust(16) + calling.encode().ljust(16)
            answers.append(body)
            _store_one(peer)
        finally:
            peer.close()
    assert len(decoded) == 2 and decoded[0] > 68 and decoded[1] == 68  # PS3.8 Table 9-11's fixed fields
    assert answers[0][36:] == answers[1][36:]  # the same contexts accepted and refused, the same items
    assert listener.flush(30)
    assert len(_rows(store)) == 2


def test_a_remembered_proposal_still_has_its_titles_checked(store: Instances) -> None:
    """The calling AE allow-list applies to each request, whatever items it shares with an earlier one."""
    lst = DicomListener(
        DicomSettings(host="127.0.0.1", port=0, allowed_calling_aets=["FIRST"]), store, quiet_seconds=60
    )
    lst.start()
    try:
        results = []
        for calling in ("FIRST", "INTRUDER", "FIRST"):
            peer = RawPeer(lst.port)
            try:
                pdu_type, body = peer.associate(calling=calling, contexts=CR_CONTEXT)
                results.append((pdu_type, body[1:4] if pdu_type == A_ASSOCIATE_RJ else b""))
            finally:
                peer.close()
    finally:
        lst.stop()
    assert results == [(A_ASSOCIATE_AC, b""), (A_ASSOCIATE_RJ, bytes([1, 1, 3])), (A_ASSOCIATE_AC, b"")]


def test_a_remembered_proposal_with_unreadable_titles_is_rejected(listener: DicomListener) -> None:
    """Items seen before do not vouch for the fixed fields: control characters in the calling AE title
    (PS3.8 9.3.2: no control characters) are refused as a malformed request, as they are the first time."""
    good = associate_rq(calling="FIRST", contexts=[(str(a), [str(t) for t in ts]) for a, ts in CR_CONTEXT])
    bad = good[:26] + b"\x01" * 16 + good[42:]  # the calling AE title: PDU bytes 26-41
    answers = []
    for raw in (good, bad, good):
        peer = RawPeer(listener.port)
        try:
            peer.send(raw)
            got = peer.recv_pdu()
            assert got is not None
            answers.append((got[0], got[1][1:4] if got[0] == A_ASSOCIATE_RJ else b""))
        finally:
            peer.close()
    assert answers == [(A_ASSOCIATE_AC, b""), (A_ASSOCIATE_RJ, bytes([1, 1, 1])), (A_ASSOCIATE_AC, b"")]


def test_different_proposals_get_their_own_agreements(listener: DicomListener) -> None:
    """Two senders proposing different contexts, one after the other and again: each gets what it asked."""
    asked = [CTImageStorage, ComputedRadiographyImageStorage, CTImageStorage]
    for abstract in asked:
        ae = AE(ae_title="MODALITY")
        ae.add_requested_context(abstract, ExplicitVRLittleEndian)
        assoc = ae.associate("127.0.0.1", listener.port, ae_title="PACS_TRIAGE")
        assert assoc.is_established
        assert [cx.abstract_syntax for cx in assoc.accepted_contexts] == [abstract]
        assoc.release()


# ---- P-DATA reassembly and what a raw requestor gets back ------------------------------------------------


def _associate(peer: RawPeer) -> None:
    pdu_type, _ = peer.associate(contexts=CR_CONTEXT, max_pdu=65536)
    assert pdu_type == A_ASSOCIATE_AC


def test_fragments_in_any_shape_are_reassembled(
    store: Instances, peer: RawPeer, listener: DicomListener
) -> None:
    """The command in two PDVs of two PDUs, the dataset in many PDVs, several PDVs in one PDU."""
    ds = _cr()
    cmd, data = c_store_rq(ComputedRadiographyImageStorage, ds.SOPInstanceUID), dataset_bytes(ds)
    _associate(peer)
    peer.send(p_data(1, 0x01, cmd[:10]) + p_data(1, 0x03, cmd[10:]))
    chunks = [data[i : i + 1000] for i in range(0, len(data), 1000)]
    pdvs = [
        struct.pack(">LBB", len(c) + 2, 1, 0x02 if i == len(chunks) - 1 else 0x00) + c
        for i, c in enumerate(chunks)
    ]
    for i in range(0, len(pdvs), 3):  # three PDVs per PDU
        body = b"".join(pdvs[i : i + 3])
        peer.send(struct.pack(">BBL", 4, 0, len(body)) + body)
    rsp = peer.response_status()
    assert rsp.Status == 0 and rsp.CommandField == 0x8001 and rsp.MessageIDBeingRespondedTo == 1
    assert rsp.AffectedSOPInstanceUID == ds.SOPInstanceUID
    assert listener.flush(30)  # the row follows the success status in the next group commit
    (row,) = _rows(store)
    assert dcmread(store.instances_dir / row.path).PixelData == ds.PixelData


@pytest.mark.parametrize("how", ["a-abort", "connection-closed"])
def test_a_sender_leaving_mid_dataset_leaves_nothing(
    store: Instances, peer: RawPeer, listener, how: str
) -> None:
    ds = _cr()
    data = dataset_bytes(ds)
    _associate(peer)
    peer.send(p_data(1, 0x03, c_store_rq(ComputedRadiographyImageStorage, ds.SOPInstanceUID)))
    peer.send(p_data(1, 0x00, data[: len(data) // 2]))
    if how == "a-abort":
        peer.send(struct.pack(">BBL", A_ABORT, 0, 4) + bytes((0, 0, 0, 0)))
    peer.close()
    # a full echo afterwards proves the listener has handled the end (one event loop, in order)
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", listener.port, ae_title="PACS_TRIAGE")
    assert assoc.is_established and assoc.send_c_echo().Status == 0
    assoc.release()
    assert _rows(store) == [] and _leftovers(store) == []


def test_dataset_above_the_cap_is_read_and_refused(store: Instances, peer: RawPeer) -> None:
    ds = _cr()
    ds.PixelData = bytes(300_000)  # the listener's cap here is 200,000 bytes
    ds.Rows = ds.Columns = 387
    data = dataset_bytes(ds)
    _associate(peer)
    peer.send(p_data(1, 0x03, c_store_rq(ComputedRadiographyImageStorage, ds.SOPInstanceUID)))
    for i in range(0, len(data), 60000):
        peer.send(p_data(1, 0x02 if i + 60000 >= len(data) else 0x00, data[i : i + 60000]))
    rsp = peer.response_status()
    assert rsp.Status == 0xA700 and "larger than 200000" in rsp.ErrorComment
    assert _rows(store) == []


def test_sop_class_must_match_its_context(store: Instances, peer: RawPeer) -> None:
    ds = _cr()
    _associate(peer)
    peer.send(p_data(1, 0x03, c_store_rq(CTImageStorage, ds.SOPInstanceUID)))
    peer.send(p_data(1, 0x02, dataset_bytes(ds)))
    assert peer.response_status().Status == 0x0122
    assert _rows(store) == []


def test_an_operation_we_do_not_serve_is_unrecognized(peer: RawPeer) -> None:
    _associate(peer)
    find = Dataset()
    find.AffectedSOPClassUID = ComputedRadiographyImageStorage
    find.CommandField = 0x0020  # C-FIND-RQ
    find.MessageID = 7
    find.Priority = 0
    find.CommandDataSetType = 0x0101
    peer.send(p_data(1, 0x03, command(find)))
    rsp = peer.response_status()
    assert rsp.Status == 0x0211 and rsp.CommandField == 0x8020 and rsp.MessageIDBeingRespondedTo == 7


def test_a_pdv_on_a_context_never_accepted_aborts(peer: RawPeer) -> None:
    _associate(peer)
    peer.send(p_data(3, 0x03, c_store_rq(ComputedRadiographyImageStorage, "1.2.3")))
    got = peer.recv_pdu()
    assert got is not None and got[0] == A_ABORT
    assert peer.closed()


def test_release_is_answered_and_the_peer_closes(peer: RawPeer) -> None:
    _associate(peer)
    peer.send(struct.pack(">BBL", 5, 0, 4) + bytes(4))
    got = peer.recv_pdu()
    assert got is not None and got[0] == A_RELEASE_RP
