"""Refusals that are not about the content: access, not found, not yet (see :mod:`service.errors`).

These exist on the HTTP door only; their DIMSE status is the root's and never sent.
"""

from __future__ import annotations

from typing import Any

from service.errors._base import PacsTriageError, RetryAfter

__all__ = [
    "AccessError",
    "DeliveryNotFoundError",
    "FindingNotFoundError",
    "FindingNotInResultError",
    "ForbiddenError",
    "NotFoundError",
    "NotReadyError",
    "ObjectNotFoundError",
    "OidcError",
    "PreviewNotFoundError",
    "ResultNotReadyError",
    "StudyNotFoundError",
    "TooManyRequestsError",
    "UnauthorizedError",
    "UnavailableError",
    "UnknownModelError",
    "UploadsBusyError",
]


def _bearer_challenge(realm: str, error: str | None) -> str:
    """An RFC 6750 section 3 challenge: ``Bearer realm="..."`` plus ``error="..."`` when there is one."""
    challenge = f'Bearer realm="{realm}"'
    return challenge + (f', error="{error}"' if error else "")


class AccessError(PacsTriageError):
    """The caller is not (or not yet) allowed to do this."""

    http_status = 401
    slug = "unauthorized"
    title = "Unauthorized"


class UnauthorizedError(AccessError):
    """No usable bearer token (RFC 6750 section 3.1).

    ``error`` is ``"invalid_token"`` when a token was sent but is not one we know, and None when none was
    sent (RFC 6750 says a challenge to a request without credentials SHOULD NOT carry an error code).
    The detail never repeats the token.
    """

    def __init__(
        self, detail: str, *, realm: str = "pacs-triage", error: str | None = None, **kwargs: Any
    ) -> None:
        super().__init__(detail, **kwargs)
        self.www_authenticate = _bearer_challenge(realm, error)


class ForbiddenError(AccessError):
    """A known token whose role does not allow the request (RFC 6750 ``insufficient_scope``)."""

    http_status = 403
    slug = "forbidden"
    title = "Forbidden"

    def __init__(self, detail: str, *, realm: str = "pacs-triage", **kwargs: Any) -> None:
        super().__init__(detail, **kwargs)
        self.www_authenticate = _bearer_challenge(realm, "insufficient_scope")


class TooManyRequestsError(RetryAfter, AccessError):
    """Too many wrong tokens from one client address (RFC 6585 4); ``retry_after`` seconds to wait."""

    http_status = 429
    slug = "too-many-requests"
    title = "Too many requests"


class OidcError(AccessError):
    """The JWT is not acceptable; ``reason`` says which check failed (safe to log: no claim values)."""

    def __init__(self, reason: str, *, forbidden: bool = False, unavailable: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.forbidden = forbidden
        """True when the token is genuine but carries no role we know (403, not 401)."""
        self.unavailable = unavailable
        """True when the keys cannot be fetched: the provider's outage, not the caller's fault (503)."""


class NotFoundError(PacsTriageError):
    http_status = 404
    slug = "not-found"
    title = "Not found"


class StudyNotFoundError(NotFoundError):
    slug = "study-not-found"
    title = "Study not found"


class FindingNotFoundError(NotFoundError):
    """The study's newest result has no finding of that model and label (or there is no result yet)."""

    slug = "finding-not-found"
    title = "Finding not found"


class FindingNotInResultError(NotFoundError, LookupError):
    """The store's side of :class:`FindingNotFoundError`: no result, or no such finding in the newest."""


class DeliveryNotFoundError(NotFoundError):
    slug = "delivery-not-found"
    title = "Delivery not found"


class PreviewNotFoundError(NotFoundError):
    """The study is known but there is no picture to show: no key image, or its file is gone (retention)."""

    slug = "preview-not-found"
    title = "Preview not available"


class ObjectNotFoundError(NotFoundError):
    """A series or instance UID we do not hold in the named study (PS3.18 8.6: 404 Not Found)."""

    slug = "dicom-object-not-found"
    title = "DICOM object not found"


class UnknownModelError(NotFoundError, KeyError):
    """No model of that name is loaded (never was, or failed to load: see the registry's errors)."""

    slug = "unknown-model"
    title = "Unknown model"

    def __str__(self) -> str:  # KeyError would quote the message
        return self.detail


class UnavailableError(PacsTriageError):
    http_status = 503
    slug = "not-ready"
    title = "Service not ready"


class NotReadyError(UnavailableError):
    """Engine still warming up, disk over its watermark: a readiness answer."""


class UploadsBusyError(RetryAfter, UnavailableError):
    """``api.max_concurrent_uploads`` request bodies are being received; try again shortly."""

    slug = "uploads-busy"
    title = "Too many uploads at once"


class ResultNotReadyError(RetryAfter, UnavailableError):
    """The study is known but its result is not written yet; the handler adds Retry-After."""

    http_status = 202
    slug = "result-not-ready"
    title = "Result not ready"
