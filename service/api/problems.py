"""One place that turns errors into ``application/problem+json`` (RFC 9457), so no route ever answers
with another error shape, FastAPI's own validation errors and 404s included.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from service.errors import (
    PROBLEM_BASE,
    ForbiddenError,
    ResultNotReadyError,
    TriageError,
    UnauthorizedError,
)

__all__ = ["PROBLEM_JSON", "install_problem_handlers", "problem_response"]

logger = logging.getLogger(__name__)

PROBLEM_JSON = "application/problem+json"


def problem_response(
    body: dict[str, Any], status: int, headers: dict[str, str] | None = None
) -> JSONResponse:
    return JSONResponse(body, status_code=status, media_type=PROBLEM_JSON, headers=headers)


async def handle_triage_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, TriageError)
    headers: dict[str, str] = {}
    if isinstance(exc, ResultNotReadyError):
        headers["Retry-After"] = str(exc.retry_after)
    if isinstance(exc, UnauthorizedError | ForbiddenError):  # RFC 9110 11.6.1, RFC 6750 3
        headers["WWW-Authenticate"] = exc.www_authenticate
    if "location" in exc.extra:
        headers["Location"] = str(exc.extra["location"])
    if exc.http_status >= 500 and exc.http_status != 503:  # 503 is a readiness probe answer, not news
        logger.error("%s: %s", type(exc).__name__, exc.detail)
    return problem_response(exc.problem(), exc.http_status, headers)


async def handle_validation_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = exc.errors()
    first = errors[0] if errors else {}
    part = ".".join(str(p) for p in first.get("loc", ())) or None
    body = {
        "type": PROBLEM_BASE + "invalid-request",
        "title": "Invalid request",
        "status": 422,
        "detail": str(first.get("msg", "the request is invalid")),
        "part": part,
        "errors": [{"loc": [str(p) for p in e.get("loc", ())], "msg": str(e.get("msg"))} for e in errors],
    }
    return problem_response(body, 422)


async def handle_http_exception(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    body = {
        "type": "about:blank",
        "title": str(exc.detail) if exc.status_code != 404 else "Not Found",
        "status": exc.status_code,
        "detail": str(exc.detail),
    }
    return problem_response(body, exc.status_code, dict(exc.headers or {}))


async def handle_unexpected(_request: Request, exc: Exception) -> JSONResponse:
    """Last resort: log the exception and answer a problem 500 rather than Starlette's plain text."""
    logger.error("unhandled error", exc_info=exc)
    body = {
        "type": PROBLEM_BASE + "internal-error",
        "title": "Internal error",
        "status": 500,
        "detail": "an unexpected error occurred; it has been logged",
    }
    return problem_response(body, 500)


def install_problem_handlers(app: FastAPI) -> None:
    app.add_exception_handler(TriageError, handle_triage_error)
    app.add_exception_handler(RequestValidationError, handle_validation_error)
    app.add_exception_handler(StarletteHTTPException, handle_http_exception)
    app.add_exception_handler(Exception, handle_unexpected)
