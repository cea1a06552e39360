"""One place that turns errors into ``application/problem+json`` (RFC 9457), so no route ever answers
with another error shape, FastAPI's own validation errors and 404s included.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from service.errors import (
    PROBLEM_BASE,
    ForbiddenError,
    InvalidUIDError,
    PacsTriageError,
    UnauthorizedError,
)

__all__ = ["PROBLEM_JSON", "PROBLEM_SCHEMA", "install_problem_handlers", "problem_response"]

logger = logging.getLogger(__name__)

PROBLEM_JSON = "application/problem+json"


def problem_response(
    body: dict[str, Any], status: int, headers: dict[str, str] | None = None
) -> JSONResponse:
    return JSONResponse(body, status_code=status, media_type=PROBLEM_JSON, headers=headers)


async def handle_triage_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, PacsTriageError)
    headers: dict[str, str] = {}
    retry_after = getattr(exc, "retry_after", None)  # 202, 429, 503: RFC 9110 10.2.3
    if retry_after is not None:
        headers["Retry-After"] = str(retry_after)
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
    loc = tuple(str(p) for p in first.get("loc", ()))
    if loc == ("path", "study_uid"):  # the same problem as a UID refused anywhere else
        return await handle_triage_error(
            _request, InvalidUIDError("the study UID in the path is not a valid UID", part="study_uid")
        )
    part = ".".join(loc) or None
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


PROBLEM_SCHEMA: dict[str, Any] = {
    "title": "Problem",
    "description": (
        "RFC 9457 problem details. `part` names the bad part of the request; 422 from request "
        "validation adds `errors`; refused STOW parts add `failed` (409 also `stored`, `studies`, "
        "`location`)."
    ),
    "type": "object",
    "required": ["type", "title", "status", "detail"],
    "properties": {
        "type": {"type": "string", "description": "URI of the problem type, or about:blank"},
        "title": {"type": "string"},
        "status": {"type": "integer", "minimum": 100, "maximum": 599},
        "detail": {"type": "string"},
        "part": {"type": ["string", "null"]},
    },
    "additionalProperties": True,
}
_PROBLEM_CONTENT = {PROBLEM_JSON: {"schema": {"$ref": "#/components/schemas/Problem"}}}


def _document_problems(app: FastAPI) -> None:
    """Make the OpenAPI document say what these handlers send (tests/reliability/test_api_contract.py).

    FastAPI documents its own error shapes: a 422 ``HTTPValidationError`` in ``application/json`` that no
    client ever receives (handle_validation_error answers problem+json), and error responses declared by
    the routes (``responses={404: {}}``) with no content at all. Here every 4xx and 5xx response of every
    operation becomes ``application/problem+json`` with the ``Problem`` schema; every operation documents
    the 500 that :func:`handle_unexpected` may send, and one with a request body the 400 FastAPI answers
    for a body that is not JSON. Which other codes a route can answer stays declared on the route.
    """
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema and "Problem" in app.openapi_schema.get("components", {}).get("schemas", {}):
            return app.openapi_schema
        doc = build()
        doc.setdefault("components", {}).setdefault("schemas", {})["Problem"] = PROBLEM_SCHEMA
        for operations in doc.get("paths", {}).values():
            for operation in operations.values():
                responses = operation.setdefault("responses", {})
                if "requestBody" in operation:  # FastAPI answers 400 for a body that is not JSON at all
                    responses.setdefault("400", {"description": "The body cannot be parsed"})
                responses.setdefault("500", {"description": "Internal error"})
                for code, response in responses.items():
                    if code[0] in "45":
                        response["content"] = _PROBLEM_CONTENT
        for unused in ("HTTPValidationError", "ValidationError"):  # FastAPI's, now referenced by nothing
            if f'"#/components/schemas/{unused}"' not in json.dumps(doc):
                doc["components"]["schemas"].pop(unused, None)
        app.openapi_schema = doc
        return doc

    app.openapi = openapi  # type: ignore[method-assign]


def install_problem_handlers(app: FastAPI) -> None:
    app.add_exception_handler(PacsTriageError, handle_triage_error)
    app.add_exception_handler(RequestValidationError, handle_validation_error)
    app.add_exception_handler(StarletteHTTPException, handle_http_exception)
    app.add_exception_handler(Exception, handle_unexpected)
    _document_problems(app)
