"""What the store needs of an instance, read from its raw elements without building a pydicom Dataset.

Why: a C-STORE sender waits for each answer (PS3.7 9.1.1, asynchronous operations window 1), and the
answer waited for ``dcmread`` plus the conversion of the ten values the store uses: ~280 µs for the bench's
CT instance of 23 top-level elements (a scanner's hundreds cost more), the largest piece of the answer path
after the sync (bench/RESULTS.md, session 19). Underneath, ``dcmread`` runs pydicom's own element generator
(:func:`pydicom.filereader.data_element_generator`), which walks the same elements in ~35 µs; the time was
in the Dataset and in converting (and validating) each value. So the generator is kept and only those two
are left out: the values we need are plain ASCII read straight from the element bytes.

Only plain data is walked: Implicit or Explicit VR Little Endian (PS3.5 A.1, A.2; the encapsulated
syntaxes are explicit little endian too), each value single, printable ASCII, with the VR its attribute has.
Anything else (deflated or big endian data, several values, other character sets, a wrong VR, an element
the generator cannot read, an empty dataset) returns None and the caller parses in full
(:func:`service.store.validate.parse_instance`), so unusual data meets exactly the checks and messages it
always did. Declared lengths are checked the same way for both (:func:`elements_truncation`).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from io import BytesIO

from pydicom.datadict import keyword_for_tag
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.filereader import data_element_generator
from pydicom.tag import BaseTag
from pydicom.valuerep import VR

__all__ = [
    "IMAGES_IN_ACQUISITION",
    "INTEGER",
    "MANUFACTURER",
    "NOT_LITTLE_ENDIAN_EXPLICIT",
    "PIXEL_TAGS",
    "PLAIN",
    "TEXTS",
    "UIDS",
    "Attributes",
    "attributes_from",
    "elements_truncation",
    "walk",
]

_UNDEFINED = 0xFFFFFFFF
_DELIMITER_BYTES = 8
"""An item or sequence delimitation item: tag (FFFE,E00D)/(FFFE,E0DD) and a zero length (PS3.5 7.5)."""

_IMPLICIT_LE = "1.2.840.10008.1.2"
NOT_LITTLE_ENDIAN_EXPLICIT = {"1.2.840.10008.1.2.1.99", "1.2.840.10008.1.2.2"}  # deflated, big endian
PIXEL_TAGS = frozenset({0x7FE00010, 0x7FE00008, 0x7FE00009})
"""(Float/Double Float) Pixel Data: an instance with any of them is an image."""
_TRANSFER_SYNTAX = 0x00020010
UIDS = {0x0020000D: "study", 0x0020000E: "series", 0x00080018: "sop", 0x00080016: "sop_class"}
TEXTS = {0x00080060: ("modality", "CS"), 0x00180015: ("body_part", "CS"), 0x00080050: ("accession", "SH")}
MANUFACTURER, IMAGES_IN_ACQUISITION = 0x00080070, 0x00201002
PLAIN = re.compile(rb"[\x20-\x5b\x5d-\x7e]*")  # printable ASCII but the value separator (PS3.5 6.4)
INTEGER = re.compile(r"[+-]?[0-9]{1,12}")
_VRS = frozenset(vr.value for vr in VR)
_WANTED = frozenset({*UIDS, *TEXTS, MANUFACTURER, IMAGES_IN_ACQUISITION})


class _Unusual(Exception):
    """Something the walk does not read: the caller parses in full."""


@dataclass(frozen=True, slots=True)
class Attributes:
    """What :func:`service.store.validate.parse_instance` checks and keeps, however it was read."""

    transfer_syntax_uid: object  # a str when read; anything else is refused as "not a UID"
    study: str | None
    series: str | None
    sop: str | None
    sop_class: str | None
    modality: str | None
    body_part: str | None
    accession: str | None
    manufacturer: str | None
    images_in_acquisition: int | None
    has_pixels: bool
    truncated: str | None
    """Why the dataset is cut short (:func:`elements_truncation`); None when whole."""


def walk(data: bytes, defer_size: int) -> Attributes | None:
    """The attributes of a Part 10 file (PS3.10 7.1) with plain values; None when anything is unusual."""
    try:
        return _walk(data, defer_size)
    except Exception:  # _Unusual, or whatever the generator raises (warnings too, where they are errors)
        return None


def _walk(data: bytes, defer_size: int) -> Attributes:
    # PS3.10 7.1: preamble, "DICM", then (0002,0000) UL File Meta Information Group Length first; the
    # dataset starts where group 0002 ends (where dcmread starts it), which the length must agree with
    if data[128:138] != b"DICM\x02\x00\x00\x00UL" or data[138:140] != b"\x04\x00":
        raise _Unusual
    fp = BytesIO(data)
    fp.seek(132)
    meta = {int(e.tag): e for e in data_element_generator(fp, False, True, stop_when=_not_group_2)}
    if fp.tell() != 144 + int.from_bytes(data[140:144], "little") or any(
        e.VR not in _VRS for e in meta.values()
    ):
        raise _Unusual
    syntax = _text(meta.get(_TRANSFER_SYNTAX), "UI")
    if syntax is None or syntax in NOT_LITTLE_ENDIAN_EXPLICIT:
        raise _Unusual
    implicit = syntax == _IMPLICIT_LE
    elements = list(data_element_generator(fp, implicit, True, defer_size=defer_size))
    if not elements:
        raise _Unusual  # pydicom drops a dataset that ends inside a sequence: reported in full
    found: dict[int, RawDataElement | DataElement] = {}
    has_pixels = False
    for e in elements:  # one pass: the VRs, the values we read, the pixel data's presence
        if not implicit and e.VR not in _VRS:
            raise _Unusual  # implicit VR data under an explicit syntax: dcmread notices and switches
        if e.tag in _WANTED:
            found[int(e.tag)] = e
        has_pixels = has_pixels or e.tag in PIXEL_TAGS
    return attributes_from(
        syntax,
        lambda tag, vr: _text(found.get(tag), vr),
        has_pixels=has_pixels,
        truncated=elements_truncation(elements, len(data)),
    )


def attributes_from(
    syntax: str, text: Callable[[int, str], str | None], *, has_pixels: bool, truncated: str | None
) -> Attributes:
    """:class:`Attributes` from ``text(tag, vr)``, a walk's reading of one plain value (None: absent);
    ValueError when ImagesInAcquisition is not an integer (the walk then gives up)."""
    uids = {name: text(tag, "UI") for tag, name in UIDS.items()}
    texts = {name: text(tag, vr) for tag, (name, vr) in TEXTS.items()}
    images = text(IMAGES_IN_ACQUISITION, "IS")
    if images is not None and not INTEGER.fullmatch(images):
        raise ValueError("ImagesInAcquisition is not an integer")
    return Attributes(
        transfer_syntax_uid=syntax,
        study=uids["study"],
        series=uids["series"],
        sop=uids["sop"],
        sop_class=uids["sop_class"],
        modality=texts["modality"],
        body_part=texts["body_part"],
        accession=texts["accession"],
        manufacturer=text(MANUFACTURER, "LO"),
        images_in_acquisition=None if images is None else int(images),
        has_pixels=has_pixels,
        truncated=truncated,
    )


def _not_group_2(tag: BaseTag, _vr: str | None, _length: int) -> bool:
    return tag.group != 2


def _text(element: RawDataElement | DataElement | None, vr: str) -> str | None:
    """A single plain ASCII value as pydicom's ``str(value).strip()`` reads it; empty is None."""
    if element is None:
        return None
    if not isinstance(element, RawDataElement) or element.VR not in (None, vr) or element.value is None:
        raise _Unusual
    value = bytes(element.value).rstrip(b"\x00 ")
    if not PLAIN.fullmatch(value):
        raise _Unusual
    return value.decode("ascii").strip() or None


