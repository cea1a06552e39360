"""Check one received DICOM part before anything is stored: Part 10, pixel data, a decodable transfer
syntax, real UIDs. Shared by the HTTP API and (later) the C-STORE listener, so both refuse the same things.

What is checked up front is what can be checked cheaply: a transfer syntax for which pydicom has no
available decoder plugin is refused here. Pixel data that has a decoder but still fails to decode (a
corrupt or exotic JPEG) is only found when the worker decodes it, and becomes a "not analysed: cannot
decode ..." entry in the result instead of an error.
"""

from __future__ import annotations

from dataclasses import dataclass
from io import BytesIO

from pydicom import dcmread
from pydicom.dataset import FileDataset
from pydicom.errors import InvalidDicomError
from pydicom.pixels import get_decoder

from service.errors import (
    InvalidUIDError,
    NoPixelDataError,
    NotDicomError,
    UnsupportedTransferSyntaxError,
)
from service.store.files import is_safe_uid

__all__ = ["ParsedInstance", "parse_instance"]

_PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")


@dataclass(frozen=True)
class ParsedInstance:
    """A validated instance: the bytes as received plus the attributes the store and routing need."""

    data: bytes
    study_uid: str
    series_uid: str
    sop_instance_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    modality: str | None
    body_part: str | None
    accession_number: str | None


def _text(ds: FileDataset, keyword: str) -> str | None:
    value = ds.get(keyword)
    if value is None:
        return None
    text = str(value).strip()
    return text or None


def parse_instance(data: bytes, part: str) -> ParsedInstance:
    """Validate one part; ``part`` names it in any error (``"part 2 (chest.dcm)"``).

    Raises
    ------
    NotDicomError, NoPixelDataError, UnsupportedTransferSyntaxError, InvalidUIDError
        Each with ``part`` set, so the problem body says which part was bad.
    """
    if not data:
        raise NotDicomError("the part is empty", part=part)
    try:
        ds = dcmread(BytesIO(data), force=False)
        # Touch the elements we use so a broken element fails here, not in the worker.
        uids = {
            "StudyInstanceUID": _text(ds, "StudyInstanceUID"),
            "SeriesInstanceUID": _text(ds, "SeriesInstanceUID"),
            "SOPInstanceUID": _text(ds, "SOPInstanceUID"),
            "SOPClassUID": _text(ds, "SOPClassUID"),
        }
    except InvalidDicomError as exc:
        raise NotDicomError(f"not a DICOM Part 10 file ({exc})", part=part) from exc
    except Exception as exc:  # pydicom raises many types for a truncated or garbled file
        raise NotDicomError(f"the DICOM file cannot be parsed: {type(exc).__name__}", part=part) from exc

    tsuid = getattr(ds.file_meta, "TransferSyntaxUID", None)
    if not tsuid:
        raise UnsupportedTransferSyntaxError(
            "the file meta information has no TransferSyntaxUID (0002,0010)", part=part
        )
    if not any(k in ds for k in _PIXEL_KEYWORDS):
        raise NoPixelDataError("the instance has no pixel data; only images can be analysed", part=part)
    try:
        available = get_decoder(tsuid).is_available
    except NotImplementedError:
        available = False
    if not available:
        raise UnsupportedTransferSyntaxError(
            f"no decoder is available for transfer syntax {tsuid} ({tsuid.name})", part=part
        )
    for keyword, value in uids.items():
        if value is None:
            raise InvalidUIDError(f"{keyword} is missing", part=part)
        if not is_safe_uid(value):
            raise InvalidUIDError(f"{keyword} is not a valid UID (PS3.5 9.1)", part=part)
    assert uids["StudyInstanceUID"] and uids["SeriesInstanceUID"] and uids["SOPInstanceUID"]
    assert uids["SOPClassUID"]
    return ParsedInstance(
        data=data,
        study_uid=uids["StudyInstanceUID"],
        series_uid=uids["SeriesInstanceUID"],
        sop_instance_uid=uids["SOPInstanceUID"],
        sop_class_uid=uids["SOPClassUID"],
        transfer_syntax_uid=str(tsuid),
        modality=_text(ds, "Modality"),
        body_part=_text(ds, "BodyPartExamined"),
        accession_number=_text(ds, "AccessionNumber"),
    )
