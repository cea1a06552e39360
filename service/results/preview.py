"""A :class:`StudyResult` → an RGB Secondary Capture preview with boxes and a warning banner, via highdicom.

Why a picture as well as the SR: every PACS viewer shows a Secondary Capture, few draw TID 1500 boxes. The
preview is the source frame windowed to 8 bits the way a reader would see it (the dataset's VOI LUT or
window with its VOILUTFunction, else a percentile window; MONOCHROME1 or Presentation LUT Shape INVERSE
inverted: :func:`service.inference.grayscale.display_unit`, the pipeline of preprocessing version 2),
scaled so its longest side is between 512 and 1024 pixels,
with the detections on that frame drawn in colour and labelled with their score, under a black banner that
starts "NOT FOR DIAGNOSTIC USE" and lists the findings (the first eight; the SR has them all). With
``heatmap=True`` a positive finding's heat map on that frame is blended over the image and the banner gets
its legend (:mod:`service.results.heatmap`).

Everything drawn is burned in, so the object says BurnedInAnnotation YES, ConversionType WSD (workstation),
ImageType DERIVED\\SECONDARY, references the source frame in SourceImageSequence with a
DerivationDescription, and repeats the warning in SeriesDescription and ImageComments. Patient and study come
from the source (highdicom ``from_ref_dataset``); the banner holds labels and numbers only, no identifiers.
"""

from __future__ import annotations

from collections.abc import Sequence

import highdicom as hd
import numpy as np
from PIL import Image, ImageDraw, ImageFont
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import ExplicitVRLittleEndian

from service.inference.grayscale import display_unit
from service.inference.preprocess import modality_frames
from service.results.heatmap import LEGEND_TEXT, decode_heatmap, draw_colour_bar, overlay
from service.results.schema import Finding, StudyResult
from service.results.sr import MANUFACTURER, frame_count

__all__ = [
    "BANNER_TEXT",
    "BOX_COLOURS",
    "MAX_SIDE",
    "MIN_SIDE",
    "PREVIEW_SERIES_DESCRIPTION",
    "build_preview",
    "heatmap_finding",
    "key_image",
    "preview_scale",
    "referenced_instances",
]

BANNER_TEXT = "NOT FOR DIAGNOSTIC USE - AI triage (demonstration model)"
PREVIEW_SERIES_DESCRIPTION = "AI triage preview - not for diagnostic use"
BOX_COLOURS: tuple[tuple[int, int, int], ...] = (
    (255, 48, 48),
    (255, 200, 0),
    (0, 200, 255),
    (0, 230, 0),
    (255, 0, 255),
)
"""Box colour of the n-th finding (cycled); saturated so a box never looks like grey anatomy."""
MIN_SIDE = 512
"""Small images are enlarged, and narrow ones centred on a canvas this wide, so the banner stays readable."""
MAX_SIDE = 1024
"""Longest side of the whole preview, banner included: a preview, not a copy of the image."""
_BANNER_BG = (0, 0, 0)
_BANNER_FG = (255, 255, 255)
_RULE = (128, 128, 128)
_MAX_FINDING_LINES = 8
_UNPAIRED_BODY_PARTS = frozenset(
    {"CHEST", "HEAD", "BRAIN", "SKULL", "NECK", "ABDOMEN", "PELVIS", "HEART", "CSPINE", "TSPINE", "LSPINE"}
)
"""PS3.16 Annex L body parts without a side, the ones our models and their neighbours meet."""


