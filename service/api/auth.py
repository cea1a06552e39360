"""Bearer tokens with a role (RFC 6750) for the HTTP API.

Two roles, ``reader`` < ``admin``: a safe method (GET, HEAD: RFC 9110 9.2.1) needs a reader token, any
other method (POST a study, retry a delivery) an admin token, and an admin token may do what a reader may.
:func:`authorize` is attached to the routers in :mod:`service.api` (health probes excepted), so a route
added to a protected router is protected without saying so. ``/openapi.json`` and ``/docs`` stay open:
they describe the API and hold nothing secret.

Tokens come from ``auth.admin_tokens`` / ``auth.reader_tokens`` (JSON lists in the environment) and from
``auth.tokens_file``, lines of ``role name sha256hex`` (``pacs-triage hash-token`` writes them), so no plain
token needs to be on disk. Only SHA-256 digests are kept in memory; a presented token is hashed and
compared with :func:`hmac.compare_digest` against every entry. A token is never logged, nor put in an error;
its *name* is, at DEBUG on success and WARNING on 403.

The table is built once per app, at start-up (:func:`auth_lifespan`, the api router's lifespan), so a
malformed tokens file stops the service at start with the line number, never the line.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, cast, get_args

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.applications import Starlette

from service.config import AuthSettings, Settings
from service.errors import ForbiddenError, UnauthorizedError

__all__ = [
    "AUTH_RESPONSES",
    "REALM",
    "AuthConfigError",
    "Principal",
    "Role",
    "TokenTable",
    "auth_lifespan",
    "authorize",
    "bearer",
    "hash_token",
    "read_tokens_file",
    "token_line",
    "token_table",
]

logger = logging.getLogger(__name__)

REALM = "pacs-triage"

Role = Literal["reader", "admin"]
"""In ascending order of privilege: each role may do what the ones before it may."""

ROLES: tuple[Role, ...] = get_args(Role)

SAFE_METHODS = frozenset({"GET", "HEAD"})
"""RFC 9110 9.2.1 safe methods the API routes: a reader token is enough. Everything else needs admin."""

READER_ACTIONS = frozenset({("POST", "/v1/studies/{study_uid}/acknowledge")})
"""Writes a reader may make: a radiologist acknowledging a flag is the point of the worklist, and the
workstation token they use must not also be able to store studies or re-send deliveries."""

_NAME_RE = re.compile(r"[A-Za-z0-9._@:+-]{1,64}")
_SHA256_RE = re.compile(r"[0-9a-fA-F]{64}")
_STATE_KEY = "auth_tokens"

AUTH_RESPONSES: dict[int | str, dict[str, Any]] = {
    401: {"description": "No bearer token, or not a valid one (problem+json with WWW-Authenticate)"},
    403: {"description": "The token's role does not allow this method: a reader token on a POST"},
}
"""OpenAPI responses every protected operation may give, added where :func:`authorize` is attached."""


class AuthConfigError(ValueError):
    """The token configuration cannot be used; raised at start-up. Messages never contain a token or hash."""


@dataclass(frozen=True)
class Principal:
    """Who made a request: the token's name (for logs) and its role."""

    name: str
    role: Role

    def allows(self, needed: Role) -> bool:
        return ROLES.index(self.role) >= ROLES.index(needed)


