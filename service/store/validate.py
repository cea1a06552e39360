"""Check one received DICOM part before anything is stored: Part 10, pixel data, a decodable transfer
syntax, real UIDs. Shared by the HTTP API and the C-STORE listener, so both refuse the same things.

What is checked up front is what can be checked cheaply: a transfer syntax for which pydicom has no
available decoder plugin is refused here, and so is a dataset cut short (:func:`truncation`): pydicom reads
a value whose declared length runs past the end of the file as the bytes that are there, without a word,
so an instance whose pixel data never fully arrived would be acknowledged as stored (issue 15).
``store.keep_truncated`` stores such a dataset anyway, and :attr:`ParsedInstance.truncated` says so.

Pixel data that has a decoder but still fails to decode (a
corrupt or exotic JPEG) is only found when the worker decodes it, and becomes a "not analysed: cannot
decode ..." entry in the result instead of an error.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from io import BytesIO
from typing import Any, Literal

from pydicom import dcmread
from pydicom.dataset import FileDataset
from pydicom.errors import InvalidDicomError
from pydicom.filereader import _read_file_meta_info, read_preamble
from pydicom.pixels import get_decoder
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian

from service.errors import (
    InvalidInstanceError,
    InvalidUIDError,
    NoPixelDataError,
    NotDicomError,
    TruncatedDatasetError,
    UnsupportedTransferSyntaxError,
)
from service.store.attributes import PIXEL_TAGS, Attributes, elements_truncation, walk
from service.store.element_scan import scan
from service.store.files import is_safe_uid

__all__ = [
    "DEFER_BYTES",
    "MAX_INFLATED_BYTES",
    "OWN_MANUFACTURER",
    "ParsedInstance",
    "Role",
    "parse_instance",
    "truncation",
]


MAX_INFLATED_BYTES = 256 * 1024 * 1024
"""Largest dataset a Deflated Explicit VR Little Endian file (PS3.5 A.5) may inflate to. pydicom inflates
the whole dataset in one ``zlib.decompress`` call, and deflate reaches ~1000:1 on a constant image: a
1 MiB part would become a 1 GiB allocation (found by tests/reliability/test_fuzz_dicom.py)."""

DEFER_BYTES = 64 * 1024
"""Values longer than this (pixel data; undefined-length encapsulated data is always read) are not copied
out when a part is parsed: they stay in the part's bytes (or on disk, for a stored file) until something
uses them. The C-STORE path never does (it needs the attributes, then writes the bytes as received), so
each instance's pixels were copied once for nothing and held until placed (the journal's batches)."""

_DEFLATED = DeflatedExplicitVRLittleEndian.encode()

OWN_MANUFACTURER = "pacs-triage"
"""Manufacturer of the SR and preview objects we write: a PACS that routes them back to us (Orthanc
forwarding every stored instance) must not make a study re-run on its own result."""

Role = Literal["image", "other", "ours"]
"""``image``: analysed; ``other`` (SR, PR, ... over DICOM): stored, not analysed; ``ours``: our own result
objects coming back, stored, never a reason to re-run."""


@dataclass(frozen=True)
class ParsedInstance:
    """A validated instance: the bytes as received plus the attributes the store and routing need."""

    data: bytes | memoryview
    """The Part 10 file; a view of the listener thread's buffer for a C-STORE (valid until its store
    returned, :func:`service.store.direct_write.assemble`), bytes otherwise."""
    study_uid: str
    series_uid: str
    sop_instance_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    modality: str | None
    body_part: str | None
    accession_number: str | None
    role: Role = "image"
    expected_in_series: int | None = None
    """Instances the series will have when complete, when the sender says so (ImagesInAcquisition)."""
    dataset: FileDataset | None = field(default=None, repr=False, compare=False)
    """The dataset as parsed here, so the job of a request analyses it without reading the file back. Its
    long values (the pixel data, :data:`DEFER_BYTES`) are read from ``data`` when first used; that read
    seeks the dataset's own stream, so one thread at a time reads its values (the job's decode does)."""
    truncated: str | None = None
    """Why the dataset is incomplete, when ``store.keep_truncated`` kept it (see :func:`truncation`)."""

    def attributes_only(self) -> ParsedInstance:
        """The same instance without its bytes or dataset: what a row, queued or waiting, keeps.

        ``dataclasses.replace`` does this in ~5 µs by walking the fields; this is on every C-STORE's
        answer path, so the fields are passed on by name (a test checks that none is left out). One that
        has neither already (:meth:`from_fields`: a listener process's instance) is its own."""
        if self.dataset is None and not self.data:
            return self
        return ParsedInstance(
            data=b"",
            study_uid=self.study_uid,
            series_uid=self.series_uid,
            sop_instance_uid=self.sop_instance_uid,
            sop_class_uid=self.sop_class_uid,
            transfer_syntax_uid=self.transfer_syntax_uid,
            modality=self.modality,
            body_part=self.body_part,
            accession_number=self.accession_number,
            role=self.role,
            expected_in_series=self.expected_in_series,
            dataset=None,
            truncated=self.truncated,
        )

    def fields(self) -> tuple[Any, ...]:
        """The attributes :meth:`attributes_only` keeps, as a plain tuple: what a listener process sends
        the service (:mod:`service.ingest.processes`); a tuple pickles in a fraction of a dataclass's time."""
        return (
            self.study_uid,
            self.series_uid,
            self.sop_instance_uid,
            self.sop_class_uid,
            self.transfer_syntax_uid,
            self.modality,
            self.body_part,
            self.accession_number,
            self.role,
            self.expected_in_series,
            self.truncated,
        )

    @classmethod
    def from_fields(cls, fields: tuple[Any, ...]) -> ParsedInstance:
        """:meth:`fields` back: the instance without its bytes or dataset."""
        study, series, sop, sop_class, syntax, modality, body_part, accession, role, expected, cut = fields
        return cls(
            data=b"",
            study_uid=study,
            series_uid=series,
            sop_instance_uid=sop,
            sop_class_uid=sop_class,
            transfer_syntax_uid=syntax,
            modality=modality,
            body_part=body_part,
            accession_number=accession,
            role=role,
            expected_in_series=expected,
            truncated=cut,
        )


def _text(ds: FileDataset, keyword: str) -> str | None:
    value = ds.get(keyword)
    if value is None:
        return None
    text = str(value).strip()
    return text or None


def _optional_text(ds: FileDataset, keyword: str) -> str | None:
    """An attribute we can do without: one pydicom cannot convert (a wrong VR, a value length that is not
    a multiple of the value size) counts as absent rather than refusing the instance."""
    try:
        return _text(ds, keyword)
    except Exception:  # pydicom raises BytesLengthException, ValueError, ... for garbled values
        return None


def _images_in_acquisition(ds: FileDataset) -> int | None:
    try:
        return int(ds.get("ImagesInAcquisition") or 0)
    except Exception:  # garbled (text, several values, wrong VR): not worth refusing the instance for
        return None


def truncation(ds: FileDataset, size: int) -> str | None:
    """Why ``ds``, read from ``size`` bytes, is cut short; None when every declared length is there.

    Call it before any element is converted (values still :class:`RawDataElement`); a value left on disk
    by ``dcmread(..., defer_size=...)`` is measured against ``size`` without being read. The checks are
    :func:`service.store.attributes.elements_truncation`'s, plus a dataset pydicom dropped whole (the data
    ended before a delimiter, or no element at all after the file meta).
    """
    if not len(ds):  # pydicom drops the whole dataset when the data ends before a delimiter
        meta = ds.file_meta.get("FileMetaInformationGroupLength")
        meta_end = 132 + 12 + int(meta) if isinstance(meta, int) else size
        if size > meta_end:
            return "an undefined-length element has no delimiter before the data ends; nothing was readable"
    return elements_truncation(ds.values(), size)


def _maybe_deflated(data: bytes) -> bool:
    """Whether the Deflated transfer syntax UID appears where the file meta is (it is small): searched in
    place, without copying the first 64 KiB out."""
    return data.find(_DEFLATED, 0, 65536) != -1


def _check_inflated_size(data: bytes, part: str) -> None:
    """Refuse a deflated dataset that inflates past :data:`MAX_INFLATED_BYTES`, measuring it in bounded
    chunks before pydicom inflates it whole. Anything unreadable here is left for dcmread to report."""
    fp = BytesIO(data)
    try:
        read_preamble(fp, False)
        # pydicom's own file-meta reader (read_file_meta_info takes a path only)
        tsuid = _read_file_meta_info(fp).get("TransferSyntaxUID")
    except Exception:
        return
    if tsuid != DeflatedExplicitVRLittleEndian:
        return
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    pending = memoryview(data)[fp.tell() :]
    inflated = 0
    try:
        while pending:
            inflated += len(inflater.decompress(pending, 1 << 20))
            if inflated > MAX_INFLATED_BYTES:
                raise InvalidInstanceError(
                    f"the deflated dataset inflates to more than {MAX_INFLATED_BYTES} bytes", part=part
                )
            pending = memoryview(inflater.unconsumed_tail)
            if inflater.eof:
                break
    except zlib.error:
        return


def parse_instance(
    data: bytes | memoryview,
    part: str,
    *,
    images_only: bool = True,
    keep_truncated: bool = False,
    with_dataset: bool = True,
    walked: Attributes | None = None,
) -> ParsedInstance:
    """Validate one part; ``part`` names it in any error (``"part 2 (chest.dcm)"``).

    ``images_only`` refuses objects without pixel data (the HTTP API, whose only purpose is analysis);
    the DICOM listener passes False, because a PACS routes whole studies (SR, presentation states) and a
    refusal would show up as a failed transfer there: those are stored with role ``other``.
    ``keep_truncated`` (``store.keep_truncated``) accepts a dataset cut short, noted in ``truncated``.
    ``with_dataset`` False: the caller needs the attributes only (the C-STORE answer, the slots' replay,
    the re-index), so plain data is scanned without a Dataset (:mod:`service.store.element_scan`, else
    :mod:`service.store.attributes`); the checks and their messages are the same. ``walked``: the
    attributes the caller scanned already (the listener, which pads what the scan answered for); a
    ``memoryview`` ``data`` only with them (the C-STORE answer path,
    :func:`service.store.direct_write.assemble`).

    Raises
    ------
    NotDicomError, NoPixelDataError, UnsupportedTransferSyntaxError, InvalidUIDError
        Each with ``part`` set, so the problem body says which part was bad.
    TruncatedDatasetError
        A declared length runs past the end of the data (422 / 0xC000), naming the element.
    """
    if not data:
        raise NotDicomError("the part is empty", part=part)
    if walked is None and not with_dataset:
        walked = scan(data, len(data), DEFER_BYTES) or walk(bytes(data), DEFER_BYTES)
    ds = None
    if walked is None:
        ds, walked = _read_whole(bytes(data), part)
    if walked.truncated is not None and not keep_truncated:
        raise TruncatedDatasetError(
            f"the dataset is truncated: {walked.truncated}; refused rather than stored incomplete", part=part
        )
    tsuid = walked.transfer_syntax_uid
    if not tsuid:
        raise UnsupportedTransferSyntaxError(
            "the file meta information has no TransferSyntaxUID (0002,0010)", part=part
        )
    if not isinstance(tsuid, str):  # a wrong VR (OB, US) gives bytes or a number: get_decoder raised
        raise UnsupportedTransferSyntaxError(
            "the TransferSyntaxUID (0002,0010) in the file meta information is not a UID", part=part
        )
    tsuid = UID(tsuid)
    if not walked.has_pixels and images_only:
        raise NoPixelDataError("the instance has no pixel data; only images can be analysed", part=part)
    if walked.has_pixels:
        try:
            available = get_decoder(tsuid).is_available
        except (NotImplementedError, ValueError):
            available = False
        if not available:
            raise UnsupportedTransferSyntaxError(
                f"no decoder is available for transfer syntax {tsuid} ({tsuid.name})", part=part
            )
    uids = {
        "StudyInstanceUID": walked.study,
        "SeriesInstanceUID": walked.series,
        "SOPInstanceUID": walked.sop,
        "SOPClassUID": walked.sop_class,
    }
    for keyword, value in uids.items():
        if value is None:
            raise InvalidUIDError(f"{keyword} is missing", part=part)
        if not is_safe_uid(value):
            raise InvalidUIDError(f"{keyword} is not a valid UID (PS3.5 9.1)", part=part)
    assert walked.study and walked.series and walked.sop and walked.sop_class
    expected = walked.images_in_acquisition
    if walked.manufacturer == OWN_MANUFACTURER:
        role: Role = "ours"
    else:
        role = "image" if walked.has_pixels else "other"
    return ParsedInstance(
        data=data,
        study_uid=walked.study,
        series_uid=walked.series,
        sop_instance_uid=walked.sop,
        sop_class_uid=walked.sop_class,
        transfer_syntax_uid=str(tsuid),
        modality=walked.modality,
        body_part=walked.body_part,
        accession_number=walked.accession,
        role=role,
        # ImagesInAcquisition (0020,1002): CT and MR senders fill it; one acquisition per series is the rule
        expected_in_series=expected if expected is not None and 0 < expected <= 100_000 else None,
        dataset=ds,
        truncated=walked.truncated,
    )


def _read_whole(data: bytes, part: str) -> tuple[FileDataset, Attributes]:
    """``dcmread`` the part: the Dataset (the HTTP job analyses it) and what :func:`parse_instance` checks;
    what pydicom raised, as our errors."""
    deflated = _maybe_deflated(data)
    if deflated:
        _check_inflated_size(data, part)
    try:
        # pydicom reads a deferred value back from the stream it parsed, which for a deflated dataset is
        # not ``data`` but the inflated copy: there, everything is read at once
        ds = dcmread(BytesIO(data), force=False, defer_size=None if deflated else DEFER_BYTES)
        tsuid = ds.file_meta.get("TransferSyntaxUID")
        # positions in a deflated dataset are in the inflated stream: only the length check applies there
        cut = truncation(ds, len(data) if tsuid != DeflatedExplicitVRLittleEndian else 1 << 62)
        # Touch the elements we use so a broken element fails here, not in the worker.
        uids = [
            _text(ds, k) for k in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID")
        ]
    except InvalidDicomError as exc:
        raise NotDicomError(f"not a DICOM Part 10 file ({exc})", part=part) from exc
    except UserWarning as exc:  # warnings as errors (the test suite): pydicom warns before dropping the data
        if "before delimiter" not in str(exc):
            raise NotDicomError(f"the DICOM file cannot be parsed: {type(exc).__name__}", part=part) from exc
        raise TruncatedDatasetError(
            "the dataset is truncated: an undefined-length element has no delimiter before the data ends",
            part=part,
        ) from exc
    except Exception as exc:  # pydicom raises many types for a truncated or garbled file
        raise NotDicomError(f"the DICOM file cannot be parsed: {type(exc).__name__}", part=part) from exc
    return ds, Attributes(
        transfer_syntax_uid=tsuid,
        study=uids[0],
        series=uids[1],
        sop=uids[2],
        sop_class=uids[3],
        modality=_optional_text(ds, "Modality"),
        body_part=_optional_text(ds, "BodyPartExamined"),
        accession=_optional_text(ds, "AccessionNumber"),
        manufacturer=_optional_text(ds, "Manufacturer"),
        images_in_acquisition=_images_in_acquisition(ds),
        has_pixels=any(tag in ds for tag in PIXEL_TAGS),
        truncated=cut,
    )
