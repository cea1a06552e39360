"""The attributes of a received instance, read by one pass over its element headers (PS3.5 7.1, 7.5).

Why not pydicom's element generator, which :func:`service.store.attributes.walk` uses: it builds a
``RawDataElement`` (a named tuple, a ``BaseTag``, a decoded VR) for every element through a file object,
~5 µs each: ~170 µs for the bench's CT instance of 30 elements, a tenth of a C-STORE's answer path on
one association (bench/RESULTS.md, session 22). Here the headers are unpacked from the buffer itself
(``struct.unpack_from``), only the handful of values the store uses are sliced out, and nothing is copied:
the buffer may be the page-aligned one the instance is written from (:mod:`service.store.direct_write`).

The scan answers only for data it reads exactly as pydicom would, and says None otherwise, so the caller
falls back to the generator (and, past that, to ``dcmread``) with its checks and messages unchanged:

- Explicit or Implicit VR Little Endian (the encapsulated syntaxes are explicit little endian too); each
  VR one of pydicom's; no item or delimiter tag at the top level, and no Data Set Trailing Padding
  (FFFC,FFFC) there either: data the scan answered for may be padded to a block boundary by the listener
  (:func:`service.ingest.dimse.trailing_padding`).
- Every declared length inside the data (a dataset cut short is reported by the fallback, which names
  the element), and nothing after the last element.
- Sequences and items of undefined length walked to their delimiters (PS3.5 7.5.2); items of defined
  length walked too and required to end where they say; undefined-length values other than sequences as
  encapsulated fragments (PS3.5 A.4): items of defined length up to a Sequence Delimitation Item, which
  is how pydicom reads them first. A value of undefined length anything else (explicit ``UN``, an
  implicit element whose tag is not a known sequence) is left to the fallback.
- The values we read: single printable ASCII, with the VR their attribute has (Implicit VR: any), as
  :func:`service.store.attributes.walk` requires; an empty one is absent (explicit) or left to the
  fallback (implicit: pydicom gives None there, which the walk does not read).

The result equals the generator walk's wherever it is not None: tests/service/store/test_element_scan.py
checks that on every file of pydicom's test data and on hand-made edge cases.
"""

from __future__ import annotations

import struct
from typing import Any

from pydicom.datadict import _dictionary_vr_fast
from pydicom.valuerep import EXPLICIT_VR_LENGTH_32, VR

from service.store.attributes import (
    IMAGES_IN_ACQUISITION,
    MANUFACTURER,
    NOT_LITTLE_ENDIAN_EXPLICIT,
    PIXEL_TAGS,
    PLAIN,
    TEXTS,
    UIDS,
    Attributes,
    attributes_from,
)

__all__ = ["scan"]

_IMPLICIT_LE = "1.2.840.10008.1.2"
_UNDEFINED = 0xFFFFFFFF
_ITEM, _ITEM_END, _SEQUENCE_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
_META_END_AT = 144  # preamble 128, "DICM", then (0002,0000) UL of 12 bytes
_TRANSFER_SYNTAX = 0x00020010
_TRAILING_PADDING = 0xFFFCFFFC  # Data Set Trailing Padding (PS3.10 7.2)
_EXPLICIT = struct.Struct("<HH2sH")
_IMPLICIT = struct.Struct("<HHL")
_LONG = struct.Struct("<L")
_TAG = struct.Struct("<HH")
_PIXELS = -1  # a key of ``found``: pixel data seen at the top level
_VRS: dict[bytes, str] = {vr.value.encode(): vr.value for vr in VR if len(vr.value) == 2}
_LONG_VRS = frozenset(vr.value for vr in EXPLICIT_VR_LENGTH_32)
_WANTED_VR = {
    **dict.fromkeys(UIDS, "UI"),
    **{tag: vr for tag, (_, vr) in TEXTS.items()},
    MANUFACTURER: "LO",
    IMAGES_IN_ACQUISITION: "IS",
    _TRANSFER_SYNTAX: "UI",
}


class _Off(Exception):
    """Not data the scan reads: the caller falls back to the generator walk."""


def scan(data: Any, size: int, defer_size: int) -> Attributes | None:
    """The attributes of the Part 10 file in ``data[:size]`` (bytes, memoryview or mmap), as
    ``walk(data[:size], defer_size)`` would read them; None when the generator walk must decide (see the
    module docstring)."""
    try:
        return _scan(memoryview(data), size, defer_size)
    except (_Off, struct.error, UnicodeDecodeError, ValueError, KeyError):
        return None


def _scan(data: Any, size: int, defer: int) -> Attributes:
    if size > len(data) or data[128:140] != b"DICM\x02\x00\x00\x00UL\x04\x00":
        raise _Off
    found: dict[int, bytes] = {}
    pos = _elements(data, _META_END_AT, size, False, found, 1 << 62, meta=True)
    if pos != _META_END_AT + _LONG.unpack_from(data, 140)[0]:
        raise _Off
    syntax = _text(found.pop(_TRANSFER_SYNTAX, None))
    if syntax is None or syntax in NOT_LITTLE_ENDIAN_EXPLICIT:
        raise _Off
    implicit = syntax == _IMPLICIT_LE
    found.clear()
    if pos == size or _elements(data, pos, size, implicit, found, defer, top=True) != size:
        raise _Off  # an empty dataset, or one that ends in the middle of a header
    return attributes_from(
        syntax, lambda tag, _vr: _text(found.get(tag)), has_pixels=_PIXELS in found, truncated=None
    )


