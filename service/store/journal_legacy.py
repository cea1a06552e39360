"""Reading the segment journal an earlier version left under ``<data_dir>/journal``, once, at start.

Why: until session 20 the listener answered a C-STORE once the instance was appended to a segment of a data
journal and wrote its file in the background (:mod:`service.store.slots` replaced it). A service stopped
or killed with records not yet placed, then upgraded, would lose acknowledged instances if the new
version ignored the directory; so the start reads its complete records (:func:`legacy_records`), the
replay places and indexes those without a row (:mod:`service.store.slot_place`), and the directory is
removed.

A record is a header, ``struct`` ``<4sQIIII``: magic ``PTJ1``, the segment's id, metadata length, data
length, CRC-32 of metadata and data, CRC-32 of the header's other fields; then the metadata (JSON: study,
series and SOP Instance UID) and the instance's Part 10 bytes. A segment ends at the first record that is
not whole: zeros (never written), a record of the segment's earlier life (another id: a reused segment),
or a torn write (never acknowledged). Spares (``spare-*.seg``) are never read.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

__all__ = ["LegacyRecord", "legacy_records", "remove_legacy"]

_MAGIC = b"PTJ1"
_HEADER = struct.Struct("<4sQIIII")
_CHECKED = struct.Struct("<4sQIII")


@dataclass(frozen=True)
class LegacyRecord:
    study_uid: str
    series_uid: str
    sop_instance_uid: str
    data: bytes


def legacy_records(directory: Path) -> tuple[list[LegacyRecord], int]:
    """Complete records of every ``journal-<id>.seg`` under ``directory``, in id order, and how many
    segments ended in a torn record."""
    segments = []
    for path in directory.glob("journal-*.seg"):
        with contextlib.suppress(ValueError):
            segments.append((int(path.stem.removeprefix("journal-")), path))
    records: list[LegacyRecord] = []
    torn = 0
    for sid, path in sorted(segments):
        found, tore = _read_segment(path.read_bytes(), sid)
        records += found
        torn += tore
    return records, torn


def remove_legacy(directory: Path) -> None:
    """The old journal, once its records are placed and indexed."""
    shutil.rmtree(directory, ignore_errors=True)


def _read_segment(blob: bytes, segment_id: int) -> tuple[list[LegacyRecord], bool]:
    records: list[LegacyRecord] = []
    off = 0
    while off + _HEADER.size <= len(blob):
        magic, sid, meta_len, data_len, crc, head_crc = _HEADER.unpack_from(blob, off)
        if magic == b"\0\0\0\0" and sid == 0:
            return records, False
        head_ok = zlib.crc32(blob[off : off + _CHECKED.size]) == head_crc
        if magic == _MAGIC and sid != segment_id and head_ok:
            return records, False
        end = off + _HEADER.size + meta_len + data_len
        if magic != _MAGIC or not head_ok or end > len(blob):
            return records, True
        meta = blob[off + _HEADER.size : off + _HEADER.size + meta_len]
        data = blob[off + _HEADER.size + meta_len : end]
        if zlib.crc32(data, zlib.crc32(meta)) != crc:
            return records, True
        try:
            m = json.loads(meta)
            records.append(LegacyRecord(str(m["study"]), str(m["series"]), str(m["sop"]), data))
        except (ValueError, KeyError, TypeError):
            return records, True
        off = end
    return records, False
