"""DICOM upper-layer PDUs (PS3.8 Section 9.3): framing with deadlines, a hardened A-ASSOCIATE-RQ decoder,
and the small PDUs we send, encoded by hand.

Reading a PDU (:func:`read_pdu`) has two clocks: the wait for its first byte (the idle timer, or ARTIM before
the association) and, from that first byte, one deadline for the whole PDU, so a half-sent or dripping PDU
costs its sender the connection within seconds instead of holding a slot for ever (both watched by one
timer per connection, :mod:`service.ingest.deadlines`). The declared length is
checked against the caller's limit (our advertised Maximum Length Received, PS3.8 D.1, or a small cap before
association) *before* any of the body is read: a header declaring 4 GiB costs us six bytes.

The A-ASSOCIATE-RQ is decoded by pynetdicom's own codec (:class:`pynetdicom.pdu.A_ASSOCIATE_RQ`), after our
walk over its items (:func:`_sanitize`) has checked that every item and sub-item length fits its parent: the
codec checks that with ``assert``, which ``python -O`` skips and which otherwise ends in an AssertionError.
Items we do not use or do not know (SOP class extended negotiation, user identity, PS3.7 D.3.3.5-7) are
dropped there, so they are ignored as PS3.8 9.3.1 asks rather than crashing a decoder. Anything the codec
still refuses becomes :class:`MalformedPduError`, answered with an A-ASSOCIATE-RJ by the caller.
"""

from __future__ import annotations

import asyncio
import struct

from pynetdicom.pdu import A_ASSOCIATE_AC, A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import A_ASSOCIATE

from service.errors import MalformedPduError, PduTooLargeError
from service.ingest.deadlines import ReadDeadlines
from service.ingest.reader import PduReader

__all__ = [
    "A_ABORT",
    "A_ASSOCIATE_RJ",
    "ASSOCIATE_RQ",
    "P_DATA_TF",
    "RELEASE_RP",
    "RELEASE_RQ",
    "RQ_FIXED",
    "abort_pdu",
    "accept_pdu",
    "decode_associate_rq",
    "iter_pdvs",
    "p_data_pdu",
    "read_pdu",
    "reject_pdu",
]

ASSOCIATE_RQ, ASSOCIATE_AC, A_ASSOCIATE_RJ, P_DATA_TF, RELEASE_RQ, RELEASE_RP, A_ABORT = range(1, 8)
PDU_NAMES = {
    1: "A-ASSOCIATE-RQ",
    2: "A-ASSOCIATE-AC",
    3: "A-ASSOCIATE-RJ",
    4: "P-DATA-TF",
    5: "A-RELEASE-RQ",
    6: "A-RELEASE-RP",
    7: "A-ABORT",
}

# A-ABORT reasons of the service provider (PS3.8 Table 9-26)
ABORT_NOT_SPECIFIED, ABORT_UNRECOGNIZED_PDU, ABORT_UNEXPECTED_PDU = 0, 1, 2
ABORT_UNRECOGNIZED_PARAMETER, ABORT_UNEXPECTED_PARAMETER, ABORT_INVALID_PARAMETER = 4, 5, 6

_HEADER = struct.Struct(">BBL")
_ITEM = struct.Struct(">BBH")
_PDV = struct.Struct(">LBB")
RQ_FIXED = 68  # protocol version .. reserved, PS3.8 Table 9-11
_RQ_ITEMS = {0x10, 0x20, 0x50}  # application context, presentation context, user information
_PC_SUB_ITEMS = {0x30, 0x40}  # abstract syntax, transfer syntax
_USER_SUB_ITEMS = {0x51, 0x52, 0x53, 0x54, 0x55}  # PS3.7 D.3.3.1-4 (0x56-0x58 dropped: not negotiated)


