"""Which incoming instances reuse a SOP Instance UID for something else: STOW-RS refuses those one by one.

One SOP Instance UID names one instance (PS3.3 C.12.1.1.1). :meth:`service.store.instances.Instances.ingest`
takes an instance whose UID is already stored *in the same study* as a retry and acknowledges it without
writing it again, which is what a C-STORE retry needs (PS3.4 B.2.3). A DICOMweb sender is told more: before
ingesting, STOW-RS (:mod:`service.api.dicomweb_stow`) asks :func:`find_conflicts` which parts

- carry a UID stored in another study, or sent twice in this request for two studies, or
- carry a UID stored (or sent earlier in this request) with *other content*,

and refuses each with FailureReason 0xA900 (:class:`~service.errors.SopInstanceConflictError`), storing
none of them and keeping what is stored. The same bytes again are a retry and succeed.

"Same content" is the data set after the File Meta Information (PS3.10 7.1): the meta group names the
sender's implementation and may differ between two sends of one object. Data sets whose bytes differ are
compared once more parsed (element by element), so an equal data set written with other lengths or item
encodings still counts as the same, and so does one the listener stored with a Data Set Trailing Padding
element (PS3.10 7.2: of no significance); a different transfer syntax is different content.
"""

from __future__ import annotations

import asyncio
import struct
from collections import Counter
from collections.abc import Sequence
from dataclasses import replace
from io import BytesIO
from pathlib import Path

from pydicom import dcmread
from sqlalchemy import select
from sqlalchemy.orm import Session

from service.errors import SopInstanceConflictError
from service.store.database import Database
from service.store.db import InstanceRow
from service.store.files import Staged
from service.store.validate import ParsedInstance

__all__ = ["dataset_bytes", "find_conflicts", "same_content"]

_TRAILING_PADDING = 0xFFFCFFFC
"""Data Set Trailing Padding (PS3.10 7.2): not content (the listener adds it, :mod:`service.ingest.dimse`)."""
_META_LENGTH = b"\x02\x00\x00\x00UL\x04\x00"
"""(0002,0000) File Meta Information Group Length, explicit VR little endian, as PS3.10 7.1 writes it."""


def dataset_bytes(data: bytes) -> bytes | None:
    """The bytes after the File Meta Information of a Part 10 file; None when the meta group has no
    group length to skip by (the caller then compares parsed data sets)."""
    start = 132
    if data[128:132] != b"DICM" or data[start : start + 8] != _META_LENGTH:
        return None
    (length,) = struct.unpack_from("<I", data, start + 8)
    return data[start + 12 + length :]


def same_content(a: bytes, b: bytes) -> bool:
    """Two Part 10 files hold the same data set (see the module docstring)."""
    body_a, body_b = dataset_bytes(a), dataset_bytes(b)
    if body_a is not None and body_a == body_b:
        return True
    try:
        ds_a, ds_b = dcmread(BytesIO(a), force=True), dcmread(BytesIO(b), force=True)
        for ds in (ds_a, ds_b):  # of no significance (PS3.10 7.2): the listener pads what it writes
            if _TRAILING_PADDING in ds:
                del ds[_TRAILING_PADDING]
        tsyntax = "TransferSyntaxUID"
        return bool(ds_a.file_meta.get(tsyntax) == ds_b.file_meta.get(tsyntax) and ds_a == ds_b)
    except Exception:  # either unreadable as a whole: not provably the same
        return False


def _stored(s: Session, sops: list[str]) -> dict[str, tuple[str, str]]:
    rows = s.execute(
        select(InstanceRow.sop_instance_uid, InstanceRow.study_uid, InstanceRow.path).where(
            InstanceRow.sop_instance_uid.in_(sops)
        )
    ).all()
    return {sop: (study, path) for sop, study, path in rows}


def _conflict(p: ParsedInstance, detail: str, study: str) -> SopInstanceConflictError:
    return SopInstanceConflictError(
        f"SOP Instance UID {p.sop_instance_uid} {detail}; one UID is one instance (PS3.3 C.12.1.1.1):"
        " give this one its own UID",
        part="SOPInstanceUID",
        extra={"sop_instance_uid": p.sop_instance_uid, "conflicting_study": study},
    )


def _judge(
    incoming: Sequence[ParsedInstance],
    stored: dict[str, tuple[str, str]],
    instances_dir: Path,
    staged: Sequence[Staged] | None,
) -> dict[int, SopInstanceConflictError]:
    """Conflicts by position in ``incoming`` (blocking: reads stored files of repeated UIDs, and the staged
    files of a spooled request's repeated UIDs).

    Each part is judged against what its UID names: the stored instance, else the first part of the
    request that carries it (a part refused never becomes the reference).
    """
    found: dict[int, SopInstanceConflictError] = {}
    reference: dict[str, tuple[str, bytes | None]] = {}  # SOP UID -> (study, Part 10 bytes if readable)
    counts = Counter(p.sop_instance_uid for p in incoming)
    for i, p in enumerate(incoming):
        sop = p.sop_instance_uid
        if staged is not None and (sop in stored or counts[sop] > 1):  # a spooled part: its bytes are on disk
            p = replace(p, data=staged[i].tmp.read_bytes())
        if sop not in reference and sop in stored:
            study, rel = stored[sop]
            held: bytes | None = None
            if study == p.study_uid:
                try:
                    held = (instances_dir / rel).read_bytes()
                except OSError:  # its file cannot be read: nothing to compare, taken as a retry as before
                    held = None
            reference[sop] = (study, held)
        if sop not in reference:
            reference[sop] = (p.study_uid, bytes(p.data))  # bytes already: the HTTP path
            continue
        study, data = reference[sop]
        if study != p.study_uid:
            where = "already names an instance of study" if sop in stored else "is sent twice, for study"
            found[i] = _conflict(p, f"{where} {study}", study)
        elif data is not None and not same_content(data, bytes(p.data)):
            where = "is already stored" if sop in stored else "is sent twice in this request"
            found[i] = _conflict(p, f"{where} with different content", study)
    return found


async def find_conflicts(
    db: Database,
    instances_dir: Path,
    incoming: Sequence[ParsedInstance],
    staged: Sequence[Staged] | None = None,
) -> dict[int, SopInstanceConflictError]:
    """The parts of ``incoming`` (by position) that must be refused as SOP Instance UID conflicts.

    A part whose UID is stored (or was sent earlier in the request) with the same content is not a
    conflict: the ingest acknowledges it without writing it again. ``staged``: a spooled request
    (:mod:`service.api.upload`), whose instances' bytes are in these files, not in ``incoming``.
    """
    if not incoming:
        return {}
    stored = await db.read(_stored, list({p.sop_instance_uid for p in incoming}))
    repeated = len({p.sop_instance_uid for p in incoming}) < len(incoming)
    if not stored and not repeated:
        return {}  # the common case: all new, nothing to read
    return await asyncio.to_thread(_judge, incoming, stored, instances_dir, staged)