def build_preview(
    result: StudyResult,
    source: Dataset,
    *,
    frame: int = 1,
    sop_instance_uid: str,
    series_instance_uid: str,
    series_number: int = 9902,
    instance_number: int = 1,
    heatmap: bool = False,
) -> hd.sc.SCImage:
    """Build the Secondary Capture preview of ``result`` on frame ``frame`` (1-based) of ``source``.

    ``heatmap``: overlay the heat map of the positive finding that has one on this frame, with a legend.

    Raises
    ------
    ValueError
        ``frame`` out of range, ``source`` is not a grayscale image that can be decoded
        (:class:`service.inference.preprocess.PreprocessError`, a ValueError), or ``heatmap`` is asked
        for a frame that has none.
    """
    frames = modality_frames(source)
    if not 1 <= frame <= frames.shape[0]:
        raise ValueError(f"frame {frame} out of range: the source has {frames.shape[0]} frame(s)")
    values = frames[frame - 1]
    unit, voi = display_unit(source, values)
    gray = np.round(unit * 255.0).astype(np.uint8)

    shown = heatmap_finding(result, str(source.SOPInstanceUID), frame) if heatmap else None
    if heatmap and shown is None:
        raise ValueError("no positive finding has a heat map on this frame")
    canvas, scale = _compose(gray, result, str(source.SOPInstanceUID), frame, shown)

    sc = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=source,
        pixel_array=np.asarray(canvas, dtype=np.uint8),
        photometric_interpretation=hd.PhotometricInterpretationValues.RGB,
        bits_allocated=8,
        coordinate_system=hd.CoordinateSystemNames.PATIENT,
        series_instance_uid=series_instance_uid,
        series_number=series_number,
        sop_instance_uid=sop_instance_uid,
        instance_number=instance_number,
        manufacturer=MANUFACTURER,
        patient_orientation=("L", "F"),  # placeholder highdicom requires; replaced below by the source's
        transfer_syntax_uid=ExplicitVRLittleEndian,
        series_description=PREVIEW_SERIES_DESCRIPTION,
    )
    _describe(sc, result, source, frame, voi, scale, shown)
    return sc


def heatmap_finding(
    result: StudyResult, sop_instance_uid: str | None = None, frame: int = 1
) -> Finding | None:
    """The most likely positive finding with a heat map (on ``sop_instance_uid`` and ``frame`` if given)."""
    for f in sorted(result.findings, key=lambda f: -f.probability):
        hm = f.heatmap
        if (
            f.positive
            and hm
            and (sop_instance_uid is None or (hm.sop_instance_uid, hm.frame) == (sop_instance_uid, frame))
        ):
            return f
    return None