def hash_token(token: str) -> str:
    """The SHA-256 hex digest a tokens file holds for ``token`` (UTF-8)."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def _check_name(name: str) -> str | None:
    if not _NAME_RE.fullmatch(name):
        return "a name is 1 to 64 letters, digits or . _ @ : + -"
    return None


def token_line(role: Role, name: str, token: str) -> str:
    """One ``role name sha256hex`` line of a tokens file, for ``token``.

    Raises
    ------
    ValueError
        An unknown role, a name that does not fit the file format, or an empty token.
    """
    if role not in ROLES:
        raise ValueError(f"role must be one of {', '.join(ROLES)}")
    problem = _check_name(name)
    if problem:
        raise ValueError(problem)
    if not token:
        raise ValueError("the token is empty")
    return f"{role} {name} {hash_token(token)}"


def read_tokens_file(path: Path) -> list[tuple[Principal, str]]:
    """Parse a tokens file: ``role name sha256hex`` per line; blank lines and ``#`` comments are skipped.

    Raises
    ------
    AuthConfigError
        The file cannot be read, or a line is malformed (the message names the line number and what is
        wrong with it, never its content: a plain token pasted by mistake must not reach a log).
    """
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        why = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        raise AuthConfigError(f"auth.tokens_file {path} cannot be read: {why}") from None
    entries: list[tuple[Principal, str]] = []
    names: dict[str, int] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        fields = raw.split("#", 1)[0].split()
        if not fields:
            continue
        where = f"auth.tokens_file {path}, line {number}"
        if len(fields) != 3:
            raise AuthConfigError(f"{where}: expected 'role name sha256hex', found {len(fields)} field(s)")
        role, name, digest = fields
        if role not in ROLES:
            raise AuthConfigError(f"{where}: the role must be one of {', '.join(ROLES)}")
        problem = _check_name(name)
        if problem:
            raise AuthConfigError(f"{where}: bad name: {problem}")
        if not _SHA256_RE.fullmatch(digest):
            raise AuthConfigError(
                f"{where}: the third field must be a SHA-256 as 64 hex digits"
                " (write lines with 'pacs-triage hash-token', never the token itself)"
            )
        if name in names:
            raise AuthConfigError(f"{where}: the name {name!r} is already used on line {names[name]}")
        names[name] = number
        entries.append((Principal(name, cast(Role, role)), digest.lower()))
    return entries


class TokenTable:
    """The known tokens as SHA-256 digests, each with its :class:`Principal`; or ``open``: no checks."""

    def __init__(self, entries: Iterable[tuple[Principal, str]], *, open: bool = False) -> None:
        self.open = open
        self._entries: list[tuple[Principal, bytes]] = []
        seen: dict[bytes, str] = {}
        for principal, hex_digest in entries:
            digest = bytes.fromhex(hex_digest)
            if digest in seen:
                raise AuthConfigError(
                    f"the tokens named {seen[digest]!r} and {principal.name!r} are the same token"
                )
            seen[digest] = principal.name
            self._entries.append((principal, digest))

    @classmethod
    def from_settings(cls, auth: AuthSettings) -> TokenTable:
        """Tokens from the environment lists (named ``auth.admin_tokens[0]``, ...) and the tokens file."""
        entries: list[tuple[Principal, str]] = []
        for role, tokens in (("admin", auth.admin_tokens), ("reader", auth.reader_tokens)):
            for i, secret in enumerate(tokens):
                name = f"auth.{role}_tokens[{i}]"
                token = secret.get_secret_value()
                if not token.strip():
                    raise AuthConfigError(f"{name} is empty")
                entries.append((Principal(name, cast(Role, role)), hash_token(token)))
        if auth.tokens_file is not None:
            entries.extend(read_tokens_file(auth.tokens_file))
        return cls(entries, open=auth.open)

    def __len__(self) -> int:
        return len(self._entries)

    def count(self, role: Role) -> int:
        return sum(1 for p, _ in self._entries if p.role == role)

    def lookup(self, token: str) -> Principal | None:
        """The principal whose digest matches ``token``; every entry is compared, in constant time each."""
        digest = hashlib.sha256(token.encode("utf-8")).digest()
        found: Principal | None = None
        for principal, known in self._entries:
            if hmac.compare_digest(digest, known):
                found = principal
        return found


def _log_mode(table: TokenTable) -> None:
    if table.open:
        logger.warning(
            "the HTTP API is OPEN (auth.open is true): no token is checked; for local use on loopback only"
        )
    elif not len(table):
        logger.warning(
            "no API tokens are configured (auth.admin_tokens, auth.reader_tokens, auth.tokens_file):"
            " every request but /healthz is refused with 401"
        )
    else:
        logger.info("API tokens: %d admin, %d reader", table.count("admin"), table.count("reader"))


def token_table(app: Starlette) -> TokenTable:
    """The app's token table, built from ``app.state.settings`` on first use and kept on ``app.state``."""
    table: TokenTable | None = getattr(app.state, _STATE_KEY, None)
    if table is None:
        settings: Settings = app.state.settings
        table = TokenTable.from_settings(settings.auth)
        _log_mode(table)
        setattr(app.state, _STATE_KEY, table)
    return table


@asynccontextmanager
async def auth_lifespan(app: Starlette) -> AsyncIterator[None]:
    """Build the token table at start-up: a bad tokens file stops the service then, not at a request."""
    token_table(app)
    yield


bearer = HTTPBearer(
    auto_error=False,  # a missing token is our 401 problem, with the RFC 6750 challenge
    scheme_name="bearer",
    bearerFormat="opaque",
    description=(
        "API token as `Authorization: Bearer <token>`. GET needs the reader role; POST needs admin."
        " Health probes and this document need none."
    ),
)

BearerDep = Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]


def _route(request: Request) -> str:
    """The route template (``/v1/studies/{study_uid}/result``): never a concrete path with a UID in it."""
    return str(getattr(request.scope.get("route"), "path", "?"))


async def authorize(request: Request, credentials: BearerDep) -> Principal | None:
    """The caller's :class:`Principal` if its role allows the method; None when ``auth.open``.

    Raises
    ------
    UnauthorizedError
        No bearer token, or one that is not in the table (401; RFC 6750 ``invalid_token`` for the latter).
    ForbiddenError
        A reader token on a method that needs admin (403).
    """
    table = token_table(request.app)
    if table.open:
        return None
    reader_may = request.method in SAFE_METHODS or (request.method, _route(request)) in READER_ACTIONS
    needed: Role = "reader" if reader_may else "admin"
    what = f"{request.method} {_route(request)}"
    client = request.client.host if request.client else "?"
    if credentials is None:
        logger.info("%s from %s refused: no bearer token", what, client)
        raise UnauthorizedError(
            f"this endpoint needs a bearer token with the {needed} role (Authorization: Bearer <token>)",
            realm=REALM,
        )
    principal = table.lookup(credentials.credentials)
    if principal is None:
        logger.warning("%s from %s refused: unknown bearer token", what, client)
        raise UnauthorizedError("the bearer token is not valid", realm=REALM, error="invalid_token")
    if not principal.allows(needed):
        logger.warning(
            "%s refused: token %r has role %s, needs %s", what, principal.name, principal.role, needed
        )
        raise ForbiddenError(
            f"the token has the {principal.role} role; {request.method} needs {needed}", realm=REALM
        )
    logger.debug("%s by token %r (%s)", what, principal.name, principal.role)
    return principal