async def read_pdu(
    reader: PduReader, *, limit: int, deadlines: ReadDeadlines, wait_s: float, pdu_s: float
) -> tuple[int, bytes | memoryview] | None:
    """One PDU as ``(type, body)``; None when the peer closed the connection between PDUs. The body is a
    view of what was received where it can be (:meth:`PduReader.read_view`: no copy).

    ``wait_s`` bounds the wait for the first byte, ``pdu_s`` the time from it to the last byte (watched by
    the connection's ``deadlines``: IdleError, PduDeadlineError), ``limit`` the declared length (checked
    before reading the body).
    """
    try:
        deadlines.start(wait_s, whole_pdu=False)
        first = await reader.read(1)
        if not first:
            return None
        deadlines.start(pdu_s, whole_pdu=True)
        rest = await reader.readexactly(5)
        length = int.from_bytes(rest[1:], "big")
        if length > limit:
            name = PDU_NAMES.get(first[0], f"PDU type 0x{first[0]:02X}")
            raise PduTooLargeError(f"{name} declares {length} bytes, above our limit of {limit}")
        body = await reader.read_view(length)
    except asyncio.CancelledError:
        expired = deadlines.expired()
        if expired is None:
            raise
        raise expired from None
    finally:
        deadlines.stop()
    return first[0], body


def iter_pdvs(body: bytes | memoryview) -> list[tuple[int, int, memoryview]]:
    """The PDV items of a P-DATA-TF body as ``(context ID, control header, fragment)`` (PS3.8 9.3.5)."""
    out = []
    view = memoryview(body)
    offset, end = 0, len(body)
    while offset < end:
        if end - offset < 6:
            raise MalformedPduError("P-DATA-TF ends inside a PDV item header")
        length, context_id, control = _PDV.unpack_from(body, offset)
        if length < 2 or offset + 4 + length > end:
            raise MalformedPduError(f"PDV item length {length} does not fit its P-DATA-TF")
        out.append((context_id, control, view[offset + 6 : offset + 4 + length]))
        offset += 4 + length
    if not out:
        raise MalformedPduError("P-DATA-TF without a PDV item")
    return out


def p_data_pdu(context_id: int, command: bytes) -> bytes:
    """A P-DATA-TF with one PDV: the last fragment of a command (message control header 0x03)."""
    return _HEADER.pack(P_DATA_TF, 0, len(command) + 6) + _PDV.pack(len(command) + 2, context_id, 3) + command


def abort_pdu(source: int = 2, reason: int = ABORT_NOT_SPECIFIED) -> bytes:
    """A-ABORT (PS3.8 9.3.8): source 0 service user, 2 service provider."""
    return _HEADER.pack(A_ABORT, 0, 4) + bytes((0, 0, source, reason))


def reject_pdu(result: int, source: int, reason: int) -> bytes:
    """A-ASSOCIATE-RJ (PS3.8 9.3.4): result 1 permanent, 2 transient; source and reason per Table 9-21."""
    return _HEADER.pack(A_ASSOCIATE_RJ, 0, 4) + bytes((0, result, source, reason))


RELEASE_RP_PDU = _HEADER.pack(RELEASE_RP, 0, 4) + bytes(4)


def accept_pdu(primitive: A_ASSOCIATE) -> bytes:
    """A-ASSOCIATE-AC from its primitive, by pynetdicom's encoder (once per association: cost irrelevant)."""
    pdu = A_ASSOCIATE_AC()
    pdu.from_primitive(primitive)
    return pdu.encode()


def decode_associate_rq(body: bytes) -> A_ASSOCIATE:
    """The A-ASSOCIATE-RQ as pynetdicom's primitive, or :class:`MalformedPduError` saying what is wrong."""
    clean = _sanitize(body)
    pdu = A_ASSOCIATE_RQ()
    try:
        pdu.decode(_HEADER.pack(ASSOCIATE_RQ, 0, len(clean)) + clean)
        primitive = pdu.to_primitive()
        _ = primitive.user_information  # the codec builds these lazily in some versions
    except Exception as exc:  # the codec raises ValueError, TypeError, KeyError... on bad values
        raise MalformedPduError(f"A-ASSOCIATE-RQ cannot be decoded ({type(exc).__name__}: {exc})") from exc
    return primitive


