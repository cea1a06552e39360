"""The data journal's record format (:mod:`service.store.journal`): writing a record's parts, reading a
segment back.

A record is a header, ``struct`` ``<4sQIIII``: magic ``PTJ1``, the segment's id, metadata length, data
length, CRC-32 of metadata and data, CRC-32 of the header's other fields (the body's checksum is computed
before the writers' lock is taken); then the metadata (JSON: study, series and SOP Instance UID, from which
:func:`service.store.files.instance_relpath` builds the target path) and the instance's Part 10 bytes.

Reading a segment stops at the first record that is not whole: zeros (never written, or the end marker
written after each record), a record of the segment's earlier life (another id: a reused segment), or
anything else, which is a torn write (bad magic, a length past the end, a checksum mismatch): its sender
got no success.
"""

from __future__ import annotations

import json
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

from zlib_ng import zlib_ng

from service.store.files import instance_relpath

__all__ = ["HEADER", "Record", "body_crc", "encode_header", "encode_meta", "read_segment"]

MAGIC = b"PTJ1"
HEADER = struct.Struct("<4sQIIII")
_CHECKED = struct.Struct("<4sQIII")  # the header fields its own checksum covers


@dataclass(frozen=True)
class Record:
    """A complete record read back from a segment (start-up replay)."""

    study_uid: str
    series_uid: str
    sop_instance_uid: str
    data: bytes
    segment_id: int = 0
    """The segment it was read from (a record the replay cannot place yet keeps its segment alive)."""
    size: int = 0
    """Its bytes in the segment (header, metadata, data): what :class:`service.store.journal.Entry` counts."""

    @property
    def relpath(self) -> Path:
        return instance_relpath(self.study_uid, self.series_uid, self.sop_instance_uid)


def encode_meta(study: str, series: str, sop: str) -> bytes:
    return json.dumps({"study": study, "series": series, "sop": sop}, separators=(",", ":")).encode()


def body_crc(meta: bytes, data: bytes) -> int:
    """CRC-32 of a record's metadata and data, the same CRC as zlib's (ISO 3309), by zlib-ng's SIMD code:
    it is on every C-STORE answer's path, where zlib's took ~122 µs per 513 KiB CT instance and zlib-ng's
    ~9 µs (bench/RESULTS.md, session 19)."""
    return zlib_ng.crc32(data, zlib_ng.crc32(meta))


def encode_header(segment_id: int, meta: bytes, data: bytes, crc: int) -> bytes:
    checked = _CHECKED.pack(MAGIC, segment_id, len(meta), len(data), crc)
    return checked + struct.pack("<I", zlib.crc32(checked))


def first_record_id(path: Path) -> int:
    """The segment id in the first record header of ``path``, 0 when it starts with none.

    A spare renamed from a retired segment still holds that segment's records: a new segment numbered with
    the same id would read them as its own (:meth:`service.store.journal.Journal.open` numbers above it).
    """
    with path.open("rb") as f:
        head = f.read(HEADER.size)
    if len(head) < HEADER.size:
        return 0
    magic, sid, _, _, _, head_crc = HEADER.unpack(head)
    return int(sid) if magic == MAGIC and zlib.crc32(head[: _CHECKED.size]) == head_crc else 0


def read_segment(path: Path, segment_id: int) -> tuple[list[Record], bool]:
    """The complete records of a segment, in order, and whether reading stopped at a torn record (bytes
    that are neither a whole record nor never-written zeros)."""
    records: list[Record] = []
    blob = path.read_bytes()
    off = 0
    while off + HEADER.size <= len(blob):
        magic, sid, meta_len, data_len, crc, head_crc = HEADER.unpack_from(blob, off)
        if magic == b"\0\0\0\0" and sid == 0:
            return records, False  # never written: the end
        if magic == MAGIC and sid != segment_id and zlib.crc32(blob[off : off + _CHECKED.size]) == head_crc:
            return records, False  # what the segment held in an earlier life: the end
        end = off + HEADER.size + meta_len + data_len
        if magic != MAGIC or zlib.crc32(blob[off : off + _CHECKED.size]) != head_crc or end > len(blob):
            return records, True
        meta = blob[off + HEADER.size : off + HEADER.size + meta_len]
        data = blob[off + HEADER.size + meta_len : end]
        if body_crc(meta, data) != crc:
            return records, True
        try:
            m = json.loads(meta)
            records.append(
                Record(str(m["study"]), str(m["series"]), str(m["sop"]), data, segment_id, end - off)
            )
        except (ValueError, KeyError, TypeError):
            return records, True
        off = end
    return records, False
