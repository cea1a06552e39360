"""The generic format: a folder of DICOM files plus ``labels.csv``, what the synthetic generators write.

``labels.csv`` has these columns:

``file``
    Path of the DICOM file relative to the folder (forward slashes), one row per file.
label columns
    One integer column, 0 or 1, per label. Unless ``label_names`` is given, every column is a label except
    ``file``, ``boxes``, the informational columns in :data:`INFO_COLUMNS` and any column whose name starts
    with ``info_``. A non-integer value in a label column is an error (it catches a mistyped column name).
``boxes`` (optional)
    A JSON list of ``{"x0", "y0", "x1", "y1", "label"}`` objects in source pixels (x: column, y: row), or
    empty.
informational columns
    Copied into :attr:`Record.extra` (``patient_id``, ``modality``, ``info_*`` ...). Identifiers are always
    read from the DICOM header, never from these columns.

Every DICOM file in the folder (``*.dcm``, ``*.dicom``, or an extension-less file with the ``DICM`` preamble)
must have a row, and every row must name a readable DICOM file. For multi-slice series, ``slice_index`` is the
position along the slice normal (ImageOrientationPatient × ImagePositionPatient, ascending), falling back to
InstanceNumber; single-image series get ``None``.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from pathlib import Path

from training.data.formats.common import (
    DicomHeader,
    is_dicom_candidate,
    label_value,
    open_csv,
    read_header,
    slice_indices,
)
from training.data.records import BoxLabel, LabelError, Record

__all__ = ["INFO_COLUMNS", "load_generic"]

logger = logging.getLogger(__name__)

INFO_COLUMNS = frozenset({"patient_id", "study_uid", "series_uid", "sop_uid", "modality", "notes"})
"""Generic-format columns that are information, not labels (as are ``file``, ``boxes`` and ``info_*``)."""


def _parse_boxes(text: str, where: str) -> tuple[BoxLabel, ...]:
    if not text.strip():
        return ()
    try:
        items = json.loads(text)
    except json.JSONDecodeError as exc:
        raise LabelError(f"{where}: boxes are not valid JSON: {exc}") from exc
    if not isinstance(items, list):
        raise LabelError(f"{where}: boxes must be a JSON list of objects")
    boxes = []
    for item in items:
        try:
            coords = [float(item[k]) for k in ("x0", "y0", "x1", "y1")]
            label = item["label"]
        except (TypeError, KeyError, ValueError) as exc:
            raise LabelError(f"{where}: box {item!r} needs numeric x0, y0, x1, y1 and a label") from exc
        if not isinstance(label, str) or not label or not all(math.isfinite(c) for c in coords):
            raise LabelError(f"{where}: box {item!r} needs finite coordinates and a non-empty label")
        if coords[2] <= coords[0] or coords[3] <= coords[1]:
            raise LabelError(f"{where}: box {item!r} has x1 <= x0 or y1 <= y0")
        x0, y0, x1, y1 = coords
        boxes.append(BoxLabel(x0, y0, x1, y1, label))
    return tuple(boxes)


def load_generic(
    folder: Path,
    labels_csv: Path | None = None,
    label_names: Sequence[str] | None = None,
    allow_unlabelled: bool = False,
) -> list[Record]:
    """Read a folder of DICOM files and its ``labels.csv`` (format in the module docstring).

    Parameters
    ----------
    folder
        Root the ``file`` column is relative to.
    labels_csv
        Defaults to ``folder / "labels.csv"``.
    label_names
        The label columns to read; the others are kept as ``extra``. Default: every non-informational column.
    allow_unlabelled
        Skip DICOM files under ``folder`` that have no row instead of failing (useful for a labelled subset).

    Raises
    ------
    LabelError
        Naming the row or file: missing or unreadable file, DICOM without a row, duplicate row, a label
        that is not 0/1, malformed boxes, a header without ``file`` or without labels.
    """
    folder = Path(folder)
    labels_csv = Path(labels_csv) if labels_csv is not None else folder / "labels.csv"
    name = labels_csv.name
    header, body = open_csv(labels_csv)
    if "file" not in header:
        raise LabelError(f"{name}: no 'file' column in header {header}")
    if len(set(header)) != len(header):
        raise LabelError(f"{name}: duplicate column names in header {header}")
    if label_names is not None:
        missing = [n for n in label_names if n not in header]
        if missing:
            raise LabelError(f"{name}: label columns {missing} not in header {header}")
        labels = list(label_names)
    else:
        labels = [
            c
            for c in header
            if c not in ("file", "boxes") and c not in INFO_COLUMNS and not c.startswith("info_")
        ]
    if not labels:
        raise LabelError(f"{name}: no label columns in header {header}")
    extras = [c for c in header if c not in ("file", "boxes") and c not in labels]

    rows: list[tuple[Path, dict[str, int], tuple[BoxLabel, ...], dict[str, str]]] = []
    headers: list[DicomHeader] = []
    seen: dict[Path, int] = {}
    for number, fields in body:
        where = f"{name} row {number}"
        if len(fields) != len(header):
            raise LabelError(f"{where}: {len(fields)} fields, the header has {len(header)}")
        row = dict(zip(header, fields, strict=True))
        relative = row["file"].strip()
        if not relative:
            raise LabelError(f"{where}: empty 'file'")
        path = folder / relative
        key = path.resolve()
        if key in seen:
            raise LabelError(f"{where}: file '{relative}' already listed in row {seen[key]}")
        seen[key] = number
        if not path.is_file():
            raise LabelError(f"{where}: file '{relative}' not found")
        values = {label: label_value(row[label], where, label) for label in labels}
        boxes = _parse_boxes(row.get("boxes", ""), where)
        extra = {c: row[c].strip() for c in extras if row[c].strip()}
        headers.append(read_header(path, where))
        rows.append((path, values, boxes, extra))

    if not allow_unlabelled:
        listed = set(seen)
        unlisted = sorted(
            p.relative_to(folder).as_posix()
            for p in folder.rglob("*")
            if p.is_file() and p.resolve() not in listed and p != labels_csv and is_dicom_candidate(p)
        )
        if unlisted:
            more = f" and {len(unlisted) - 5} more" if len(unlisted) > 5 else ""
            raise LabelError(f"{name}: no label row for DICOM file(s) {unlisted[:5]}{more}")

    slices = slice_indices(headers)
    records = [
        Record(
            path=path,
            patient_id=h.patient_id,
            study_uid=h.study_uid,
            series_uid=h.series_uid,
            sop_uid=h.sop_uid,
            labels=values,
            boxes=boxes,
            slice_index=index,
            extra=extra,
        )
        for (path, values, boxes, extra), h, index in zip(rows, headers, slices, strict=True)
    ]
    logger.info("loaded %d records (%d labels) from %s", len(records), len(labels), name)
    return records
