"""DIMSE command sets (PS3.7 Section 9.3 and Annex E) and the Part 10 file a C-STORE dataset is stored as.

Command sets are always Implicit VR Little Endian (PS3.7 6.3.1) and hold a dozen group-0000 elements, so we
decode and encode them here by hand: building a C-STORE-RSP with pynetdicom's encoder (a pydicom Dataset
through ``dimse_messages``) cost ~370 µs per instance, most of the acceptor's CPU (issue 20); this costs a
few µs. Responses carry the elements PS3.7 Table 9.3-2 (C-STORE-RSP) and 9.3-13 (C-ECHO-RSP) require, in
tag order, with Error Comment (0000,0902) on failures (PS3.7 C.4.2).

A received dataset becomes a DICOM Part 10 file (PS3.10 7.1) by putting a preamble and File Meta Information
in front of it, with the SOP class and instance from the command and the transfer syntax of the
presentation context it came on (PS3.7 9.1.1.1: the context's transfer syntax is the dataset's), as
pynetdicom's ``encoded_dataset()`` does; the dataset bytes are stored as received, followed, where the
listener writes slots past the page cache, by a Data Set Trailing Padding element (PS3.10 7.2) that ends
the file on a block boundary (:func:`trailing_padding`).
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass

from service.errors import CommandError

__all__ = [
    "C_ECHO_RQ",
    "C_STORE_RQ",
    "NO_DATASET",
    "Command",
    "decode_command",
    "part10_head",
    "response",
    "trailing_padding",
]

C_STORE_RQ, C_ECHO_RQ, C_CANCEL_RQ = 0x0001, 0x0030, 0x0FFF
NO_DATASET = 0x0101  # Command Data Set Type "no dataset present" (PS3.7 E.1-1)

_TAG = struct.Struct("<HHL")
_SHORT = struct.Struct("<HH2sH")
_UID = re.compile(r"[0-9]+(\.[0-9]+)*")
_ELEMENT_AFFECTED_SOP_CLASS = 0x0002
_ELEMENT_COMMAND_FIELD = 0x0100
_ELEMENT_MESSAGE_ID = 0x0110
_ELEMENT_DATASET_TYPE = 0x0800
_ELEMENT_AFFECTED_SOP_INSTANCE = 0x1000


@dataclass(frozen=True, slots=True)
class Command:
    """The elements of a request command we act on."""

    field: int
    message_id: int
    has_dataset: bool
    sop_class_uid: str
    sop_instance_uid: str


def decode_command(data: bytes) -> Command:
    """A request command set; :class:`CommandError` when it has no Command Field or Message ID.

    UIDs that are not UIDs come back empty: the caller answers them with a failure status and does not echo
    them (they would become part of a file name otherwise).
    """
    elements: dict[int, bytes] = {}
    offset, end = 0, len(data)
    while offset < end:
        if end - offset < 8:
            raise CommandError("command set ends inside an element header")
        group, element, length = _TAG.unpack_from(data, offset)
        if group != 0x0000 or offset + 8 + length > end:
            raise CommandError("command set holds a non-command element or an overlong value")
        elements[element] = data[offset + 8 : offset + 8 + length]
        offset += 8 + length
    try:
        field = _us(elements[_ELEMENT_COMMAND_FIELD])
        message_id = _us(elements[_ELEMENT_MESSAGE_ID])
    except (KeyError, ValueError):
        raise CommandError("command set without a Command Field or Message ID") from None
    dataset_type = elements.get(_ELEMENT_DATASET_TYPE)
    return Command(
        field=field,
        message_id=message_id,
        has_dataset=dataset_type is not None and len(dataset_type) == 2 and _us(dataset_type) != NO_DATASET,
        sop_class_uid=_uid(elements.get(_ELEMENT_AFFECTED_SOP_CLASS, b"")),
        sop_instance_uid=_uid(elements.get(_ELEMENT_AFFECTED_SOP_INSTANCE, b"")),
    )


def response(command: Command, status: int, comment: str = "") -> bytes:
    """The response command set to ``command`` (its Command Field with bit 15 set, PS3.7 E.1-1)."""
    body = (
        [_element(_ELEMENT_AFFECTED_SOP_CLASS, _pad_uid(command.sop_class_uid))]
        if command.sop_class_uid
        else []
    )
    body += [
        _element(_ELEMENT_COMMAND_FIELD, struct.pack("<H", command.field | 0x8000)),
        _element(0x0120, struct.pack("<H", command.message_id)),  # Message ID Being Responded To
        _element(_ELEMENT_DATASET_TYPE, struct.pack("<H", NO_DATASET)),
        _element(0x0900, struct.pack("<H", status)),
    ]
    if comment and status != 0:
        text = comment[:64].encode("ascii", "replace")  # LO: 64 characters
        body.append(_element(0x0902, text + b" " * (len(text) % 2)))
    if command.field == C_STORE_RQ and command.sop_instance_uid:
        body.append(_element(_ELEMENT_AFFECTED_SOP_INSTANCE, _pad_uid(command.sop_instance_uid)))
    rest = b"".join(body)
    return _element(0x0000, struct.pack("<L", len(rest))) + rest


def part10_head(
    *,
    sop_class_uid: str,
    sop_instance_uid: str,
    transfer_syntax_uid: str,
    implementation_uid: str,
    implementation_version: str,
    source_ae: str,
) -> bytes:
    """What comes before the dataset in a Part 10 file: preamble, ``DICM`` and the File Meta Information
    group (PS3.10 7.1)."""
    meta = b"".join(
        (
            _explicit_long(0x0001, b"OB", b"\x00\x01"),  # File Meta Information Version
            _explicit(0x0002, b"UI", _pad_uid(sop_class_uid)),
            _explicit(0x0003, b"UI", _pad_uid(sop_instance_uid)),
            _explicit(0x0010, b"UI", _pad_uid(transfer_syntax_uid)),
            _explicit(0x0012, b"UI", _pad_uid(implementation_uid)),
            _explicit(0x0013, b"SH", _pad_text(implementation_version)),
            _explicit(0x0016, b"AE", _pad_text(source_ae)),
        )
    )
    group_length = _explicit(0x0000, b"UL", struct.pack("<L", len(meta)))
    return b"".join((bytes(128), b"DICM", group_length, meta))


def trailing_padding(length: int, *, implicit: bool, block: int = 4096) -> bytes:
    """A Data Set Trailing Padding element (FFFC,FFFC), OB, zeros (PS3.10 7.2: at the end of the top-level
    dataset, "of no significance"; DCMTK's ``+p`` writes the same) that brings a file of ``length`` bytes,
    whose dataset ends it, to a multiple of ``block``: a slot written past the page cache then has no
    partial last block to write through it (:mod:`service.store.direct_write`). ``length`` is even, as
    every whole Part 10 file is (PS3.5 7.1.1: even value lengths), so the value is too."""
    if length % 2:
        raise ValueError("a Part 10 file of odd length is not whole")
    header = 8 if implicit else 12
    value = -(length + header) % block
    if implicit:
        return _TAG.pack(0xFFFC, 0xFFFC, value) + bytes(value)
    return struct.pack("<HH2sHL", 0xFFFC, 0xFFFC, b"OB", 0, value) + bytes(value)


def _us(value: bytes) -> int:
    if len(value) != 2:
        raise ValueError("US value is not 2 bytes")
    return int.from_bytes(value, "little")


def _uid(value: bytes) -> str:
    text = value.rstrip(b"\x00 ").decode("ascii", "replace")
    return text if len(text) <= 64 and _UID.fullmatch(text) else ""


def _pad_uid(uid: str) -> bytes:
    raw = uid.encode("ascii")
    return raw + b"\x00" * (len(raw) % 2)


def _pad_text(text: str) -> bytes:
    raw = text.encode("ascii", "replace")
    return raw + b" " * (len(raw) % 2)


def _element(element: int, value: bytes) -> bytes:
    return _TAG.pack(0x0000, element, len(value)) + value


def _explicit(element: int, vr: bytes, value: bytes) -> bytes:
    return _SHORT.pack(0x0002, element, vr, len(value)) + value


def _explicit_long(element: int, vr: bytes, value: bytes) -> bytes:
    return struct.pack("<HH2sHL", 0x0002, element, vr, 0, len(value)) + value
