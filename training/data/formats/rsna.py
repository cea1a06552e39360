"""RSNA Pneumonia Detection Challenge (2018): one CSV row per box, one DICOM file per patient."""

from __future__ import annotations

import logging
from pathlib import Path

from training.data.formats.common import columns, label_value, open_csv, read_header
from training.data.records import BoxLabel, LabelError, Record

__all__ = ["load_rsna_pneumonia"]

logger = logging.getLogger(__name__)


def load_rsna_pneumonia(labels_csv: Path, dicom_dir: Path) -> list[Record]:
    """RSNA Pneumonia Detection Challenge (2018): ``patientId,x,y,width,height,Target`` + ``<patientId>.dcm``.

    One row per box; a patient with ``Target`` 0 has one row with empty coordinates. The label is
    ``pneumonia``; boxes are ``(x, y, x + width, y + height)`` with label ``pneumonia``.
    """
    labels_csv, dicom_dir = Path(labels_csv), Path(dicom_dir)
    name = labels_csv.name
    header, body = open_csv(labels_csv)
    col = columns(header, ("patientId", "x", "y", "width", "height", "Target"), name)
    patients: dict[str, dict[str, object]] = {}
    for number, fields in body:
        where = f"{name} row {number}"
        if len(fields) < len(header):
            raise LabelError(f"{where}: {len(fields)} fields, the header has {len(header)}")
        pid = fields[col["patientId"]].strip()
        if not pid:
            raise LabelError(f"{where}: empty patientId")
        target = label_value(fields[col["Target"]], where, "Target")
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
        ids = read_header(path, where)
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
