"""De-identify DICOM objects for a backend that receives DICOM, and re-identify the objects it returns.

Our KServe v2 backend sends pixels only (docs/deidentification.md); a backend that needs DICOM objects (a
DICOM-in, DICOM-out AI server) must get them through the PS3.15 Annex E **Basic Application Level
Confidentiality Profile**. :class:`Deidentifier` applies it with pydicom:

- the attributes of Table E.1-1 (:mod:`service.dicom.deid_profile`): removed (X), emptied (Z), or given a
  pseudonym (PatientName, PatientID: D), wherever they occur, sequence items included;
- every UID that the standard does not define (study, series, instance, frame of reference, referenced
  instances, ...) replaced by a random ``2.25.`` UID (PS3.15 E.3.9, PS3.5 B.2), the same pseudonym for the
  same UID throughout one map, so references inside and between the objects still hold;
- private attributes (PS3.15 E.3.10 without the Retain Safe Private option), curves (50xx) and overlays
  (60xx, whose graphics may hold text) removed; and as safety nets, every remaining person name emptied,
  every date and time emptied (no Retain Longitudinal Temporal Information option), attributes of unknown
  VR (UN) removed;
- a new File Meta Information (no source AE title, our implementation UID), and PatientIdentityRemoved
  YES, DeidentificationMethod and its code sequence (DCM 113100, Basic Application Confidentiality
  Profile), LongitudinalTemporalInformationModified REMOVED (PS3.3 C.7.1.1, PS3.15 E.1.1).

Pixel data is not cleaned (no Clean Pixel Data option): as for pixels-only requests, route to such a backend
only series whose pixels carry no burned-in text.

The :class:`ReidentificationMap` stays on our side: pseudonymous UID → real UID, and each real study's
identifying attributes. :meth:`ReidentificationMap.reidentify` maps every UID of a returned object back
(its study, the instances it references) and restores the real study's patient and study attributes, so
the result attaches to the real study; an object naming a study that was never sent is refused
(:class:`ReidentificationError`). The map is PHI: it is never logged (its repr shows counts only) and never
sent anywhere.
"""

from __future__ import annotations

import copy
import secrets
import uuid
from dataclasses import dataclass, field

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import UID

from service.dicom.ae import IMPLEMENTATION_CLASS_UID
from service.dicom.deid_profile import DUMMY, EMPTY, REMOVE, RESTORED
from service.errors import ReidentificationError

__all__ = ["Deidentifier", "ReidentificationMap"]

METHOD = "PS3.15 Annex E Basic Profile (pacs-triage)"
"""DeidentificationMethod (LO, at most 64 characters)."""
_MARKERS = (
    "PatientIdentityRemoved",
    "DeidentificationMethod",
    "DeidentificationMethodCodeSequence",
    "LongitudinalTemporalInformationModified",
)


@dataclass(repr=False)
class ReidentificationMap:
    """What it takes to put identity back: pseudonym → real UID, and each real study's identity."""

    uids: dict[str, str] = field(default_factory=dict)
    identity: dict[str, dict[str, str]] = field(default_factory=dict)
    """Real StudyInstanceUID → the :data:`~service.dicom.deid_profile.RESTORED` attributes it had."""

    def __repr__(self) -> str:  # PHI inside: counts only
        return f"ReidentificationMap({len(self.uids)} UIDs, {len(self.identity)} studies)"

    def reidentify(self, returned: Dataset) -> Dataset:
        """A copy of ``returned`` about the real study: UIDs mapped back, patient and study restored.

        UIDs the backend made itself (its result's own series and instance) are kept.

        Raises
        ------
        ReidentificationError
            ``returned`` names no study, or one that this map never de-identified.
        """
        out = copy.deepcopy(returned)
        _map_uids(out, self.uids)
        study = str(out.get("StudyInstanceUID", "") or "")
        if study not in self.identity:
            raise ReidentificationError(
                "the backend returned an object whose StudyInstanceUID is not one of the studies sent to it",
                part="StudyInstanceUID",
            )
        for keyword in _MARKERS:
            if keyword in out:
                delattr(out, keyword)
        for keyword, value in self.identity[study].items():
            setattr(out, keyword, value)
        meta = getattr(out, "file_meta", None)
        if meta is not None and "SOPInstanceUID" in out:
            meta.MediaStorageSOPInstanceUID = out.SOPInstanceUID
        return out


