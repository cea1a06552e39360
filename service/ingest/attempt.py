"""One place that turns an error into a C-STORE response status with its ErrorComment.

The DIMSE twin of the problem+json renderer (:mod:`service.api.problems`): a store raises the same
:mod:`service.errors` classes over both doors, and this wrapper reads the status from the class, as
pynetdicom's ``service_class.attempt`` context manager turns a handler's exception into a failure status.
Used by the DICOM listener (:mod:`service.ingest.scp`) and by C-GET sub-operations
(:mod:`service.api.retrievals`), so a refusal has one code whoever received the instance.

Statuses (PS3.4 Annex B.2.3 for C-STORE, PS3.7 Annex C.4 for the general ones):

- 0x0000 Success: stored durably, or already stored (a duplicate: PS3.4 B.2.3 lets the SCP keep one copy).
- 0xA700 Refused: Out of Resources: :class:`~service.errors.StorageFullError` (disk, database, study size)
  and a write that failed (OSError): the sender retries later.
- 0xA900 Error: Data Set does not match SOP Class (A9xx): :class:`~service.errors.SopInstanceConflictError`,
  the UID is another study's.
- 0xC000 Error: Cannot understand: :class:`~service.errors.BadInputError` (not parseable, bad UIDs).
- 0x0110 Processing failure (PS3.7 C.4.2): any other :class:`~service.errors.PacsTriageError`, a failure of
  ours that has a name.
- 0xC211 (in the Cxxx "Cannot understand" range): anything else, a bug, logged with its traceback. It is the
  code pynetdicom's ``attempt`` sends for an exception in a C-STORE handler, so a sender's log reads the
  same for both kinds of SCP.

The ErrorComment (0000,0902, LO: 64 characters) is the error's
:attr:`~service.errors.PacsTriageError.comment`; it never carries PHI, since errors' details do not.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from service.errors import BadInputError, PacsTriageError, StorageFullError

__all__ = [
    "STATUS_CANNOT_UNDERSTAND",
    "STATUS_OUT_OF_RESOURCES",
    "STATUS_PROCESSING_FAILURE",
    "STATUS_SUCCESS",
    "STATUS_UNEXPECTED",
    "Attempt",
    "store_attempt",
]

logger = logging.getLogger(__name__)

STATUS_SUCCESS = 0x0000
STATUS_OUT_OF_RESOURCES = StorageFullError.dimse_status
STATUS_CANNOT_UNDERSTAND = BadInputError.dimse_status
STATUS_PROCESSING_FAILURE = PacsTriageError.dimse_status
STATUS_UNEXPECTED = 0xC211
"""pynetdicom's status for an exception raised by a C-STORE handler (``StorageServiceClass``)."""


@dataclass
class Attempt:
    """What one C-STORE comes to: the status, its ErrorComment, and the outcome label for the metrics
    (``stored``, ``duplicate``, ``refused``, ``out_of_resources``, ``failed``)."""

    status: int = STATUS_SUCCESS
    comment: str = ""
    outcome: str = "stored"

    @property
    def failed(self) -> bool:
        return self.status != STATUS_SUCCESS

    def stored(self, new: bool) -> None:
        """The instance is durable: success, new or a duplicate."""
        self.status, self.comment, self.outcome = STATUS_SUCCESS, "", "stored" if new else "duplicate"


@contextmanager
def store_attempt(source: object, what: str = "C-STORE") -> Iterator[Attempt]:
    """Run the body of one store; an exception inside becomes the attempt's failure status, never escapes.

    ``source`` names the sender in the log (an association or a peer: AE titles and addresses, no PHI).
    The body calls :meth:`Attempt.stored` once the instance is durable, so nothing reports success
    before its data is fsynced.
    """
    attempt = Attempt(outcome="failed", status=STATUS_PROCESSING_FAILURE, comment="not stored")
    try:
        yield attempt
    except PacsTriageError as exc:
        attempt.status, attempt.comment = exc.dimse_status, exc.comment
        if isinstance(exc, StorageFullError):
            attempt.outcome = "out_of_resources"
            logger.error("%s from %s refused: %s", what, source, exc.detail)
        elif isinstance(exc, BadInputError):
            attempt.outcome = "refused"
            logger.warning("%s from %s refused: %s", what, source, exc.detail)
        else:
            attempt.outcome = "failed"
            logger.error("%s from %s failed: %s: %s", what, source, type(exc).__name__, exc.detail)
    except OSError as exc:  # the file could not be written: the sender may try again later
        logger.error("%s from %s: writing the instance failed (%s)", what, source, exc.strerror)
        attempt.status, attempt.comment = STATUS_OUT_OF_RESOURCES, "cannot write the instance"
        attempt.outcome = "out_of_resources"
    except Exception:
        logger.exception("%s from %s: storing the instance failed", what, source)
        attempt.status, attempt.comment = STATUS_UNEXPECTED, "internal error storing"
        attempt.outcome = "failed"
