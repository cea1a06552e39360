"""Domain errors, each carrying its HTTP status, DIMSE status and RFC 9457 problem type.

Routes and stages raise these; one FastAPI handler (:mod:`service.api.problems`) renders them as
``application/problem+json`` and the DICOM listener maps the same classes to C-STORE statuses, so one
failure has one meaning on both doors. Third-party errors are wrapped where they enter, with ``raise … from``.

The tree::

    TriageError                         500 / 0xC000
    ├── InvalidInstanceError            422 / 0xC000   (a part that cannot be stored)
    │   ├── NotDicomError               415 / 0xC000
    │   ├── NoPixelDataError            422 / 0xC000
    │   ├── UnsupportedTransferSyntaxError  422 / 0xC000
    │   ├── InvalidUIDError             422 / 0xC000
    │   └── TruncatedDatasetError       422 / 0xC000   (declared lengths beyond the bytes received)
    ├── BadRequestError                 400 / 0xC000   (the request itself, not a part)
    │   ├── MalformedMultipartError     400
    │   ├── UnsupportedMediaTypeError   415
    │   └── PayloadTooLargeError        413
    ├── PartialStoreError               409            (some parts stored, some refused: STOW-RS)
    ├── SopInstanceConflictError        409 / 0xA900   (the UID is stored in another study, or with
    │                                                   other content: STOW-RS)
    ├── StudyMismatchError              409 / 0xA900   (STOW-RS to /studies/{uid}: another study's instance)
    ├── RequestTimeoutError             408            (a request body too slow: RFC 9110 15.5.9)
    ├── TooManyRequestsError            429            (wrong tokens from one address: RFC 6585 4)
    ├── UnauthorizedError               401            (no bearer token or a wrong one: RFC 6750)
    ├── ForbiddenError                  403            (a valid token whose role is not enough)
    ├── StudyNotFoundError              404
    ├── FindingNotFoundError            404            (feedback on a finding the newest result lacks)
    ├── DeliveryNotFoundError           404
    ├── PreviewNotFoundError            404            (known study, no key image or its file is gone)
    ├── ResultNotReadyError             202            (not a failure: carries Retry-After)
    ├── NotReadyError                   503            (engine still warming up, disk over watermark)
    ├── UploadsBusyError                503            (api.max_concurrent_uploads bodies in flight)
    └── StorageFullError                507 / 0xA700   (PS3.4 C-STORE "Out of Resources")
        └── StudyTooLargeError          413 / 0xA700   (more instances than api.max_instances_per_study)

DIMSE codes from PS3.4 Annex B.2.3 (C-STORE): 0xA700 Refused: Out of Resources, 0xA900 Error: Data Set
does not match SOP Class (the A9xx range; used for an instance whose UID belongs to another study), 0xC000
Error: Cannot understand. STOW-RS answers each refused instance with a FailureReason (PS3.18 10.5.3,
Table 10.5.3-2) that is the class's DIMSE status, or its ``stow_reason`` where PS3.18 has a more precise
code (0xC122 transfer syntax not supported): :func:`stow_failure_reason`, with :data:`STOW_FAILURE_REASONS`
in words. Errors with ``retry_after`` (202, 429, 503) get a ``Retry-After`` header. The two
auth errors exist only on the HTTP door; both carry the RFC 6750 ``WWW-Authenticate`` challenge the handler
sends.
"""

from __future__ import annotations

from typing import Any, ClassVar

__all__ = [
    "BadRequestError",
    "DeliveryNotFoundError",
    "FindingNotFoundError",
    "ForbiddenError",
    "InvalidInstanceError",
    "InvalidUIDError",
    "MalformedMultipartError",
    "NoPixelDataError",
    "NotDicomError",
    "NotReadyError",
    "PartialStoreError",
    "PayloadTooLargeError",
    "PreviewNotFoundError",
    "RequestTimeoutError",
    "ResultNotReadyError",
    "SopInstanceConflictError",
    "STOW_FAILURE_REASONS",
    "StorageFullError",
    "StudyMismatchError",
    "StudyNotFoundError",
    "StudyTooLargeError",
    "TooManyRequestsError",
    "TriageError",
    "TruncatedDatasetError",
    "UnauthorizedError",
    "UnsupportedMediaTypeError",
    "UnsupportedTransferSyntaxError",
    "UploadsBusyError",
    "stow_failure_reason",
]

