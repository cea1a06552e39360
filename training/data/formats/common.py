"""What every loader shares: CSV rows with the line numbers errors name, and the identifiers and slice
position read from a DICOM header (never from a labels file, which may be wrong).

Every function here raises :class:`~training.data.records.LabelError` naming the file and, for CSV, the
row (1-based line number in the file, the header being row 1).
"""

from __future__ import annotations

import csv
import io
import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom

from training.data.records import LabelError

__all__ = [
    "DicomHeader",
    "columns",
    "is_dicom_candidate",
    "label_value",
    "open_csv",
    "read_header",
    "slice_indices",
]

HEADER_TAGS = [
    "PatientID",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "SOPInstanceUID",
    "InstanceNumber",
    "ImagePositionPatient",
    "ImageOrientationPatient",
]


@dataclass(frozen=True)
class DicomHeader:
    patient_id: str
    study_uid: str
    series_uid: str
    sop_uid: str
    position: float | None
    instance: int | None


def read_header(path: Path, where: str) -> DicomHeader:
    """The identifiers and slice position of one DICOM file, without its pixels."""
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=HEADER_TAGS)
    except FileNotFoundError as exc:
        raise LabelError(f"{where}: file '{path}' not found") from exc
    except Exception as exc:  # pydicom raises many types for a damaged file; all mean "unreadable" here
        raise LabelError(f"{where}: file '{path}' is not a readable DICOM file: {exc}") from exc
    values = {}
    for keyword in ("PatientID", "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"):
        value = str(ds.get(keyword, "") or "").strip()
        if not value:
            raise LabelError(f"{where}: file '{path}' has no {keyword}")
        values[keyword] = value
    position = None
    try:
        ipp, iop = ds.get("ImagePositionPatient"), ds.get("ImageOrientationPatient")
        if ipp is not None and iop is not None and len(ipp) == 3 and len(iop) == 6:
            normal = np.cross(np.asarray(iop[:3], float), np.asarray(iop[3:], float))
            position = float(np.dot(normal, np.asarray(ipp, float)))
        instance = int(ds.InstanceNumber) if ds.get("InstanceNumber") not in (None, "") else None
    except (TypeError, ValueError) as exc:
        raise LabelError(
            f"{where}: file '{path}' has a malformed position or instance number: {exc}"
        ) from exc
    return DicomHeader(
        values["PatientID"],
        values["StudyInstanceUID"],
        values["SeriesInstanceUID"],
        values["SOPInstanceUID"],
        position if position is not None and math.isfinite(position) else None,
        instance,
    )


def slice_indices(headers: Sequence[DicomHeader]) -> list[int | None]:
    """Position of each instance within its series along the slice normal; None for single-image series."""
    by_series: dict[str, list[int]] = defaultdict(list)
    for i, header in enumerate(headers):
        by_series[header.series_uid].append(i)
    out: list[int | None] = [None] * len(headers)
    for members in by_series.values():
        if len(members) < 2:
            continue
        if all(headers[i].position is not None for i in members):
            order = sorted(members, key=lambda i: (headers[i].position, headers[i].instance or 0))
        else:
            order = sorted(members, key=lambda i: (headers[i].instance is None, headers[i].instance or 0, i))
        for rank, i in enumerate(order):
            out[i] = rank
    return out


def open_csv(path: Path) -> tuple[list[str], list[tuple[int, list[str]]]]:
    """Header and (row number, fields) of a CSV file; row numbers are 1-based lines, the header is row 1."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError as exc:
        raise LabelError(f"labels file '{path}' not found") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise LabelError(f"labels file '{path}' cannot be read: {exc}") from exc
    try:
        rows = list(csv.reader(io.StringIO(text)))
    except csv.Error as exc:
        raise LabelError(f"{path.name}: malformed CSV: {exc}") from exc
    if not rows:
        raise LabelError(f"{path.name}: empty file, expected a header row")
    header = [name.strip() for name in rows[0]]
    body = [(n, fields) for n, fields in enumerate(rows[1:], start=2) if any(f.strip() for f in fields)]
    return header, body


def label_value(value: str, where: str, column: str) -> int:
    text = value.strip()
    if text not in ("0", "1"):
        raise LabelError(f"{where}: label '{column}' must be 0 or 1, got {value!r}")
    return int(text)


def columns(header: Sequence[str], required: Iterable[str], name: str) -> dict[str, int]:
    index = {column: i for i, column in enumerate(header) if column}
    missing = [c for c in required if c not in index]
    if missing:
        raise LabelError(f"{name}: columns {missing} missing from header {list(header)}")
    return index


def is_dicom_candidate(path: Path) -> bool:
    suffix = path.suffix.lower()
    if suffix in (".dcm", ".dicom"):
        return True
    if suffix:
        return False
    try:
        with path.open("rb") as fh:
            head = fh.read(132)
    except OSError:
        return False
    return head[128:132] == b"DICM"
