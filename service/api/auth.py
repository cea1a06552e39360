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
malformed tokens file stops the service at start with the line number, never the line. A token from the
environment shorter than ``auth.min_token_length`` stops it too, naming the entry (``auth.admin_tokens[0]``);
a tokens file holds only digests, whose token length cannot be known, so ``hash-token`` refuses short
tokens when the line is written.

People may sign in with OIDC instead (:mod:`service.api.oidc`): a bearer JWT is verified against the
issuer's keys and its subject becomes the principal. Whoever it is, the :class:`Principal` is what a write
records as its actor (:data:`CallerDep`): a name typed into a request body is only ever a note.

Wrong tokens are rate limited per client address (:mod:`service.api.ratelimit`): 429 with Retry-After
after ``auth.failed_auth_burst`` of them, one log line per burst.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import re
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, Any, cast

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.applications import Starlette

from service.api.oidc import OidcVerifier, looks_like_jwt
from service.api.principal import ANONYMOUS, ROLES, Principal, Role, check_name
from service.api.ratelimit import FailedAuthLimiter
from service.config import AuthSettings, Settings
from service.errors import AuthConfigError, ForbiddenError, NotReadyError, OidcError, UnauthorizedError

__all__ = [
    "AUTH_RESPONSES",
    "MIN_TOKEN_LENGTH",
    "REALM",
    "AuthGate",
    "CallerDep",
    "Principal",
    "Role",
    "TokenTable",
    "auth_lifespan",
    "authorize",
    "auth_gate",
    "bearer",
    "hash_token",
    "read_tokens_file",
    "token_line",
    "token_table",
]

logger = logging.getLogger(__name__)

REALM = "pacs-triage"

SAFE_METHODS = frozenset({"GET", "HEAD"})
"""RFC 9110 9.2.1 safe methods the API routes: a reader token is enough. Everything else needs admin."""

READER_ACTIONS = frozenset(
    {("POST", "/v1/studies/{study_uid}/acknowledge"), ("POST", "/v1/studies/{study_uid}/feedback")}
)
"""Writes a reader may make: a radiologist acknowledging a flag, or saying whether a finding was right, is
the point of the worklist, and the workstation token they use must not also be able to store studies or
re-send deliveries."""

MIN_TOKEN_LENGTH: int = AuthSettings.model_fields["min_token_length"].default
"""Shortest token ``hash-token`` writes a line for: the setting's default (24 characters, > 128 bits as
``secrets.token_urlsafe``; ``--generate`` makes 43)."""

_SHA256_RE = re.compile(r"[0-9a-fA-F]{64}")
_STATE_KEY = "auth_tokens"

AUTH_RESPONSES: dict[int | str, dict[str, Any]] = {
    401: {"description": "No bearer token, or not a valid one (problem+json with WWW-Authenticate)"},
    403: {"description": "The token's role does not allow this method: a reader token on a POST"},
    429: {"description": "Too many wrong tokens from this address (problem+json with Retry-After)"},
}
"""OpenAPI responses every protected operation may give, added where :func:`authorize` is attached."""


def hash_token(token: str) -> str:
    """The SHA-256 hex digest a tokens file holds for ``token`` (UTF-8)."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def token_line(role: Role, name: str, token: str, *, min_length: int = MIN_TOKEN_LENGTH) -> str:
    """One ``role name sha256hex`` line of a tokens file, for ``token``.

    Raises
    ------
    ValueError
        An unknown role, a name that does not fit the file format, or a token shorter than ``min_length``
        (``auth.min_token_length``: the file keeps only the digest, so this is the one place to check).
    """
    if role not in ROLES:
        raise ValueError(f"role must be one of {', '.join(ROLES)}")
    problem = check_name(name)
    if problem:
        raise ValueError(problem)
    if not token:
        raise ValueError("the token is empty")
    if len(token) < min_length:
        raise ValueError(f"the token has {len(token)} characters; at least {min_length} are required")
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
        problem = check_name(name)
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
        entries.append((Principal(name, role), digest.lower()))
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
                if len(token) < auth.min_token_length:
                    raise AuthConfigError(
                        f"{name} has {len(token)} characters; auth.min_token_length is"
                        f" {auth.min_token_length} (make one with 'pacs-triage hash-token --generate')"
                    )
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


def _log_mode(table: TokenTable, oidc: OidcVerifier | None) -> None:
    if table.open:
        logger.warning(
            "the HTTP API is OPEN (auth.open is true): no token is checked; for local use on loopback only"
        )
    elif not len(table) and oidc is None:
        logger.warning(
            "no API tokens are configured (auth.admin_tokens, auth.reader_tokens, auth.tokens_file):"
            " every request but /healthz is refused with 401"
        )
    else:
        logger.info(
            "API tokens: %d admin, %d reader; OIDC sign-in %s",
            table.count("admin"),
            table.count("reader"),
            "on" if oidc is not None else "off",
        )


class AuthGate:
    """What :func:`authorize` consults: the static tokens, the OIDC verifier (if configured), the limiter."""

    def __init__(self, table: TokenTable, oidc: OidcVerifier | None, limiter: FailedAuthLimiter) -> None:
        self.table = table
        self.oidc = oidc
        self.limiter = limiter


def auth_gate(app: Starlette) -> AuthGate:
    """The app's :class:`AuthGate`, built from ``app.state.settings`` on first use, kept on ``app.state``."""
    gate: AuthGate | None = getattr(app.state, _STATE_KEY, None)
    if gate is None:
        settings: Settings = app.state.settings
        auth = settings.auth
        table = TokenTable.from_settings(auth)
        oidc = OidcVerifier(auth) if auth.oidc_issuer and not table.open else None
        metrics = getattr(app.state, "metrics", None)
        limiter = FailedAuthLimiter(
            auth.failed_auth_burst,
            auth.failed_auth_per_minute,
            registry=metrics.registry if metrics is not None else None,
        )
        _log_mode(table, oidc)
        gate = AuthGate(table, oidc, limiter)
        setattr(app.state, _STATE_KEY, gate)
    return gate