def elements_truncation(elements: Iterable[RawDataElement | DataElement], size: int) -> str | None:
    """Why the top-level ``elements``, read from ``size`` bytes, are cut short; None when every declared
    length is there.

    The elements as read, before any value is converted; a value left unread (``defer_size``) is measured
    against ``size`` without being read. Checked in file order (PS3.5 7.1): a defined length longer than
    what was read; an undefined length (encapsulated pixel data) with no room left for its delimiter;
    bytes left after the last element too few to be an element header, where pydicom stops silently. A
    nested element cannot exceed its sequence's defined length without the sequence itself being short,
    so the top level is enough.
    """
    end: int | None = None
    last: BaseTag | None = None  # None: the file meta information
    for raw in elements:
        if not isinstance(raw, RawDataElement) or raw.value_tell is None:
            end = None
            last = raw.tag
            continue
        if raw.value is None and raw.length not in (0, _UNDEFINED):  # deferred (defer_size): still unread
            got = max(0, min(raw.length, size - raw.value_tell))
        else:
            got = len(raw.value) if isinstance(raw.value, bytes) else 0
        if raw.length == _UNDEFINED:
            if isinstance(raw.value, bytes) and raw.value_tell + got + _DELIMITER_BYTES > size:
                return f"{_name(raw.tag)} has an undefined length and the data ends before its delimiter"
            end = None
        elif got < raw.length:
            return f"{_name(raw.tag)} declares {raw.length} bytes and only {got} are present"
        else:
            end = raw.value_tell + raw.length
        last = raw.tag
    if end is not None and 0 < size - end < 12:  # an explicit VR header is 8 or 12 bytes (PS3.5 7.1.2)
        after = "the file meta information" if last is None else _name(last)
        return f"the data ends inside the header of the element after {after}"
    return None


def _name(tag: BaseTag) -> str:
    """An element's keyword for a message (looked up only then: it was a third of this check's time)."""
    return keyword_for_tag(tag) or str(tag)