def _map_uids(ds: Dataset, mapping: dict[str, str]) -> None:
    for elem in ds:
        if elem.VR == "SQ":
            for item in elem.value:
                _map_uids(item, mapping)
        elif elem.VR == "UI" and not elem.is_empty:
            values = list(elem.value) if elem.VM > 1 else [elem.value]
            mapped = [mapping.get(str(v), str(v)) for v in values]
            elem.value = mapped if elem.VM > 1 else mapped[0]


class Deidentifier:
    """De-identifies datasets under one :class:`ReidentificationMap` (one request, or one study).

    Pseudonyms are random, not derived from the real values, so nothing outside the map links them back;
    within one map the same real UID or patient always gets the same pseudonym.
    """

    def __init__(self) -> None:
        self.map = ReidentificationMap()
        self._pseudonyms: dict[str, str] = {}
        self._patients: dict[str, str] = {}

    def deidentify(self, ds: Dataset) -> Dataset:
        """A de-identified copy of ``ds`` (Part 10 ready: new File Meta Information)."""
        out = copy.deepcopy(ds)
        study = str(ds.get("StudyInstanceUID", "") or "")
        if study and study not in self.map.identity:
            self.map.identity[study] = {k: str(ds.get(k)) for k in RESTORED if ds.get(k) not in (None, "")}
        patient = self._patients.setdefault(str(ds.get("PatientID", "") or ""), secrets.token_hex(6).upper())
        self._clean(out)
        out.PatientID = f"ANON-{patient}"
        out.PatientName = f"ANONYMOUS^{patient}"
        out.PatientIdentityRemoved = "YES"
        out.DeidentificationMethod = METHOD
        code = Dataset()
        code.CodeValue, code.CodingSchemeDesignator = "113100", "DCM"
        code.CodeMeaning = "Basic Application Confidentiality Profile"
        out.DeidentificationMethodCodeSequence = Sequence([code])
        out.LongitudinalTemporalInformationModified = "REMOVED"
        out.file_meta = self._meta(ds, out)
        return out

    def _pseudonym(self, real: str) -> str:
        if not real or UID(real).name != real:  # a UID the standard defines (SOP class, code scheme...)
            return real
        pseudo = self._pseudonyms.get(real)
        if pseudo is None:
            pseudo = f"2.25.{uuid.uuid4().int}"
            self._pseudonyms[real] = pseudo
            self.map.uids[pseudo] = real
        return pseudo

    def _clean(self, ds: Dataset) -> None:
        for tag in list(ds.keys()):
            elem = ds[tag]
            group = tag.group
            if (
                tag.is_private
                or 0x5000 <= group <= 0x50FF
                or 0x6000 <= group <= 0x60FF
                or elem.keyword in REMOVE
                or elem.VR == "UN"
            ):
                del ds[tag]
            elif elem.keyword in EMPTY or elem.keyword in DUMMY:
                elem.value = None if elem.VR == "SQ" else ""
            elif elem.VR == "SQ":
                for item in elem.value:
                    self._clean(item)
            elif elem.VR == "UI" and not elem.is_empty:
                values = list(elem.value) if elem.VM > 1 else [elem.value]
                mapped = [self._pseudonym(str(v)) for v in values]
                elem.value = mapped if elem.VM > 1 else mapped[0]
            elif elem.VR in ("PN", "DA", "DT", "TM"):  # safety nets: names, dates and times
                elem.value = ""

    @staticmethod
    def _meta(original: Dataset, out: Dataset) -> FileMetaDataset:
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = out.get("SOPClassUID", "")
        meta.MediaStorageSOPInstanceUID = out.get("SOPInstanceUID", "")
        old = getattr(original, "file_meta", None)
        syntax = old.get("TransferSyntaxUID") if old is not None else None
        meta.TransferSyntaxUID = UID(syntax or "1.2.840.10008.1.2.1")
        meta.ImplementationClassUID = IMPLEMENTATION_CLASS_UID
        return meta
