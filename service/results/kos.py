"""A :class:`StudyResult` → Key Object Selection Document (PS3.3 A.35.4, TID 2010) flagging the key images.

Why: the IHE AI Results profile (AIR) lists the KOS as the optional way an Evidence Creator points a
reading workstation at the images its findings are about; most PACS viewers show a KOS as "key images"
of the study without knowing TID 1500. The SR stays the result (:mod:`service.results.sr`); the KOS only
selects.

What goes in:

- the key image of every **positive** finding, each instance once, in the order of the
  findings (a negative finding flags nothing: a key image list of normal studies would bury the urgent
  ones);
- document title DCM 113000 "Of Interest" (CID 7010), a device observer named like the SR's, and a
  description naming the findings and saying "not for diagnostic use";
- Manufacturer ``pacs-triage``, so the KOS coming back from the PACS is recognised as ours and never
  starts an analysis (:data:`service.store.validate.OWN_MANUFACTURER`).

No positive finding with a key image → no KOS (None). Pure: no I/O, like the rest of ``results/``.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping

import highdicom as hd
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid

from service.results.schema import StudyResult

__all__ = ["KOS_SERIES_DESCRIPTION", "KOS_TITLE", "build_kos", "header_of", "key_images"]

MANUFACTURER = "pacs-triage"
KOS_TITLE = codes.DCM.OfInterest
"""DCM 113000 "Of Interest", CID 7010 Key Object Selection Document Title."""
KOS_SERIES_DESCRIPTION = "AI triage key images - not for diagnostic use"
_TYPE2: tuple[str, ...] = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "AccessionNumber",
    "StudyID",
)
_TYPE2 += ("StudyDate", "StudyTime", "ReferringPhysicianName")


def key_images(result: StudyResult) -> list[str]:
    """SOP Instance UIDs of the positive findings' key images, each once, in the findings' order."""
    return list(
        dict.fromkeys(f.key_instance_uid for f in result.findings if f.positive and f.key_instance_uid)
    )


def header_of(ds: Dataset) -> Dataset:
    """A pixel-free copy with the Type 2 patient/study attributes present (highdicom reads them)."""
    hdr = Dataset()
    for elem in ds:
        if elem.tag.group != 0x7FE0 and not 0x6000 <= elem.tag.group <= 0x60FF:
            hdr.add(copy.deepcopy(elem))
    for keyword in _TYPE2:
        if keyword not in hdr:
            setattr(hdr, keyword, None)
    return hdr


def build_kos(
    result: StudyResult,
    sources: Mapping[str, Dataset],
    *,
    sop_instance_uid: str,
    series_instance_uid: str,
    series_number: int = 9903,
) -> hd.ko.KeyObjectSelectionDocument | None:
    """The KOS of ``result``, or None when no positive finding has a key image.

    Raises
    ------
    ValueError
        A key image is missing from ``sources`` (datasets by SOP Instance UID; pixels not needed).
    """
    uids = key_images(result)
    if not uids:
        return None
    missing = [uid for uid in uids if uid not in sources]
    if missing:
        raise ValueError(f"key images missing from sources: {', '.join(missing)}")
    images = [header_of(sources[uid]) for uid in uids]
    labels = ", ".join(dict.fromkeys(f.label for f in result.findings if f.positive and f.key_instance_uid))
    models = list(dict.fromkeys(f.model for f in result.findings if f.positive))
    observer = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=generate_uid(entropy_srcs=[MANUFACTURER, *models]),
            name=MANUFACTURER,
            manufacturer_name=MANUFACTURER,
            model_name=", ".join(models)[:64],
        ),
    )
    content = hd.ko.KeyObjectSelection(
        document_title=KOS_TITLE,
        referenced_objects=images,
        observer_device_context=observer,
        description=f"AI triage: {labels}. Not for diagnostic use (pacs-triage result {result.result_id}).",
    )
    return hd.ko.KeyObjectSelectionDocument(
        evidence=images,
        content=content,
        series_instance_uid=series_instance_uid,
        series_number=series_number,
        sop_instance_uid=sop_instance_uid,
        instance_number=1,
        manufacturer=MANUFACTURER,
        series_description=KOS_SERIES_DESCRIPTION,
    )