def _compose(
    gray: np.ndarray, result: StudyResult, sop_instance_uid: str, frame: int, shown: Finding | None = None
) -> tuple[Image.Image, float]:
    """The banner on top, the scaled image with its boxes below; returns the picture and the image's scale.

    The whole picture stays within MAX_SIDE (the image shrinks to make room for the banner); an image
    narrower than MIN_SIDE is centred on a black canvas that wide so the banner text is not cut.
    """
    lines = _banner_lines(result)
    if shown is not None:
        lines += [f"AI heat map of {shown.label}: {LEGEND_TEXT}", ""]  # "": the colour bar
    rows, columns = gray.shape
    scale = preview_scale(rows, columns)
    font = _font(max(MIN_SIDE, round(columns * scale)))
    line_height = _line_height(font)
    banner_height = line_height * len(lines) + line_height // 2
    if round(rows * scale) + banner_height > MAX_SIDE:
        scale = (MAX_SIDE - banner_height) / rows
    size = (max(1, round(columns * scale)), max(1, round(rows * scale)))
    image = Image.fromarray(gray).resize(size, Image.Resampling.BILINEAR).convert("RGB")
    if shown is not None and shown.heatmap is not None:
        hm = shown.heatmap
        image = overlay(image, decode_heatmap(hm.values, hm.rows, hm.columns))
    _draw_boxes(image, result.findings, sop_instance_uid, frame, scale, font)

    width = max(MIN_SIDE, size[0])
    canvas = Image.new("RGB", (width, size[1] + banner_height), _BANNER_BG)
    canvas.paste(image, ((width - size[0]) // 2, banner_height))
    draw = ImageDraw.Draw(canvas)
    draw.line((0, banner_height - 2, width, banner_height - 2), fill=_RULE, width=2)  # banner ≠ dark image
    for i, line in enumerate(lines):
        xy = (line_height // 4, line_height // 4 + i * line_height)
        draw.text(xy, _fit(draw, line, font, width), _BANNER_FG, font)
    if shown is not None:  # the legend's bar on the banner's last line
        top = line_height // 4 + (len(lines) - 1) * line_height
        bar_width = min(width - line_height // 2, 24 * line_height)
        draw_colour_bar(draw, (line_height // 4, top), (bar_width, line_height - 4), font)
    return canvas, scale


def preview_scale(rows: int, columns: int) -> float:
    """Scale of the image part: longest side into [MIN_SIDE, MAX_SIDE] (before the banner is added)."""
    longest = max(rows, columns)
    if longest < MIN_SIDE:
        return MIN_SIDE / longest
    if longest > MAX_SIDE:
        return MAX_SIDE / longest
    return 1.0


def _banner_lines(result: StudyResult) -> list[str]:
    """The warning, then one line per finding; at most _MAX_FINDING_LINES so the banner leaves room."""
    lines = [BANNER_TEXT]
    lines.extend(
        f"{f.label} ({f.model} {f.model_version}): probability {f.probability:.2f}, "
        f"threshold {f.threshold:.2f} - {'POSITIVE' if f.positive else 'negative'}"
        for f in result.findings[:_MAX_FINDING_LINES]
    )
    if len(result.findings) > _MAX_FINDING_LINES:
        lines.append(f"... and {len(result.findings) - _MAX_FINDING_LINES} more findings (see the SR)")
    if not result.findings:
        lines.append(f"no findings - result status: {result.status.replace('_', ' ')}")
    if result.assembly is not None:
        lines.append(result.assembly.describe())
    return lines


def _font(width: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """Pillow's bundled font at a size that fits ~70 characters across the preview."""
    try:
        return ImageFont.load_default(size=max(12, width // 48))
    except (OSError, ValueError):  # Pillow without FreeType: fixed-size bitmap font
        return ImageFont.load_default()


def _line_height(font: ImageFont.FreeTypeFont | ImageFont.ImageFont) -> int:
    _, top, _, bottom = font.getbbox("Ag")
    return int(bottom - min(top, 0)) + 6


def _fit(
    draw: ImageDraw.ImageDraw, text: str, font: ImageFont.FreeTypeFont | ImageFont.ImageFont, width: int
) -> str:
    """Cut ``text`` to fit ``width`` pixels, ending in '...' when cut."""
    if draw.textlength(text, font=font) <= width - 8:
        return text
    while text and draw.textlength(text + "...", font=font) > width - 8:
        text = text[:-1]
    return text + "..."


def _draw_boxes(
    image: Image.Image,
    findings: Sequence[Finding],
    sop_instance_uid: str,
    frame: int,
    scale: float,
    font: ImageFont.FreeTypeFont | ImageFont.ImageFont,
) -> None:
    """Draw the detections of this instance and frame, in source pixels times ``scale``."""
    draw = ImageDraw.Draw(image)
    line = max(2, round(max(image.size) / 256))
    for n, finding in enumerate(findings):
        colour = BOX_COLOURS[n % len(BOX_COLOURS)]
        for det in finding.detections:
            if det.sop_instance_uid != sop_instance_uid or det.frame != frame:
                continue
            x0, x1 = sorted((det.x0 * scale, det.x1 * scale))
            y0, y1 = sorted((det.y0 * scale, det.y1 * scale))
            draw.rectangle((x0, y0, x1, y1), outline=colour, width=line)
            label = f"{finding.label} {det.score:.2f}"
            _, _, text_w, text_h = draw.textbbox((0, 0), label, font=font)
            ty = y0 - text_h - line - 2  # above the box, clear of its outline; below it at the top edge
            if ty < 0:
                ty = y1 + line + 1
            draw.rectangle((x0, ty, x0 + text_w + 4, ty + text_h + 1), fill=(0, 0, 0))
            draw.text((x0 + 2, ty), label, fill=colour, font=font)


def _describe(
    sc: Dataset,
    result: StudyResult,
    source: Dataset,
    frame: int,
    voi: str,
    scale: float,
    shown: Finding | None = None,
) -> None:
    """What highdicom leaves to us: SC Equipment (PS3.3 C.8.6.1), burned-in text, the source reference."""
    models = list(dict.fromkeys(f"{m.name} {m.version}" for m in result.models)) or list(
        dict.fromkeys(f"{f.model} {f.model_version}" for f in result.findings)
    )
    sc.ConversionType = "WSD"
    sc.SecondaryCaptureDeviceManufacturer = MANUFACTURER
    sc.SecondaryCaptureDeviceManufacturerModelName = MANUFACTURER
    if models:
        sc.SecondaryCaptureDeviceSoftwareVersions = [m[:64] for m in models]
    sc.BurnedInAnnotation = "YES"
    heat = f", the AI heat map of {shown.label} ({shown.model}) blended over it" if shown else ""
    sc.ImageComments = (
        f"{BANNER_TEXT}. Boxes{', heat map' if shown else ''} and banner burned in; "
        f"pacs-triage result {result.result_id}."
    )
    sc.DerivationDescription = (
        f"Frame {frame} of the source through {voi} to 8 bits, "
        f"scaled x{scale:.4g}{heat}, AI detection boxes and a not-for-diagnostic-use banner burned in"
    )[:1024]
    item = Dataset()
    item.ReferencedSOPClassUID = source.SOPClassUID
    item.ReferencedSOPInstanceUID = source.SOPInstanceUID
    if frame_count(source) > 1:  # Type 1C: only when the reference is not to all frames
        item.ReferencedFrameNumber = frame
    item.PurposeOfReferenceCodeSequence = [
        hd.sr.CodedConcept.from_code(codes.DCM.SourceImageForImageProcessingOperation)  # CID 7202
    ]
    item.SpatialLocationsPreserved = "NO"  # scaled, and moved down by the banner
    sc.SourceImageSequence = [item]
    sc.PatientOrientation = _orientation(source)
    _copy_anatomy(sc, source)


def _copy_anatomy(sc: Dataset, source: Dataset) -> None:
    """BodyPartExamined and Laterality of the source (General Series).

    Laterality is Type 2C, required for a paired body part. It is copied when the source knows it, left out
    for a body part known to be unpaired, and otherwise sent empty, which Type 2 allows for "unknown".
    """
    body_part = str(source.get("BodyPartExamined") or "").strip().upper()
    if body_part:
        sc.BodyPartExamined = body_part
    image_laterality = source.get("ImageLaterality")
    laterality = source.get("Laterality") or (image_laterality if image_laterality in ("R", "L") else None)
    if laterality:
        sc.Laterality = laterality
    elif body_part not in _UNPAIRED_BODY_PARTS:
        sc.Laterality = None


def _orientation(source: Dataset) -> list[str] | None:
    """PatientOrientation: the source's, else derived from ImageOrientationPatient, else empty (Type 2).

    Scaling and the banner above do not change which way rows and columns point.
    """
    value = source.get("PatientOrientation")
    if value and len(value) == 2:
        return [str(v) for v in value]
    iop = source.get("ImageOrientationPatient")
    if iop is None or len(iop) != 6:
        return None
    return [_direction([float(v) for v in iop[:3]]), _direction([float(v) for v in iop[3:]])]


def _direction(cosines: list[float]) -> str:
    """PS3.3 C.7.6.1.1.1: letters of the patient axes a direction points to, strongest first."""
    letters = []
    for axis in sorted(range(3), key=lambda i: -abs(cosines[i])):
        if abs(cosines[axis]) > 0.25:
            letters.append(("LR", "PA", "HF")[axis][0 if cosines[axis] > 0 else 1])
    return "".join(letters)


def referenced_instances(result: StudyResult) -> list[str]:
    """SOP Instance UIDs the SR, SEG and preview will reference: key images, images with boxes, and every
    slice a positive finding's segment covers (a SEG references all the slices that were segmented)."""
    uids: dict[str, None] = {}
    for f in result.findings:
        if f.key_instance_uid:
            uids[f.key_instance_uid] = None
        for d in f.detections:
            uids[d.sop_instance_uid] = None
        for segment in f.segments if f.positive else []:
            uids.update(dict.fromkeys(segment.instances))
    return list(uids)


def key_image(result: StudyResult) -> tuple[str, int] | None:
    """The image the preview shows: the key image of the most likely positive finding, else of any."""
    ranked = sorted(result.findings, key=lambda f: (not f.positive, -f.probability))
    for f in ranked:
        if f.key_instance_uid:
            return f.key_instance_uid, f.key_frame or 1
    return None