def protocol_version(body: bytes | memoryview) -> int:
    """The protocol-version bit field of an A-ASSOCIATE-RQ (bit 0 is version 1, PS3.8 9.3.2)."""
    return int.from_bytes(body[0:2], "big") if len(body) >= 2 else 0


def _sanitize(body: bytes) -> bytes:
    """The RQ body with every length checked and the items we ignore left out (see the module docstring)."""
    if len(body) < RQ_FIXED:
        raise MalformedPduError(f"A-ASSOCIATE-RQ of {len(body)} bytes is shorter than its fixed fields")
    _check_text(body[4:20], "called AE title")
    _check_text(body[20:36], "calling AE title")
    kept = [body[:RQ_FIXED]]
    for item_type, item in _items(body, RQ_FIXED, len(body), "A-ASSOCIATE-RQ"):
        if item_type == 0x20:
            if len(item) < 4:
                raise MalformedPduError("presentation context item shorter than its fixed fields")
            for sub_type, sub in _items(item, 4, len(item), "presentation context item"):
                if sub_type not in _PC_SUB_ITEMS:
                    raise MalformedPduError(f"presentation context item holds sub-item 0x{sub_type:02X}")
                _check_text(sub, "abstract or transfer syntax")
            kept.append(_ITEM.pack(0x20, 0, len(item)) + item)
        elif item_type == 0x50:
            users = [
                (t, s) for t, s in _items(item, 0, len(item), "user information") if t in _USER_SUB_ITEMS
            ]
            for t, s in users:
                _check_user_sub_item(t, s)
            data = b"".join(_ITEM.pack(t, 0, len(s)) + s for t, s in users)
            kept.append(_ITEM.pack(0x50, 0, len(data)) + data)
        elif item_type == 0x10:
            _check_text(item, "application context name")
            kept.append(_ITEM.pack(0x10, 0, len(item)) + item)
    return b"".join(kept)


def _items(data: bytes, offset: int, end: int, where: str) -> list[tuple[int, bytes]]:
    """``(type, value)`` of each item between ``offset`` and ``end``; every length must fit exactly."""
    out = []
    while offset < end:
        if end - offset < 4:
            raise MalformedPduError(f"{where} ends inside an item header")
        item_type, _, length = _ITEM.unpack_from(data, offset)
        if offset + 4 + length > end:
            raise MalformedPduError(f"{where}: item 0x{item_type:02X} of {length} bytes overruns its parent")
        out.append((item_type, data[offset + 4 : offset + 4 + length]))
        offset += 4 + length
    return out


def _check_user_sub_item(item_type: int, value: bytes) -> None:
    """Fixed-size user information sub-items (PS3.7 D.3.3.1-4, PS3.8 D.1) must have their size."""
    if item_type in (0x51, 0x53) and len(value) != 4:
        raise MalformedPduError(f"user information sub-item 0x{item_type:02X} is not 4 bytes long")
    if item_type == 0x54 and (len(value) < 4 or int.from_bytes(value[:2], "big") != len(value) - 4):
        raise MalformedPduError("SCP/SCU role selection sub-item length does not match its UID length")
    if item_type in (0x52, 0x55):
        _check_text(value, f"user information sub-item 0x{item_type:02X}")
    if item_type == 0x54:
        _check_text(value[2:-2], "SCP/SCU role selection SOP class")


def _check_text(value: bytes, what: str) -> None:
    """UIDs, AE titles and names are ISO 646 text (PS3.8 Annex F, PS3.5 6.2): printable ASCII, maybe
    padded with NUL or space; the codec would otherwise log a traceback of its own before failing."""
    text = value.rstrip(b"\x00 ")
    if not text or any(c < 0x20 or c > 0x7E for c in text):
        raise MalformedPduError(f"{what} is empty or not printable ASCII")