def _elements(
    data: Any,
    pos: int,
    end: int,
    implicit: bool,
    found: dict[int, bytes],
    defer: int = 0,
    *,
    top: bool = False,
    meta: bool = False,
) -> int:
    """The elements from ``pos`` up to ``end`` (the dataset's, or a defined-length item's), or to an Item
    Delimitation Item (whose position is returned); the file meta information (``meta``) ends at its
    first element of another group. Values we want (``top``, ``meta``) land in ``found``; the presence of
    pixel data as ``found[_PIXELS]``. Returns where the elements end."""
    keep = top or meta
    while pos < end:
        if end - pos < 12 and top:
            raise _Off  # the generator stops there (or fails): its walk names what is cut short
        if implicit:
            group, elem, length = _IMPLICIT.unpack_from(data, pos)
            vr = None
            pos += 8
        else:
            group, elem, raw_vr, length = _EXPLICIT.unpack_from(data, pos)
            if meta and group != 0x0002:
                return pos
            vr = _VRS.get(raw_vr)
            if vr is None:
                if group == 0xFFFE and elem == 0xE00D and not keep:
                    return pos  # an undefined-length item's end (its VR bytes are its length's)
                raise _Off  # pydicom would switch to implicit VR or guess a length
            pos += 8
            if vr in _LONG_VRS:
                length = _LONG.unpack_from(data, pos)[0]
                pos += 4
        if group == 0xFFFE:
            if elem == 0xE00D and implicit and not keep:
                return pos - 8
            raise _Off  # an item or a delimiter where an element belongs
        tag = group << 16 | elem
        if tag == _TRAILING_PADDING and top:
            raise _Off  # already padded: the listener pads only what the scan answered for
        if length == _UNDEFINED:
            if keep and (meta or tag in _WANTED_VR):
                raise _Off
            if keep and tag in PIXEL_TAGS:
                found[_PIXELS] = b""
            sequence = _is_sequence(data, pos, end, tag, vr)
            pos = _sequence(data, pos, end, implicit, fragments=not sequence)
            continue
        if pos + length > end:
            raise _Off  # cut short (or an item's contents overrun it): the fallback reports it
        if keep:
            if tag in _WANTED_VR:
                if vr is not None and vr != _WANTED_VR[tag]:
                    raise _Off
                if length > defer or (length == 0 and (implicit or vr == "IS")):
                    raise _Off  # pydicom leaves the value None (deferred, or empty and not text)
                found[tag] = bytes(data[pos : pos + length])
            elif top and tag in PIXEL_TAGS:
                found[_PIXELS] = b""
        pos += length
    return pos


def _is_sequence(data: Any, pos: int, end: int, tag: int, vr: str | None) -> bool:
    """An undefined-length value read as a sequence, as pydicom decides it (explicit SQ; implicit: the
    tag's dictionary VR, or the look-ahead for an item where the dictionary does not know the tag)."""
    if vr is not None:
        if vr == "UN":
            raise _Off  # read as a sequence of implicit VR items (PS3.5 6.2.2): left to the fallback
        return vr == "SQ"
    try:
        return bool(_dictionary_vr_fast(tag) == "SQ")  # the generator's own lookup
    except KeyError:
        return pos + 4 <= end and _tag(data, pos) == _ITEM


def _sequence(data: Any, pos: int, end: int, implicit: bool, *, fragments: bool = False) -> int:
    """Items up to the Sequence Delimitation Item (PS3.5 7.5.2); where the next element starts.
    ``fragments``: encapsulated pixel data (PS3.5 A.4), whose items are of defined length and hold bytes,
    not elements."""
    while True:
        if pos + 8 > end:
            raise _Off
        tag, length = _tag(data, pos), _LONG.unpack_from(data, pos + 4)[0]
        pos += 8
        if tag == _SEQUENCE_END:
            if length:
                raise _Off
            return pos
        if tag != _ITEM:
            raise _Off
        if not fragments:
            pos = _item(data, pos, end if length == _UNDEFINED else pos + length, implicit, length)
        elif length == _UNDEFINED or pos + length > end:
            raise _Off
        else:
            pos += length


def _item(data: Any, pos: int, end: int, implicit: bool, length: int) -> int:
    """An item's elements (to its delimiter, or exactly to its defined end); where the next item starts."""
    pos = _elements(data, pos, end, implicit, {})
    if length != _UNDEFINED:
        if pos != end:
            raise _Off
        return pos
    if pos + 8 > end or _tag(data, pos) != _ITEM_END or _LONG.unpack_from(data, pos + 4)[0]:
        raise _Off
    return pos + 8


def _tag(data: Any, pos: int) -> int:
    group, elem = _TAG.unpack_from(data, pos)
    return int(group) << 16 | int(elem)


def _text(value: bytes | None) -> str | None:
    """As :func:`service.store.attributes._text` reads a single plain ASCII value; empty is None."""
    if value is None:
        return None
    value = value.rstrip(b"\x00 ")
    if not PLAIN.fullmatch(value):
        raise _Off
    return value.decode("ascii").strip() or None
