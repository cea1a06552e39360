"""The root of the error tree and what every error carries (see :mod:`service.errors` for the tree).

Both doors read these class attributes: the problem+json renderer (RFC 9457, :mod:`service.api.problems`)
and the C-STORE wrapper (PS3.4 Annex B.2.3, :mod:`service.ingest.attempt`), so neither keeps a table of its
own.
"""

from __future__ import annotations

from typing import Any, ClassVar

__all__ = ["PROBLEM_BASE", "STOW_FAILURE_REASONS", "PacsTriageError", "RetryAfter", "stow_failure_reason"]

PROBLEM_BASE = "https://pacs-triage.invalid/problems/"


class PacsTriageError(Exception):
    """Base of every error the service reports, to a client, a peer or an administrator.

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
    dimse_status: ClassVar[int] = 0x0110
    dimse_comment: ClassVar[str | None] = None
    """The C-STORE ErrorComment (PS3.7 C.4.2) when ``detail`` is not the right thing to send."""
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

    @property
    def comment(self) -> str:
        """What a DIMSE failure response says in its ErrorComment."""
        return self.dimse_comment or self.detail

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


class RetryAfter:
    """Mixin: ``retry_after`` seconds for the ``Retry-After`` header (RFC 9110 10.2.3)."""

    def __init__(self, detail: str, *, retry_after: int = 1, **kwargs: Any) -> None:
        super().__init__(detail, **kwargs)  # type: ignore[call-arg]  # the next class is a PacsTriageError
        self.retry_after = retry_after


STOW_FAILURE_REASONS: dict[int, str] = {
    0xA700: "out of resources",
    0xA900: "data set does not match: another study's instance, or its UID already names other content",
    0xC000: "cannot understand",
    0xC122: "transfer syntax not supported",
}
"""The STOW-RS FailureReason codes we send (PS3.18 Table 10.5.3-2), in the words the Warning header uses."""


def stow_failure_reason(exc: PacsTriageError) -> int:
    """The STOW-RS FailureReason (PS3.18 10.5.3) for a refused instance: the error's own code.

    Within the ones we send (:data:`STOW_FAILURE_REASONS`): an error whose DIMSE status is none of them
    (a bug, a 0x0110 processing failure) is reported as 0xC000, cannot understand.
    """
    code = exc.stow_reason if exc.stow_reason is not None else exc.dimse_status
    return code if code in STOW_FAILURE_REASONS else 0xC000
