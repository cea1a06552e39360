"""A DICOM requestor on a bare socket, for what no well-behaved SCU will send: half PDUs, lies about
lengths, malformed A-ASSOCIATE-RQs, an abort in the middle of a dataset.

PDUs are built with pynetdicom's encoders (what a real SCU would send) and then cut or bent by the test;
reading is plain blocking ``recv`` with a timeout, so a test never hangs on a listener that forgot to act.
"""

from __future__ import annotations

import socket
import struct
from io import BytesIO

from pydicom import dcmread
from pydicom.dataset import Dataset
from pynetdicom.dsutils import encode
from pynetdicom.pdu import A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import (
    A_ASSOCIATE,
    AsynchronousOperationsWindowNegotiation,
    ImplementationClassUIDNotification,
    ImplementationVersionNameNotification,
    MaximumLengthNotification,
    SCP_SCU_RoleSelectionNegotiation,
    SOPClassCommonExtendedNegotiation,
    SOPClassExtendedNegotiation,
    UserIdentityNegotiation,
)
from pynetdicom.presentation import build_context

from service.ingest.dimse import C_STORE_RQ

A_ASSOCIATE_AC, A_ASSOCIATE_RJ, P_DATA_TF, A_RELEASE_RQ, A_RELEASE_RP, A_ABORT = 2, 3, 4, 5, 6, 7
RECV_TIMEOUT_S = 10.0  # only bounds a broken listener; the listener's own timers in tests are ~0.5 s


# The user information sub-items a request may carry beyond the two every request has (PS3.7 D.3.3; pynetdicom
# names the union privately, pdu_primitives._UI).
UserItem = (
    ImplementationVersionNameNotification
    | AsynchronousOperationsWindowNegotiation
    | SCP_SCU_RoleSelectionNegotiation
    | SOPClassExtendedNegotiation
    | SOPClassCommonExtendedNegotiation
    | UserIdentityNegotiation
)


def associate_rq(
    *,
    calling: str = "RAW",
    called: str = "PACS_TRIAGE",
    contexts: list[tuple[str, list[str]]] | None = None,
    max_pdu: int = 16384,
    extra: list[UserItem] | None = None,
) -> bytes:
    """An A-ASSOCIATE-RQ PDU; contexts get IDs 1, 3, 5... in order."""
    rq = A_ASSOCIATE()
    rq.application_context_name = "1.2.840.10008.3.1.1.1"
    rq.calling_ae_title, rq.called_ae_title = calling, called
    for i, (abstract, syntaxes) in enumerate(contexts or [("1.2.840.10008.1.1", ["1.2.840.10008.1.2"])]):
        cx = build_context(abstract, syntaxes)
        cx.context_id = 2 * i + 1
        rq.presentation_context_definition_list.append(cx)
    length = MaximumLengthNotification()
    length.maximum_length_received = max_pdu
    impl = ImplementationClassUIDNotification()
    impl.implementation_class_uid = "1.2.826.0.1.3680043.9.9999.1"
    rq.user_information = [length, impl, *(extra or [])]
    pdu = A_ASSOCIATE_RQ()
    pdu.from_primitive(rq)
    return pdu.encode()


def async_window(invoked: int, performed: int) -> AsynchronousOperationsWindowNegotiation:
    item = AsynchronousOperationsWindowNegotiation()
    item.maximum_number_operations_invoked = invoked
    item.maximum_number_operations_performed = performed
    return item


def command(ds: Dataset) -> bytes:
    """A command set, Implicit VR Little Endian with its group length (PS3.7 6.3.1)."""
    body = _encoded(ds, implicit_vr=True)
    head = Dataset()
    head.CommandGroupLength = len(body)
    return _encoded(head, implicit_vr=True) + body


def c_store_rq(sop_class: str, sop_instance: str, message_id: int = 1) -> bytes:
    ds = Dataset()
    ds.AffectedSOPClassUID = sop_class
    ds.CommandField = C_STORE_RQ
    ds.MessageID = message_id
    ds.Priority = 0
    ds.CommandDataSetType = 0x0000
    ds.AffectedSOPInstanceUID = sop_instance
    return command(ds)


def p_data(context_id: int, control: int, data: bytes) -> bytes:
    """A P-DATA-TF with one PDV; control 0x03 last command fragment, 0x00/0x02 dataset fragments."""
    return (
        struct.pack(">BBL", P_DATA_TF, 0, len(data) + 6)
        + struct.pack(">LBB", len(data) + 2, context_id, control)
        + data
    )


def dataset_bytes(ds: Dataset) -> bytes:
    """The dataset alone (no file meta) in Explicit VR Little Endian, as it travels in P-DATA."""
    return _encoded(ds, implicit_vr=False)


def _encoded(ds: Dataset, implicit_vr: bool) -> bytes:
    """``ds`` little endian; pynetdicom's ``encode`` answers None where it cannot encode: a test error."""
    data = encode(ds, implicit_vr, True)
    assert data is not None, "pynetdicom could not encode the dataset"
    return data


class RawPeer:
    """One connection to the listener."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.sock.settimeout(RECV_TIMEOUT_S)

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def recv_pdu(self) -> tuple[int, bytes] | None:
        """The next PDU, or None once the listener closed the connection."""
        head = self._exactly(6)
        if head is None:
            return None
        body = self._exactly(struct.unpack(">L", head[2:])[0])
        return head[0], body or b""

    def closed(self) -> bool:
        """True once the listener closes (reads and drops anything it still sends first)."""
        try:
            while self.sock.recv(65536):
                pass
        except ConnectionResetError:
            pass
        return True

    def associate(self, **kwargs: object) -> tuple[int, bytes]:
        self.send(associate_rq(**kwargs))  # type: ignore[arg-type]
        got = self.recv_pdu()
        assert got is not None, "the listener closed instead of answering the A-ASSOCIATE-RQ"
        return got

    def response_status(self) -> Dataset:
        """The next DIMSE response command (one PDV), decoded."""
        got = self.recv_pdu()
        assert got is not None and got[0] == P_DATA_TF, got
        return dcmread(BytesIO(got[1][6:]), force=True)  # PDV header: length, context, control

    def close(self) -> None:
        self.sock.close()

    def _exactly(self, n: int) -> bytes | None:
        data = b""
        while len(data) < n:
            try:
                chunk = self.sock.recv(n - len(data))
            except ConnectionResetError:
                return None
            if not chunk:
                return None
            data += chunk
        return data
