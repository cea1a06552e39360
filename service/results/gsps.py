"""A :class:`StudyResult` → Grayscale Softcopy Presentation State (PS3.3 A.33.1) drawing the detector's boxes.

Why: the preview (:mod:`service.results.preview`) burns the boxes into a copy of the key image, a
Secondary Capture a viewer shows beside the study. A presentation state instead draws them *over the
original images* in the viewer, where the radiologist can switch them off, window the image and measure
it: the IHE AI Results profile (AIR) names a presentation state as the way to show regions without
altering pixels. ``delivery.send_gsps`` sends it beside the SR, like the KOS.

What goes in:

- every detection of every **positive** finding, as a closed POLYLINE (PS3.3 C.10.5: GraphicType, five
  points, the first repeated) in PIXEL units of its image, on the frame it was found on, with a text object
  above it giving the label and the score; one GraphicAnnotation per image (and frame), all in one graphic
  layer "AI" whose description says "not for diagnostic use";
- the referenced images' own window (VOI LUT), copied by highdicom from the first image, so the
  presentation state does not change how the image looks, only what is drawn over it; the series'
  Laterality from the images (Type 2C, empty when they have none);
- Manufacturer ``pacs-triage``, so the GSPS coming back from the PACS is recognised as ours and never
  starts an analysis (:data:`service.store.validate.OWN_MANUFACTURER`).

No positive finding with a box → no GSPS (None). Pure: no I/O, like the rest of ``results/``.
"""

from __future__ import annotations

from collections.abc import Mapping

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset

from service.results.kos import header_of
from service.results.schema import Detection, StudyResult

__all__ = ["GSPS_LAYER", "GSPS_SERIES_DESCRIPTION", "boxes", "build_gsps"]

MANUFACTURER = "pacs-triage"
GSPS_LAYER = "AI"
GSPS_SERIES_DESCRIPTION = "AI triage boxes - not for diagnostic use"


def boxes(result: StudyResult) -> dict[tuple[str, int], list[tuple[str, Detection]]]:
    """The positive findings' detections by (SOP Instance UID, frame), each with its finding's label."""
    drawn: dict[tuple[str, int], list[tuple[str, Detection]]] = {}
    for finding in result.findings:
        if finding.positive:
            for det in finding.detections:
                drawn.setdefault((det.sop_instance_uid, det.frame), []).append((finding.label, det))
    return drawn


def _polyline(det: Detection) -> hd.pr.GraphicObject:
    corners = [(det.x0, det.y0), (det.x1, det.y0), (det.x1, det.y1), (det.x0, det.y1), (det.x0, det.y0)]
    return hd.pr.GraphicObject(
        graphic_type=hd.pr.GraphicTypeValues.POLYLINE,
        graphic_data=np.asarray(corners, dtype=np.float32),
        units=hd.pr.AnnotationUnitsValues.PIXEL,
    )


def _label(label: str, det: Detection, rows: int) -> hd.pr.TextObject:
    """The label and score above the box (below it when the box touches the top edge)."""
    height = 14.0
    top = det.y0 - height if det.y0 >= height else min(det.y1, rows - height)
    return hd.pr.TextObject(
        text_value=f"{label} {det.score:.2f}"[:64],
        units=hd.pr.AnnotationUnitsValues.PIXEL,
        bounding_box=(det.x0, top, max(det.x1, det.x0 + 8.0), top + height),
        text_justification=hd.pr.TextJustificationValues.LEFT,
    )


def build_gsps(
    result: StudyResult,
    sources: Mapping[str, Dataset],
    *,
    sop_instance_uid: str,
    series_instance_uid: str,
    series_number: int = 9904,
) -> hd.pr.GrayscaleSoftcopyPresentationState | None:
    """The GSPS of ``result``'s boxes, or None when no positive finding has a detection.

    Raises
    ------
    ValueError
        An image with a box is missing from ``sources`` (datasets by SOP Instance UID; pixels not needed).
    """
    drawn = boxes(result)
    if not drawn:
        return None
    uids = list(dict.fromkeys(uid for uid, _frame in drawn))
    missing = [uid for uid in uids if uid not in sources]
    if missing:
        raise ValueError(f"images with boxes missing from sources: {', '.join(missing)}")
    images = {uid: header_of(sources[uid]) for uid in uids}
    layer = hd.pr.GraphicLayer(
        GSPS_LAYER, order=1, description="AI triage detections, not for diagnostic use"
    )
    annotations = []
    for (uid, frame), found in drawn.items():
        image = images[uid]
        frames = int(image.get("NumberOfFrames", 1) or 1)
        annotations.append(
            hd.pr.GraphicAnnotation(
                referenced_images=[image],
                graphic_layer=layer,
                referenced_frame_number=frame if frames > 1 else None,
                graphic_objects=[_polyline(det) for _label_text, det in found],
                text_objects=[_label(text, det, int(image.Rows)) for text, det in found],
            )
        )
    labels = ", ".join(dict.fromkeys(text for found in drawn.values() for text, _det in found))
    models = ", ".join(dict.fromkeys(f.model for f in result.findings if f.positive and f.detections))
    gsps = hd.pr.GrayscaleSoftcopyPresentationState(
        referenced_images=list(images.values()),
        series_instance_uid=series_instance_uid,
        series_number=series_number,
        sop_instance_uid=sop_instance_uid,
        instance_number=1,
        manufacturer=MANUFACTURER,
        manufacturer_model_name=models[:64] or MANUFACTURER,
        software_versions=MANUFACTURER,
        device_serial_number="0",
        content_label="AI_TRIAGE",
        content_description=f"AI triage boxes: {labels}"[:64],
        graphic_annotations=annotations,
        graphic_layers=[layer],
        series_description=GSPS_SERIES_DESCRIPTION,
    )
    # General Series Laterality (Type 2C, PS3.3 C.7.3.1): the images' own, else present and empty, as
    # dciodvfy asks of a presentation series whose body part it cannot judge
    first = images[uids[0]]
    side = first.get("Laterality") or first.get("ImageLaterality")
    gsps.Laterality = side if side in ("R", "L") else None
    return gsps
