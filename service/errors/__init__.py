"""Every public error of the service, each carrying its HTTP status, problem type and DIMSE status.

Routes, stages and the DICOM doors raise these; the HTTP problem+json renderer (:mod:`service.api.problems`,
RFC 9457) and the C-STORE wrapper (:mod:`service.ingest.attempt`, statuses of PS3.4 Annex B.2.3) both read
the class attributes, so one failure has one meaning on every door. Third-party errors are wrapped where they
enter, with ``raise … from``. Errors that were a ``ValueError``/``RuntimeError``/``TimeoutError`` before the
tree was drawn still are (a second base), so no caller's ``except`` changed meaning.

The tree (HTTP status / DIMSE status; blank: the family's)::

    PacsTriageError                     500 / 0x0110  (a failure of ours: PS3.7 C.4.2 "processing failure")
    ├── BadInputError                   400 / 0xC000  (what a client, peer or administrator gave is unusable)
    │   ├── InvalidInstanceError        422           (a DICOM part that cannot be stored)
    │   │   ├── NotDicomError           415
    │   │   ├── NoPixelDataError, InvalidUIDError
    │   │   ├── UnsupportedTransferSyntaxError        (STOW-RS FailureReason 0xC122)
    │   │   └── TruncatedDatasetError                 (declared lengths beyond the bytes received)
    │   ├── BadRequestError                           (the request itself, not a part)
    │   │   ├── MalformedMultipartError
    │   │   ├── UnsupportedMediaTypeError 415
    │   │   └── PayloadTooLargeError    413
    │   ├── SopInstanceConflictError    409 / 0xA900  (the UID names another study's or other content)
    │   ├── StudyMismatchError          409 / 0xA900  (STOW-RS to /studies/{uid}: another study's instance)
    │   ├── PartialStoreError           409           (STOW-RS: some parts stored, some refused)
    │   ├── RequestTimeoutError         408           (a request body too slow: RFC 9110 15.5.9)
    │   ├── NotAcceptableError          406           (RFC 9110 15.5.7)
    │   ├── UnknownSourceError          422           (not one of dicom.retrieve_sources)
    │   ├── MalformedPduError → PduTooLargeError      (PS3.8 upper layer; carries the A-ABORT reason)
    │   ├── PduDeadlineError, IdleError               (TimeoutError: a PDU unfinished, none started)
    │   ├── CommandError                              (a DIMSE command set that cannot be read, PS3.7 E)
    │   └── ConfigError                               (an administrator's file or setting)
    │       └── AuthConfigError, ModelLoadError, GraphError, DraftError, LabelsError, SiteThresholdsError
    ├── AccessError                     401           (RFC 6750; the challenge in ``www_authenticate``)
    │   ├── UnauthorizedError           401, ForbiddenError 403, TooManyRequestsError 429 (RFC 6585 4)
    │   └── OidcError                                 (a JWT refused; mapped to 401/403/503 by api.auth)
    ├── NotFoundError                   404
    │   └── StudyNotFoundError, FindingNotFoundError, FindingNotInResultError, DeliveryNotFoundError,
    │       PreviewNotFoundError, ObjectNotFoundError (PS3.18 8.6), UnknownModelError
    ├── NotAnalysableError              422           (the study gets "not analysed: reason", not a result)
    │   └── PreprocessError, SegmentationError, DecoderPanicError, InferenceError 500
    ├── UnavailableError                503           (try again: ``retry_after`` seconds where known)
    │   └── NotReadyError, UploadsBusyError, ResultNotReadyError 202 (not a failure: the result is coming)
    ├── PeerError                       502           (another system failed us; nothing of ours is wrong)
    │   └── DicomPeerError, DicomwebSourceError, MoveRefusedError, StudyNotFoundAtSourceError 404,
    │       ReidentificationError, FHIRError, HL7Error
    └── StorageError                    500           (our disk or database)
        ├── StorageFullError            507 / 0xA700  (PS3.4 C-STORE "Refused: Out of Resources")
        │   └── StudyTooLargeError      413           (more instances than api.max_instances_per_study)
        └── LeaseLostError, StaleResultError, SchemaError

DIMSE codes (PS3.4 Annex B.2.3, PS3.7 C.4.2): 0xA700 Refused: Out of Resources, 0xA900 Error: Data Set
does not match SOP Class (the A9xx range; used for an instance whose UID belongs to another study), 0xC000
Error: Cannot understand, 0x0110 Processing failure; an exception outside this tree is a bug and gets 0xC211
(as pynetdicom's ``attempt`` answers it), see :mod:`service.ingest.attempt`. STOW-RS answers each refused
instance with a FailureReason (PS3.18 10.5.3, Table 10.5.3-2): :func:`stow_failure_reason`. Errors with
``retry_after`` (202, 429, 503) get a ``Retry-After`` header; the two auth errors the RFC 6750
``WWW-Authenticate`` challenge. The classes live in private modules by family (as httpx's ``_exceptions``);
import them from here.
"""

