"""Bad input: what a client, a peer or an administrator gave cannot be used (see :mod:`service.errors`).

Sending the same thing again will not help, so over DICOM these are failures (0xC000 "Cannot understand",
0xA9xx "Data Set does not match", PS3.4 Annex B.2.3), never "Refused: Out of Resources".
"""

from __future__ import annotations

from service.errors._base import PacsTriageError

__all__ = [
    "AuthConfigError",
    "BadInputError",
    "BadRequestError",
    "CommandError",
    "ConfigError",
    "DraftError",
    "GraphError",
    "IdleError",
    "InvalidInstanceError",
    "InvalidUIDError",
    "LabelsError",
    "MalformedMultipartError",
    "MalformedPduError",
    "ModelLoadError",
    "NoPixelDataError",
    "NotAcceptableError",
    "NotDicomError",
    "PartialStoreError",
    "PayloadTooLargeError",
    "PduDeadlineError",
    "PduTooLargeError",
    "RequestTimeoutError",
    "SiteThresholdsError",
    "SopInstanceConflictError",
    "StudyMismatchError",
    "TruncatedDatasetError",
    "UnknownSourceError",
    "UnsupportedMediaTypeError",
    "UnsupportedTransferSyntaxError",
]

ABORT_INVALID_PARAMETER = 6
"""A-ABORT reason "invalid-PDU-parameter value" (PS3.8 Table 9-26): a malformed PDU's default."""


class BadInputError(PacsTriageError):
    """What a client, a peer or an administrator gave cannot be used; sending it again will not help."""

    http_status = 400
    dimse_status = 0xC000
    slug = "bad-request"
    title = "Bad request"


class InvalidInstanceError(BadInputError):
    """One DICOM part that cannot be stored or analysed."""

    http_status = 422
    slug = "invalid-instance"
    title = "Invalid DICOM instance"


class NotDicomError(InvalidInstanceError):
    http_status = 415
    slug = "not-dicom"
    title = "Not a DICOM Part 10 file"


class NoPixelDataError(InvalidInstanceError):
    slug = "no-pixel-data"
    title = "No pixel data"


class UnsupportedTransferSyntaxError(InvalidInstanceError):
    stow_reason = 0xC122
    slug = "unsupported-transfer-syntax"
    title = "Transfer syntax cannot be decoded"


class InvalidUIDError(InvalidInstanceError):
    slug = "invalid-uid"
    title = "Missing or invalid UID"


class TruncatedDatasetError(InvalidInstanceError):
    """A dataset cut short: an element declares more bytes than the file holds (PS3.5 7.1). Storing it
    would acknowledge pixels that never arrived; ``store.keep_truncated`` keeps such files, noted."""

    slug = "truncated-dataset"
    title = "Truncated dataset"


class BadRequestError(BadInputError):
    """The request itself (its body, headers or parameters), not one of its parts."""


class MalformedMultipartError(BadRequestError):
    slug = "malformed-multipart"
    title = "Malformed multipart body"


class UnsupportedMediaTypeError(BadRequestError):
    http_status = 415
    slug = "unsupported-media-type"
    title = "Unsupported media type"


class PayloadTooLargeError(BadRequestError):
    http_status = 413
    slug = "payload-too-large"
    title = "Payload too large"


class SopInstanceConflictError(BadInputError):
    """The SOP Instance UID is already stored in another study (PS3.3 C.12.1.1.1: one UID, one instance),
    or, over STOW-RS, in the same study with other content.

    Answering success would drop the new instance, since a duplicate is not written again; the sender is
    told which study holds the UID (``conflicting_study``). Over DICOM an A9xx failure (PS3.4 B.2.3); a
    C-STORE of the same UID in the same study is still taken as a retry (PS3.4 B.2.3 lets an SCP keep
    one copy), while STOW-RS, whose senders can tell a retry from an edit, compares content.
    """

    http_status = 409
    dimse_status = 0xA900
    dimse_comment = "SOP Instance UID conflict"
    slug = "sop-instance-conflict"
    title = "SOP Instance UID conflict"


class StudyMismatchError(BadInputError):
    """STOW-RS to ``/studies/{uid}`` (PS3.18 10.5.1): a part whose StudyInstanceUID is another study."""

    http_status = 409
    dimse_status = 0xA900
    slug = "study-mismatch"
    title = "StudyInstanceUID does not match the request URL"


class PartialStoreError(BadInputError):
    """STOW-RS (PS3.18 10.5.3): some instances stored, some refused; ``failed`` lists each refusal."""

    http_status = 409
    slug = "partial-store"
    title = "Some instances were not stored"


class RequestTimeoutError(BadInputError):
    """The request body did not arrive in time (RFC 9110 15.5.9); the connection is closed after it."""

    http_status = 408
    slug = "request-timeout"
    title = "Request timeout"


class NotAcceptableError(BadInputError):
    """No representation the Accept header allows (RFC 9110 15.5.7, PS3.18 8.7.3)."""

    http_status = 406
    slug = "not-acceptable"
    title = "Not acceptable"


class UnknownSourceError(BadInputError):
    """The source is not one of ``dicom.retrieve_sources``."""

    http_status = 422
    slug = "unknown-retrieve-source"
    title = "Not a configured retrieve source"


class MalformedPduError(BadInputError, ValueError):
    """A PDU whose structure or values break PS3.8; ``reason`` is the A-ABORT reason to send."""

    def __init__(self, words: str, reason: int = ABORT_INVALID_PARAMETER) -> None:
        super().__init__(words)
        self.reason = reason


class PduTooLargeError(MalformedPduError):
    """The declared PDU length is above what we accept here; nothing of the body was read."""


class PduDeadlineError(BadInputError, TimeoutError):
    """A PDU was started and not finished within its deadline."""


class IdleError(BadInputError, TimeoutError):
    """No PDU started within the idle (or ARTIM) time."""


class CommandError(BadInputError, ValueError):
    """A command set that cannot be read (truncated, not group 0000, no Command Field or Message ID)."""


class ConfigError(BadInputError, ValueError):
    """An administrator's file or setting cannot be used; the message names it and is shown as is."""


class AuthConfigError(ConfigError):
    """The token configuration cannot be used; raised at start-up. Messages never contain a token or hash."""


class ModelLoadError(ConfigError):
    """Why one model folder cannot be served; ``problems`` lists each reason (``models check`` prints one
    per line)."""

    def __init__(self, message: str, problems: list[str] | None = None) -> None:
        super().__init__(message)
        self.problems = problems or [message]


class GraphError(ConfigError):
    """The file is not an ONNX model we can read."""


class DraftError(ConfigError):
    """The graph cannot become a card as it is; the message says what to change."""


class LabelsError(ConfigError):
    """The labels CSV cannot be used; the message names the line."""


class SiteThresholdsError(ConfigError):
    """The site-thresholds file is unreadable or an entry is malformed; the message names it."""