PROBLEM_BASE = "https://pacs-triage.invalid/problems/"


class TriageError(Exception):
    """Base of every error the service reports to a client.

    Parameters
    ----------
    detail
        A sentence for a person: what was wrong and, where it helps, what to do. Never PHI.
    part
        Which part of the request was bad (``"part 2 (chest.dcm)"``, ``"body"``, ``"study_uid"``).
    extra
        More members for the problem body (RFC 9457 extension members), e.g. ``failed`` for 409.
    """

    http_status: ClassVar[int] = 500
    dimse_status: ClassVar[int] = 0xC000
    stow_reason: ClassVar[int | None] = None
    """STOW-RS FailureReason when it differs from ``dimse_status`` (see :func:`stow_failure_reason`)."""
    slug: ClassVar[str] = "internal-error"
    title: ClassVar[str] = "Internal error"

    def __init__(self, detail: str, *, part: str | None = None, extra: dict[str, Any] | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        self.part = part
        self.extra = extra or {}

    @property
    def type(self) -> str:
        return PROBLEM_BASE + self.slug

    def problem(self) -> dict[str, Any]:
        """The RFC 9457 body."""
        body: dict[str, Any] = {
            "type": self.type,
            "title": self.title,
            "status": self.http_status,
            "detail": self.detail,
        }
        if self.part is not None:
            body["part"] = self.part
        body.update(self.extra)
        return body


class InvalidInstanceError(TriageError):
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


class BadRequestError(TriageError):
    http_status = 400
    slug = "bad-request"
    title = "Bad request"


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


class PartialStoreError(TriageError):
    """STOW-RS (PS3.18 10.5.3): some instances stored, some refused; ``failed`` lists each refusal."""

    http_status = 409
    slug = "partial-store"
    title = "Some instances were not stored"


class SopInstanceConflictError(TriageError):
    """The SOP Instance UID is already stored in another study (PS3.3 C.12.1.1.1: one UID, one instance),
    or, over STOW-RS, in the same study with other content.

    Answering success would drop the new instance, since a duplicate is not written again; the sender is
    told which study holds the UID (``conflicting_study``). Over DICOM an A9xx failure (PS3.4 B.2.3); a
    C-STORE of the same UID in the same study is still taken as a retry (PS3.4 B.2.3 lets an SCP keep
    one copy), while STOW-RS, whose senders can tell a retry from an edit, compares content.
    """

    http_status = 409
    dimse_status = 0xA900
    slug = "sop-instance-conflict"
    title = "SOP Instance UID conflict"


class StudyMismatchError(TriageError):
    """STOW-RS to ``/studies/{uid}`` (PS3.18 10.5.1): a part whose StudyInstanceUID is another study."""

    http_status = 409
    dimse_status = 0xA900
    slug = "study-mismatch"
    title = "StudyInstanceUID does not match the request URL"


class RequestTimeoutError(TriageError):
    """The request body did not arrive in time (RFC 9110 15.5.9); the connection is closed after it."""

    http_status = 408
    slug = "request-timeout"
    title = "Request timeout"


class TooManyRequestsError(TriageError):
    """Too many wrong tokens from one client address (RFC 6585 4); ``retry_after`` seconds to wait."""

    http_status = 429
    slug = "too-many-requests"
    title = "Too many requests"

    def __init__(self, detail: str, *, retry_after: int = 1, **kwargs: Any) -> None:
        super().__init__(detail, **kwargs)
        self.retry_after = retry_after


def _bearer_challenge(realm: str, error: str | None) -> str:
    """An RFC 6750 section 3 challenge: ``Bearer realm="..."`` plus ``error="..."`` when there is one."""
    challenge = f'Bearer realm="{realm}"'
    return challenge + (f', error="{error}"' if error else "")


class UnauthorizedError(TriageError):
    """No usable bearer token (RFC 6750 section 3.1).

    ``error`` is ``"invalid_token"`` when a token was sent but is not one we know, and None when none was
    sent (RFC 6750 says a challenge to a request without credentials SHOULD NOT carry an error code).
    The detail never repeats the token.
    """

    http_status = 401
    slug = "unauthorized"
    title = "Unauthorized"

    def __init__(
        self, detail: str, *, realm: str = "pacs-triage", error: str | None = None, **kwargs: Any
    ) -> None:
        super().__init__(detail, **kwargs)
        self.www_authenticate = _bearer_challenge(realm, error)


class ForbiddenError(TriageError):
    """A known token whose role does not allow the request (RFC 6750 ``insufficient_scope``)."""

    http_status = 403
    slug = "forbidden"
    title = "Forbidden"

    def __init__(self, detail: str, *, realm: str = "pacs-triage", **kwargs: Any) -> None:
        super().__init__(detail, **kwargs)
        self.www_authenticate = _bearer_challenge(realm, "insufficient_scope")


class StudyNotFoundError(TriageError):
    http_status = 404
    slug = "study-not-found"
    title = "Study not found"


class FindingNotFoundError(TriageError):
    """The study's newest result has no finding of that model and label (or there is no result yet)."""

    http_status = 404
    slug = "finding-not-found"
    title = "Finding not found"


class DeliveryNotFoundError(TriageError):
    http_status = 404
    slug = "delivery-not-found"
    title = "Delivery not found"


class PreviewNotFoundError(TriageError):
    """The study is known but there is no picture to show: no key image, or its file is gone (retention)."""

    http_status = 404
    slug = "preview-not-found"
    title = "Preview not available"


class ResultNotReadyError(TriageError):
    """The study is known but its result is not written yet; the handler adds Retry-After."""

    http_status = 202
    slug = "result-not-ready"
    title = "Result not ready"

    def __init__(self, detail: str, *, retry_after: int = 1, **kwargs: Any) -> None:
        super().__init__(detail, **kwargs)
        self.retry_after = retry_after


class NotReadyError(TriageError):
    http_status = 503
    slug = "not-ready"
    title = "Service not ready"


class UploadsBusyError(TriageError):
    """``api.max_concurrent_uploads`` request bodies are being received; try again shortly."""

    http_status = 503
    slug = "uploads-busy"
    title = "Too many uploads at once"

    def __init__(self, detail: str, *, retry_after: int = 1, **kwargs: Any) -> None:
        super().__init__(detail, **kwargs)
        self.retry_after = retry_after


class StorageFullError(TriageError):
    http_status = 507
    dimse_status = 0xA700
    slug = "storage-full"
    title = "Insufficient storage"


class StudyTooLargeError(StorageFullError):
    """A study over ``api.max_instances_per_study``: refused like a full disk over DICOM (the sender may
    retry after an administrator raised the limit), 413 over HTTP."""

    http_status = 413
    slug = "study-too-large"
    title = "Too many instances in the study"


STOW_FAILURE_REASONS: dict[int, str] = {
    0xA700: "out of resources",
    0xA900: "data set does not match: another study's instance, or its UID already names other content",
    0xC000: "cannot understand",
    0xC122: "transfer syntax not supported",
}
"""The STOW-RS FailureReason codes we send (PS3.18 Table 10.5.3-2), in the words the Warning header uses."""


def stow_failure_reason(exc: TriageError) -> int:
    """The STOW-RS FailureReason (PS3.18 10.5.3) for a refused instance: the error's own code.

    Within the ones we send (:data:`STOW_FAILURE_REASONS`): an error whose DIMSE status is none of them
    (a bug, a 0x0110 processing failure) is reported as 0xC000, cannot understand.
    """
    code = exc.stow_reason if exc.stow_reason is not None else exc.dimse_status
    return code if code in STOW_FAILURE_REASONS else 0xC000