from __future__ import annotations

from service.errors._base import (
    PROBLEM_BASE,
    STOW_FAILURE_REASONS,
    PacsTriageError,
    RetryAfter,
    stow_failure_reason,
)
from service.errors._failures import (
    DecoderPanicError,
    DicomPeerError,
    DicomwebSourceError,
    FHIRError,
    HL7Error,
    InferenceError,
    LeaseLostError,
    MoveRefusedError,
    NotAnalysableError,
    PeerError,
    PeerFailure,
    PreprocessError,
    ReidentificationError,
    SchemaError,
    SegmentationError,
    StaleResultError,
    StorageError,
    StorageFullError,
    StudyNotFoundAtSourceError,
    StudyTooLargeError,
)
from service.errors._input import (
    ABORT_INVALID_PARAMETER,
    AuthConfigError,
    BadInputError,
    BadRequestError,
    CommandError,
    ConfigError,
    DraftError,
    GraphError,
    IdleError,
    InvalidInstanceError,
    InvalidUIDError,
    LabelsError,
    MalformedMultipartError,
    MalformedPduError,
    ModelLoadError,
    NoPixelDataError,
    NotAcceptableError,
    NotDicomError,
    PartialStoreError,
    PayloadTooLargeError,
    PduDeadlineError,
    PduTooLargeError,
    RequestTimeoutError,
    SiteThresholdsError,
    SopInstanceConflictError,
    StudyMismatchError,
    TruncatedDatasetError,
    UnknownSourceError,
    UnsupportedMediaTypeError,
    UnsupportedTransferSyntaxError,
)
from service.errors._refusals import (
    AccessError,
    DeliveryNotFoundError,
    FindingNotFoundError,
    FindingNotInResultError,
    ForbiddenError,
    NotFoundError,
    NotReadyError,
    ObjectNotFoundError,
    OidcError,
    PreviewNotFoundError,
    ResultNotReadyError,
    StudyNotFoundError,
    TooManyRequestsError,
    UnauthorizedError,
    UnavailableError,
    UnknownModelError,
    UploadsBusyError,
)

__all__ = [
    "ABORT_INVALID_PARAMETER",
    "AccessError",
    "AuthConfigError",
    "BadInputError",
    "BadRequestError",
    "CommandError",
    "ConfigError",
    "DecoderPanicError",
    "DeliveryNotFoundError",
    "DicomPeerError",
    "DicomwebSourceError",
    "DraftError",
    "FHIRError",
    "FindingNotFoundError",
    "FindingNotInResultError",
    "ForbiddenError",
    "GraphError",
    "HL7Error",
    "IdleError",
    "InferenceError",
    "InvalidInstanceError",
    "InvalidUIDError",
    "LabelsError",
    "LeaseLostError",
    "MalformedMultipartError",
    "MalformedPduError",
    "ModelLoadError",
    "MoveRefusedError",
    "NoPixelDataError",
    "NotAcceptableError",
    "NotAnalysableError",
    "NotDicomError",
    "NotFoundError",
    "NotReadyError",
    "ObjectNotFoundError",
    "OidcError",
    "PROBLEM_BASE",
    "PacsTriageError",
    "PartialStoreError",
    "PayloadTooLargeError",
    "PduDeadlineError",
    "PduTooLargeError",
    "PeerError",
    "PeerFailure",
    "PreprocessError",
    "PreviewNotFoundError",
    "ReidentificationError",
    "RequestTimeoutError",
    "ResultNotReadyError",
    "RetryAfter",
    "STOW_FAILURE_REASONS",
    "SchemaError",
    "SegmentationError",
    "SiteThresholdsError",
    "SopInstanceConflictError",
    "StaleResultError",
    "StorageError",
    "StorageFullError",
    "StudyMismatchError",
    "StudyNotFoundAtSourceError",
    "StudyNotFoundError",
    "StudyTooLargeError",
    "TooManyRequestsError",
    "TruncatedDatasetError",
    "UnauthorizedError",
    "UnavailableError",
    "UnknownModelError",
    "UnknownSourceError",
    "UnsupportedMediaTypeError",
    "UnsupportedTransferSyntaxError",
    "UploadsBusyError",
    "stow_failure_reason",
]
