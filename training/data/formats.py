"""Loaders for labelled image sets: generic "DICOM folder + labels.csv", RSNA Pneumonia, NIH ChestX-ray14.

Why several loaders and one output: training consumes :class:`~training.data.records.Record` only, so a
model trained on synthetic data (which is written in the generic format) can be retrained on a public data
set by swapping the loader. Every loader checks what it reads and raises
:class:`~training.data.records.LabelError` naming the CSV row (1-based line number in the file, the header
being row 1) or the image file, so a broken row is found in seconds, not through a stack trace in the middle
of an epoch.

Generic format
--------------
A folder of DICOM files plus ``labels.csv`` with these columns:

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

import csv
import io
import json
import logging
import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from PIL import Image, UnidentifiedImageError
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, UID, ExplicitVRLittleEndian, generate_uid

from training.data.records import BoxLabel, LabelError, Record

__all__ = [
    "INFO_COLUMNS",
    "NIH_FINDINGS",
    "load_generic",
    "load_nih_chestxray14",
    "load_rsna_pneumonia",
    "png_to_dataset",
    "read_image_dataset",
]

logger = logging.getLogger(__name__)

INFO_COLUMNS = frozenset({"patient_id", "study_uid", "series_uid", "sop_uid", "modality", "notes"})
"""Generic-format columns that are information, not labels (as are ``file``, ``boxes`` and ``info_*``)."""

NIH_FINDINGS = (
    "Atelectasis",
    "Cardiomegaly",
    "Effusion",
    "Infiltration",
    "Mass",
    "Nodule",
    "Pneumonia",
    "Pneumothorax",
    "Consolidation",
    "Edema",
    "Emphysema",
    "Fibrosis",
    "Pleural_Thickening",
    "Hernia",
)
"""The 14 ChestX-ray14 findings (Wang et al. 2017); labels use these names in lower case."""

_NIH_BBOX_ALIASES = {"infiltrate": "infiltration"}  # BBox_List_2017.csv spells it differently
_SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
_HEADER_TAGS = [
    "PatientID",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "SOPInstanceUID",
    "InstanceNumber",
    "ImagePositionPatient",
    "ImageOrientationPatient",
]


@dataclass(frozen=True)
class _Header:
    patient_id: str
    study_uid: str
    series_uid: str
    sop_uid: str
    position: float | None
    instance: int | None


def _read_header(path: Path, where: str) -> _Header:
    """The identifiers and slice position of one DICOM file, without its pixels."""
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=_HEADER_TAGS)
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
    return _Header(
        values["PatientID"],
        values["StudyInstanceUID"],
        values["SeriesInstanceUID"],
        values["SOPInstanceUID"],
        position if position is not None and math.isfinite(position) else None,
        instance,
    )


def _slice_indices(headers: Sequence[_Header]) -> list[int | None]:
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


def _open_csv(path: Path) -> tuple[list[str], list[tuple[int, list[str]]]]:
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


def _label_value(value: str, where: str, column: str) -> int:
    text = value.strip()
    if text not in ("0", "1"):
        raise LabelError(f"{where}: label '{column}' must be 0 or 1, got {value!r}")
    return int(text)


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


def _is_dicom_candidate(path: Path) -> bool:
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
    header, body = _open_csv(labels_csv)
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
    headers: list[_Header] = []
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
        values = {label: _label_value(row[label], where, label) for label in labels}
        boxes = _parse_boxes(row.get("boxes", ""), where)
        extra = {c: row[c].strip() for c in extras if row[c].strip()}
        headers.append(_read_header(path, where))
        rows.append((path, values, boxes, extra))

    if not allow_unlabelled:
        listed = set(seen)
        unlisted = sorted(
            p.relative_to(folder).as_posix()
            for p in folder.rglob("*")
            if p.is_file() and p.resolve() not in listed and p != labels_csv and _is_dicom_candidate(p)
        )
        if unlisted:
            more = f" and {len(unlisted) - 5} more" if len(unlisted) > 5 else ""
            raise LabelError(f"{name}: no label row for DICOM file(s) {unlisted[:5]}{more}")

    slices = _slice_indices(headers)
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


def _columns(header: Sequence[str], required: Iterable[str], name: str) -> dict[str, int]:
    index = {column: i for i, column in enumerate(header) if column}
    missing = [c for c in required if c not in index]
    if missing:
        raise LabelError(f"{name}: columns {missing} missing from header {list(header)}")
    return index


def load_rsna_pneumonia(labels_csv: Path, dicom_dir: Path) -> list[Record]:
    """RSNA Pneumonia Detection Challenge (2018): ``patientId,x,y,width,height,Target`` + ``<patientId>.dcm``.

    One row per box; a patient with ``Target`` 0 has one row with empty coordinates. The label is
    ``pneumonia``; boxes are ``(x, y, x + width, y + height)`` with label ``pneumonia``.
    """
    labels_csv, dicom_dir = Path(labels_csv), Path(dicom_dir)
    name = labels_csv.name
    header, body = _open_csv(labels_csv)
    col = _columns(header, ("patientId", "x", "y", "width", "height", "Target"), name)
    patients: dict[str, dict[str, object]] = {}
    for number, fields in body:
        where = f"{name} row {number}"
        if len(fields) < len(header):
            raise LabelError(f"{where}: {len(fields)} fields, the header has {len(header)}")
        pid = fields[col["patientId"]].strip()
        if not pid:
            raise LabelError(f"{where}: empty patientId")
        target = _label_value(fields[col["Target"]], where, "Target")
        coords_text = [fields[col[k]].strip() for k in ("x", "y", "width", "height")]
        entry = patients.setdefault(pid, {"row": number, "target": target, "boxes": []})
        if entry["target"] != target:
            raise LabelError(f"{where}: Target {target} for {pid} contradicts row {entry['row']}")
        if target == 0:
            if any(coords_text):
                raise LabelError(f"{where}: Target 0 with a box")
            continue
        try:
            x, y, w, h = (float(v) for v in coords_text)
        except ValueError as exc:
            raise LabelError(
                f"{where}: Target 1 needs numeric x, y, width, height, got {coords_text}"
            ) from exc
        if not (w > 0 and h > 0):
            raise LabelError(f"{where}: box width and height must be positive, got {coords_text}")
        boxes = entry["boxes"]
        assert isinstance(boxes, list)
        boxes.append(BoxLabel(x, y, x + w, y + h, "pneumonia"))
    records = []
    for pid, entry in patients.items():
        path = dicom_dir / f"{pid}.dcm"
        where = f"{name} row {entry['row']}"
        if not path.is_file():
            raise LabelError(f"{where}: file '{path.name}' not found in {dicom_dir}")
        ids = _read_header(path, where)
        patient_target, patient_boxes = entry["target"], entry["boxes"]
        assert isinstance(patient_target, int) and isinstance(patient_boxes, list)
        records.append(
            Record(
                path,
                ids.patient_id,
                ids.study_uid,
                ids.series_uid,
                ids.sop_uid,
                {"pneumonia": patient_target},
                tuple(patient_boxes),
            )
        )
    logger.info("loaded %d RSNA records", len(records))
    return records


def _nih_uid(image: str, part: str) -> str:
    return str(generate_uid(entropy_srcs=["nih-chestxray14", image, part]))


def load_nih_chestxray14(entries_csv: Path, image_dir: Path, bbox_csv: Path | None = None) -> list[Record]:
    """NIH ChestX-ray14: ``Data_Entry_2017.csv`` + PNG images (+ optional ``BBox_List_2017.csv``).

    Labels are the 14 findings of :data:`NIH_FINDINGS` in lower case, from ``Finding Labels``
    (``|``-separated, or ``No Finding``). The PNG files may sit directly in ``image_dir`` or in its subfolders
    (the published ``images_001/images/`` layout). The images carry no UIDs, so study, series and SOP instance
    UIDs are derived from ``Image Index`` (one study per image; ``Follow-up #`` goes to ``extra``). Box rows
    for images that are not in the entries file are skipped with a warning, so a subset can be loaded.
    """
    entries_csv, image_dir = Path(entries_csv), Path(image_dir)
    name = entries_csv.name
    header, body = _open_csv(entries_csv)
    col = _columns(header, ("Image Index", "Finding Labels", "Patient ID"), name)
    needed = max(col["Image Index"], col["Finding Labels"], col["Patient ID"]) + 1
    known = {f.lower(): f for f in NIH_FINDINGS}
    index: dict[str, Path] | None = None
    parsed: dict[str, tuple[Path, str, dict[str, int], dict[str, str]]] = {}
    for number, fields in body:
        where = f"{name} row {number}"
        if len(fields) < needed:
            raise LabelError(f"{where}: {len(fields)} fields, too few for header {header}")
        image = fields[col["Image Index"]].strip()
        patient = fields[col["Patient ID"]].strip()
        if not image or not patient:
            raise LabelError(f"{where}: empty Image Index or Patient ID")
        findings = [f.strip() for f in fields[col["Finding Labels"]].split("|") if f.strip()]
        labels = dict.fromkeys((f.lower() for f in NIH_FINDINGS), 0)
        if findings != ["No Finding"]:
            for finding in findings:
                if finding.lower() not in known:
                    raise LabelError(f"{where}: unknown finding {finding!r} in {image}")
                labels[finding.lower()] = 1
        path = image_dir / image
        if not path.is_file():
            if index is None:
                index = {p.name: p for p in image_dir.rglob("*.png")}
            if image not in index:
                raise LabelError(f"{where}: image '{image}' not found under {image_dir}")
            path = index[image]
        extra = {
            key: fields[col[column]].strip()
            for key, column in (
                ("follow_up", "Follow-up #"),
                ("age", "Patient Age"),
                ("sex", "Patient Gender"),
                ("view", "View Position"),
            )
            if column in col and col[column] < len(fields) and fields[col[column]].strip()
        }
        if image in parsed:
            raise LabelError(f"{where}: image '{image}' listed twice")
        parsed[image] = (path, patient, labels, extra)
    boxes = _nih_boxes(Path(bbox_csv), parsed.keys()) if bbox_csv is not None else {}
    records = [
        Record(
            path=path,
            patient_id=patient,
            study_uid=_nih_uid(image, "study"),
            series_uid=_nih_uid(image, "series"),
            sop_uid=_nih_uid(image, "sop"),
            labels=labels,
            boxes=tuple(boxes.get(image, ())),
            extra=extra,
        )
        for image, (path, patient, labels, extra) in parsed.items()
    ]
    logger.info("loaded %d NIH ChestX-ray14 records", len(records))
    return records


def _nih_boxes(bbox_csv: Path, images: Iterable[str]) -> dict[str, list[BoxLabel]]:
    """``Image Index,Finding Label,Bbox [x,y,w,h]``: the bracket's commas split it into four columns."""
    name = bbox_csv.name
    header, body = _open_csv(bbox_csv)
    col = _columns(header, ("Image Index", "Finding Label"), name)
    starts = [i for i, column in enumerate(header) if column.lower().startswith("bbox")]
    if not starts:
        raise LabelError(f"{name}: no 'Bbox [x,y,w,h]' column in header {header}")
    first = starts[0]
    wanted = set(images)
    out: dict[str, list[BoxLabel]] = defaultdict(list)
    skipped = 0
    for number, fields in body:
        where = f"{name} row {number}"
        if len(fields) < max(first + 4, col["Image Index"] + 1, col["Finding Label"] + 1):
            raise LabelError(f"{where}: {len(fields)} fields, too few for header {header}")
        image = fields[col["Image Index"]].strip()
        label = fields[col["Finding Label"]].strip().lower()
        label = _NIH_BBOX_ALIASES.get(label, label)
        try:
            x, y, w, h = (float(v) for v in fields[first : first + 4])
        except ValueError as exc:
            raise LabelError(
                f"{where}: Bbox needs four numbers x, y, w, h, got {fields[first : first + 4]}"
            ) from exc
        if image not in wanted:
            skipped += 1
            continue
        if not (w > 0 and h > 0):
            raise LabelError(f"{where}: box width and height must be positive")
        out[image].append(BoxLabel(x, y, x + w, y + h, label))
    if skipped:
        logger.warning("%s: skipped %d box rows for images not in the entries file", name, skipped)
    return out


def png_to_dataset(path: Path) -> Dataset:
    """Wrap a grayscale PNG as an in-memory Secondary Capture MONOCHROME2 dataset.

    Why: the shared ``service.inference.preprocess.preprocess_dataset`` takes DICOM datasets only, and a
    model trained on PNG-distributed data (NIH) must see its pixels through the same pipeline as the service.
    8-bit images get the window that maps 0..255 onto the full output range (they were already windowed for
    display when exported); 16-bit images get none, so the model's percentile window applies. Colour
    images are converted to luminance.
    """
    path = Path(path)
    try:
        with Image.open(path) as img:
            img.load()
            mode = img.mode
            if mode in ("I;16", "I;16B", "I;16L", "I"):
                array = np.asarray(img, dtype=np.int64)
                pixels, bits = np.clip(array, 0, 65535).astype(np.uint16), 16
            else:
                pixels, bits = np.asarray(img.convert("L"), dtype=np.uint8), 8
    except FileNotFoundError as exc:
        raise LabelError(f"image '{path}' not found") from exc
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise LabelError(f"image '{path}' is not a readable PNG: {exc}") from exc
    key = str(path.name)
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = UID(_SECONDARY_CAPTURE)
    ds.file_meta.MediaStorageSOPInstanceUID = UID(_nih_uid(key, "sop"))
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds.SOPClassUID, ds.SOPInstanceUID = _SECONDARY_CAPTURE, ds.file_meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = _nih_uid(key, "study"), _nih_uid(key, "series")
    ds.PatientID = path.stem
    ds.Modality = "OT"
    ds.ConversionType = "WSD"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = pixels.shape
    ds.BitsAllocated = ds.BitsStored = bits
    ds.HighBit = bits - 1
    ds.PixelRepresentation = 0
    if bits == 8:
        ds.WindowCenter, ds.WindowWidth = 128, 256
    ds.PixelData = pixels.tobytes()
    ds["PixelData"].VR = "OB" if bits == 8 else "OW"
    return ds


def read_image_dataset(path: Path) -> Dataset:
    """Any record's image as a pydicom Dataset: DICOM as read, ``.png`` through :func:`png_to_dataset`."""
    path = Path(path)
    if path.suffix.lower() == ".png":
        return png_to_dataset(path)
    try:
        return pydicom.dcmread(path)
    except FileNotFoundError as exc:
        raise LabelError(f"image '{path}' not found") from exc
    except Exception as exc:  # pydicom raises many types for a damaged file; all mean "unreadable" here
        raise LabelError(f"image '{path}' is not a readable DICOM file: {exc}") from exc
