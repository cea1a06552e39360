"""Failures: the study cannot be analysed, a peer failed us, our storage failed (see :mod:`service.errors`).

Over DICOM a full disk is "Refused: Out of Resources" (0xA700, PS3.4 Annex B.2.3: the sender retries later);
the rest are processing failures (0x0110, PS3.7 C.4.2).
"""

from __future__ import annotations

from typing import Literal

from service.errors._base import PacsTriageError

__all__ = [
    "DecoderPanicError",
    "DicomPeerError",
    "DicomwebSourceError",
    "FHIRError",
    "HL7Error",
    "InferenceError",
    "LeaseLostError",
    "MoveRefusedError",
    "NotAnalysableError",
    "PeerError",
    "PeerFailure",
    "PreprocessError",
    "ReidentificationError",
    "SchemaError",
    "SegmentationError",
    "StaleResultError",
    "StorageError",
    "StorageFullError",
    "StudyNotFoundAtSourceError",
    "StudyTooLargeError",
]

PeerFailure = Literal["unreachable", "timeout", "rejected", "aborted", "no-contexts", "tls"]
"""Which way an association with a peer failed (:class:`DicomPeerError`)."""


class NotAnalysableError(PacsTriageError):
    """The study or series cannot be analysed; it gets "not analysed: <detail>" instead of a finding."""

    http_status = 422
    slug = "not-analysable"
    title = "Not analysable"


class PreprocessError(NotAnalysableError, ValueError):
    """The dataset cannot be turned into a model input; ``reason`` is meant for a person."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class SegmentationError(NotAnalysableError, ValueError):
    """Why a flagged series got no mask; the text follows "not analysed: "."""


class DecoderPanicError(NotAnalysableError, ValueError):
    """A native pixel decoder panicked on the data (corrupt codestream)."""


class InferenceError(NotAnalysableError):
    """A session run (or session start) failed; every caller of the failed batch gets this."""

    http_status = 500
    slug = "inference-failed"
    title = "Inference failed"


class PeerError(PacsTriageError):
    """Another system (PACS, DICOMweb source, KServe, RIS, FHIR server) failed us."""

    http_status = 502
    slug = "peer-error"
    title = "A peer system failed"


class DicomPeerError(PeerError):
    """No association with the peer: nothing was sent. ``reason`` says which way it failed.

    ``transient`` is False for a permanent A-ASSOCIATE-RJ (e.g. our AE title is not configured there) and
    for a certificate that fails verification: retrying will not help until someone changes a configuration.
    """

    slug = "dicom-peer"
    title = "DICOM peer unavailable"

    def __init__(self, detail: str, *, reason: PeerFailure, transient: bool = True) -> None:
        super().__init__(detail)
        self.reason: PeerFailure = reason
        self.transient = transient


class DicomwebSourceError(PeerError):
    """The DICOMweb source could not be reached, or answered a search or retrieve with an error."""

    slug = "dicomweb-source-error"
    title = "The DICOMweb source did not answer"


class StudyNotFoundAtSourceError(PeerError):
    """The source answered the C-FIND and holds no study with that accession number or UID."""

    http_status = 404
    slug = "study-not-found-at-source"
    title = "Study not found at the source"


class MoveRefusedError(PeerError):
    """The source refused or failed the C-MOVE (its final status says why)."""

    slug = "move-refused"
    title = "The source did not send the study"


class ReidentificationError(PeerError):
    """A returned object cannot be attached to a study we sent (it names a study not in the map)."""

    slug = "reidentification-failed"
    title = "A returned object does not belong to a study we sent"


class FHIRError(PeerError, RuntimeError):
    """The FHIR server refused the transaction or could not be reached."""


class HL7Error(PeerError, RuntimeError):
    """The RIS refused the message, did not acknowledge it, or could not be reached."""


class StorageError(PacsTriageError):
    """Our disk or database failed or refused; nothing is wrong with what was sent."""

    slug = "storage-error"
    title = "Storage error"


class StorageFullError(StorageError):
    http_status = 507
    dimse_status = 0xA700
    dimse_comment = "disk full"
    slug = "storage-full"
    title = "Insufficient storage"


class StudyTooLargeError(StorageFullError):
    """A study over ``api.max_instances_per_study``: refused like a full disk over DICOM (the sender may
    retry after an administrator raised the limit), 413 over HTTP."""

    http_status = 413
    dimse_comment = "too many instances in the study"
    slug = "study-too-large"
    title = "Too many instances in the study"


class LeaseLostError(StorageError):
    """The job's lease expired and another worker took it: drop this attempt's work."""


class StaleResultError(StorageError):
    """Another result of the study was saved after the context was read: build again."""


class SchemaError(StorageError, RuntimeError):
    """The database cannot be brought to the current schema automatically."""
