"""Optional OpenID Connect bearer tokens for people: a JWT signed by the site's identity provider.

Static hashed tokens (:mod:`service.api.auth`) stay for machines; a radiologist signed in through the
site's OIDC provider presents its ID or access token (a JWS, RFC 7515) and the audit trail records that
person. Checked per OIDC Core 1.0 3.1.3.7 and RFC 7519 7.2: the signature against the issuer's JWKS
(RFC 7517; public-key algorithms only, never ``none`` or an HMAC that a leaked JWKS could forge), ``iss``
equal to ``auth.oidc_issuer``, ``aud`` containing ``auth.oidc_audience``, ``exp`` in the future (30 s
leeway for clock skew), ``nbf``/``iat`` if present. The role comes from ``auth.oidc_roles_claim`` (a list,
or a space-separated string as OAuth 2.0 ``scope``; dots walk into objects, e.g. Keycloak's
``realm_access.roles``) mapped through ``auth.oidc_admin_roles`` / ``auth.oidc_reader_roles``.

The JWKS comes from an ``https://`` (or loopback ``http://``) URL, fetched by PyJWT's client with its
cache (5 minutes; an unknown ``kid`` forces a refresh, at most every 30 s), or from a file, re-read when it
changes. Fetching blocks, so :func:`service.api.auth.authorize` calls :meth:`OidcVerifier.verify` in a
thread. Nothing of the token is logged; a failure reason names the check that failed, never a claim value.
"""

from __future__ import annotations

import json
import logging
import threading
from pathlib import Path
from typing import Any

import jwt

from service.api.principal import Principal, Role, check_name
from service.backoff import FailureLog
from service.config import AuthSettings
from service.errors import OidcError

__all__ = ["LEEWAY_SECONDS", "OidcVerifier", "looks_like_jwt"]

logger = logging.getLogger(__name__)

LEEWAY_SECONDS = 30
"""Clock skew tolerated on ``exp``, ``nbf`` and ``iat`` (RFC 7519 4.1.4 allows "some small leeway")."""


def looks_like_jwt(token: str) -> bool:
    """A compact JWS: three base64url parts, the header starting ``{"`` (``eyJ``). Static tokens from
    ``hash-token --generate`` never contain a dot, so the two kinds cannot be confused."""
    return token.count(".") == 2 and token.startswith("eyJ")


class _FileKeys:
    """A JWKS file, re-read when its modification time changes (a rotated key needs no restart)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._mtime: float | None = None
        self._keys: jwt.PyJWKSet | None = None
        self._lock = threading.Lock()

    def key(self, kid: str | None) -> Any:
        with self._lock:
            try:
                mtime = self.path.stat().st_mtime
                if self._keys is None or mtime != self._mtime:
                    self._keys = jwt.PyJWKSet.from_dict(json.loads(self.path.read_text(encoding="utf-8")))
                    self._mtime = mtime
            except (OSError, ValueError, jwt.PyJWKSetError) as exc:
                raise OidcError(f"the JWKS file cannot be read ({type(exc).__name__})") from None
            keys = self._keys.keys
        if kid is None:
            if len(keys) == 1:
                return keys[0].key
            raise OidcError("the JWT header has no kid and the JWKS holds several keys")
        for k in keys:
            if k.key_id == kid:
                return k.key
        raise OidcError("no key in the JWKS matches the JWT's kid")


class OidcVerifier:
    """Verifies OIDC JWTs against ``auth.oidc_*`` settings; built once per app when an issuer is set."""

    def __init__(self, auth: AuthSettings) -> None:
        assert auth.oidc_issuer and auth.oidc_audience and auth.oidc_jwks
        self.issuer = auth.oidc_issuer
        self.audience = auth.oidc_audience
        self.algorithms = list(auth.oidc_algorithms)
        self.roles_claim = auth.oidc_roles_claim.split(".")
        self.name_claim = auth.oidc_name_claim
        self.admin_roles = frozenset(auth.oidc_admin_roles)
        self.reader_roles = frozenset(auth.oidc_reader_roles)
        source = auth.oidc_jwks
        self._fetching = FailureLog(logger, f"OIDC JWKS fetch from {source}")
        if source.startswith(("https://", "http://")):
            self._client: jwt.PyJWKClient | None = jwt.PyJWKClient(source, lifespan=300, timeout=10)
            self._file: _FileKeys | None = None
        else:
            self._client, self._file = None, _FileKeys(Path(source))

    def _key(self, token: str) -> Any:
        if self._client is not None:
            try:
                key = self._client.get_signing_key_from_jwt(token).key
            except jwt.PyJWKClientConnectionError as exc:
                self._fetching.failed(type(exc).__name__)  # one line per outage, not per request
                why = "the identity provider's keys cannot be fetched now"
                raise OidcError(why, unavailable=True) from None
            except (jwt.PyJWKClientError, jwt.DecodeError) as exc:
                raise OidcError(f"no signing key for this JWT ({type(exc).__name__})") from None
            self._fetching.succeeded()
            return key
        assert self._file is not None
        try:
            kid = jwt.get_unverified_header(token).get("kid")
        except jwt.DecodeError:
            raise OidcError("the JWT header cannot be decoded") from None
        return self._file.key(kid if isinstance(kid, str) else None)

    def _role(self, claims: dict[str, Any]) -> Role:
        value: Any = claims
        for step in self.roles_claim:
            value = value.get(step) if isinstance(value, dict) else None
        if isinstance(value, str):  # OAuth 2.0 scope style: space-separated
            value = value.split()
        roles = {v for v in value if isinstance(v, str)} if isinstance(value, list) else set()
        if roles & self.admin_roles:
            return "admin"
        if roles & self.reader_roles:
            return "reader"
        raise OidcError(
            f"the token carries none of the roles this service maps (claim {'.'.join(self.roles_claim)})",
            forbidden=True,
        )

    def _name(self, claims: dict[str, Any]) -> str:
        for claim in (self.name_claim, "sub"):
            value = claims.get(claim)
            if isinstance(value, str) and check_name(value) is None:
                return value
        raise OidcError(f"neither {self.name_claim} nor sub is a usable name (letters, digits, . _ @ : + -)")

    def verify(self, token: str) -> Principal:
        """The person the JWT names, with the role its claims map to. Blocking (may fetch the JWKS).

        Raises
        ------
        OidcError
            Any failed check; ``forbidden`` when only the role mapping failed.
        """
        key = self._key(token)
        try:
            claims = jwt.decode(
                token,
                key,
                algorithms=self.algorithms,
                audience=self.audience,
                issuer=self.issuer,
                leeway=LEEWAY_SECONDS,
                options={"require": ["exp", "iss", "aud"]},
            )
        except jwt.PyJWTError as exc:
            raise OidcError(f"the JWT does not verify ({type(exc).__name__})") from None
        return Principal(self._name(claims), self._role(claims), "oidc")
