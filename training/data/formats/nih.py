"""NIH ChestX-ray14 (Wang et al. 2017): a CSV of findings per PNG image, an optional CSV of boxes.

The images carry no DICOM identifiers, so study, series and SOP instance UIDs are derived from the image's
name (:func:`nih_uid`), the same on every load; :func:`training.data.formats.images.png_to_dataset` gives
the PNG the same UIDs when it wraps it for the preprocessing.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path

from pydicom.uid import generate_uid

from training.data.formats.common import columns, open_csv
from training.data.records import BoxLabel, LabelError, Record

__all__ = ["NIH_FINDINGS", "load_nih_chestxray14", "nih_uid"]

logger = logging.getLogger(__name__)

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


def nih_uid(image: str, part: str) -> str:
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
    header, body = open_csv(entries_csv)
    col = columns(header, ("Image Index", "Finding Labels", "Patient ID"), name)
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
            study_uid=nih_uid(image, "study"),
            series_uid=nih_uid(image, "series"),
            sop_uid=nih_uid(image, "sop"),
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
    header, body = open_csv(bbox_csv)
    col = columns(header, ("Image Index", "Finding Label"), name)
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