def token_table(app: Starlette) -> TokenTable:
    """The app's token table (built with the rest of its :class:`AuthGate`)."""
    return auth_gate(app).table


@asynccontextmanager
async def auth_lifespan(app: Starlette) -> AsyncIterator[None]:
    """Build the token table at start-up: a bad tokens file stops the service then, not at a request."""
    token_table(app)
    yield


bearer = HTTPBearer(
    auto_error=False,  # a missing token is our 401 problem, with the RFC 6750 challenge
    scheme_name="bearer",
    bearerFormat="opaque token or OIDC JWT",
    description=(
        "API token as `Authorization: Bearer <token>`, or an OIDC JWT where `auth.oidc_issuer` is set."
        " GET needs the reader role; POST needs admin (acknowledging a flag: reader)."
        " Health probes and this document need none."
    ),
)

BearerDep = Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]


def _route(request: Request) -> str:
    """The route template (``/v1/studies/{study_uid}/result``): never a concrete path with a UID in it."""
    return str(getattr(request.scope.get("route"), "path", "?"))


async def _identify(gate: AuthGate, token: str, client: str, what: str) -> Principal:
    """The principal a presented token stands for; a wrong one costs the address an attempt."""
    if gate.oidc is not None and looks_like_jwt(token):
        try:
            return await asyncio.to_thread(gate.oidc.verify, token)
        except OidcError as exc:
            if exc.forbidden:
                logger.warning("%s refused: %s", what, exc.reason)
                raise ForbiddenError(exc.reason, realm=REALM) from None
            if exc.unavailable:  # the provider is down: not a guess, so no attempt is taken
                raise NotReadyError(exc.reason, part="Authorization") from None
            gate.limiter.failed(client, "invalid_jwt")
            logger.debug("%s from %s refused: %s", what, client, exc.reason)
            raise UnauthorizedError(
                f"the bearer JWT is not valid: {exc.reason}", realm=REALM, error="invalid_token"
            ) from None
    principal = gate.table.lookup(token)
    if principal is None:
        gate.limiter.failed(client, "invalid_token")
        logger.debug("%s from %s refused: unknown bearer token", what, client)
        raise UnauthorizedError("the bearer token is not valid", realm=REALM, error="invalid_token")
    return principal


async def authorize(request: Request, credentials: BearerDep) -> Principal:
    """The caller's :class:`Principal` if its role allows the method; :data:`ANONYMOUS` when ``auth.open``.

    Raises
    ------
    TooManyRequestsError
        The client address used up its wrong-token attempts (429 with Retry-After; the token is not
        even looked at).
    UnauthorizedError
        No bearer token, or one that is neither in the table nor a valid OIDC JWT (401; RFC 6750
        ``invalid_token`` for the latter).
    ForbiddenError
        A reader token on a method that needs admin, or a JWT with no mapped role (403).
    """
    gate = auth_gate(request.app)
    if gate.table.open:
        return ANONYMOUS
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
    gate.limiter.check(client)
    principal = await _identify(gate, credentials.credentials, client, what)
    if not principal.allows(needed):
        logger.warning("%s refused: %r has role %s, needs %s", what, principal.actor, principal.role, needed)
        raise ForbiddenError(
            f"the token has the {principal.role} role; {request.method} needs {needed}", realm=REALM
        )
    logger.debug("%s by %r (%s, %s)", what, principal.actor, principal.role, principal.via)
    return principal


CallerDep = Annotated[Principal, Depends(authorize)]
"""The authenticated caller, for routes that record who did something (the actor of every write).
FastAPI caches a dependency per request, so naming it again in a route costs no second check."""
