"""OIDC bearer JWTs (service.api.oidc): real RS256 tokens signed in the test with an RSA key generated in
the test, checked against a JWKS in a file and one served by a loopback HTTP server."""

from __future__ import annotations

import hashlib
import hmac
import http.server
import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from pydicom.uid import generate_uid

from tests.service.conftest import running_app
from tests.service.dicom_factory import chest

pytestmark = pytest.mark.anyio

ISSUER = "https://idp.hospital.test/realms/radiology"
AUDIENCE = "pacs-triage"
MACHINE = "machine-token-0123456789abcdef"


class Idp:
    """A signing key and its JWKS, as an identity provider publishes them (RFC 7517)."""

    def __init__(self, kid: str = "key-1") -> None:
        self.kid = kid
        self.key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        public = jwt.algorithms.RSAAlgorithm.to_jwk(self.key.public_key(), as_dict=True)
        self.jwks = {"keys": [{**public, "kid": kid, "use": "sig", "alg": "RS256"}]}

    def token(self, **overrides: Any) -> str:
        now = int(time.time())
        claims: dict[str, Any] = {
            "iss": ISSUER,
            "aud": AUDIENCE,
            "sub": "8f14e45f-ceea-467f-a0e6-0f1c4a3e2b1d",
            "preferred_username": "dr.smith",
            "iat": now,
            "exp": now + 300,
            "realm_access": {"roles": ["radiologist"]},
        }
        claims.update(overrides)
        claims = {k: v for k, v in claims.items() if v is not None}
        return jwt.encode(claims, self.key, algorithm="RS256", headers={"kid": self.kid})

    def public_pem(self) -> bytes:
        return self.key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )


def _auth(jwks: str) -> dict[str, Any]:
    return {
        "open": False,
        "admin_tokens": [MACHINE],
        "oidc_issuer": ISSUER,
        "oidc_audience": AUDIENCE,
        "oidc_jwks": jwks,
        "oidc_roles_claim": "realm_access.roles",
        "oidc_reader_roles": ["radiologist"],
        "oidc_admin_roles": ["triage-admin"],
        "failed_auth_burst": 1000,
    }


def _bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture
def jwks_server() -> Iterator[tuple[Idp, str, list[str]]]:
    """A loopback HTTP server publishing an :class:`Idp`'s JWKS; yields the idp, the URL and the paths hit."""
    idp = Idp()
    hits: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            hits.append(self.path)
            body = json.dumps(idp.jwks).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *_args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield idp, f"http://127.0.0.1:{server.server_address[1]}/certs", hits
    finally:
        server.shutdown()
        server.server_close()


async def test_a_signed_in_radiologist_is_the_actor(make_settings, tmp_path: Path) -> None:
    idp = Idp()
    jwks = tmp_path / "jwks.json"
    jwks.write_text(json.dumps(idp.jwks))
    async with running_app(make_settings(auth=_auth(str(jwks)))) as (_app, client):
        study_uid = generate_uid()
        r = await client.post(
            "/v1/studies",
            content=chest(study_uid=study_uid),
            headers={**_bearer(MACHINE), "Content-Type": "application/dicom"},
        )
        assert r.status_code == 202, r.text
        token = idp.token()
        assert (await client.get("/v1/worklist", headers=_bearer(token))).status_code == 200
        ack = await client.post(
            f"/v1/studies/{study_uid}/acknowledge", json={"by": "dr.chief"}, headers=_bearer(token)
        )
        assert ack.status_code == 200, ack.text
        assert ack.json()["acknowledged_by"] == "oidc:dr.smith"
        # A reader role may not store studies; an admin role may.
        store = {"Content-Type": "application/dicom"}
        r = await client.post("/v1/studies", content=chest(), headers={**store, **_bearer(token)})
        assert r.status_code == 403
        admin = idp.token(preferred_username="it.admin", realm_access={"roles": ["triage-admin"]})
        r = await client.post("/v1/studies", content=chest(), headers={**store, **_bearer(admin)})
        assert r.status_code == 202, r.text
        # No usable preferred_username: the subject names the person.
        anonymous = idp.token(preferred_username="has spaces")
        ack = await client.post(f"/v1/studies/{study_uid}/acknowledge", json={}, headers=_bearer(anonymous))
        assert ack.json()["acknowledged_by"] == "oidc:8f14e45f-ceea-467f-a0e6-0f1c4a3e2b1d"


async def test_tokens_that_must_not_pass(make_settings, tmp_path: Path) -> None:
    idp, stranger = Idp(), Idp()
    jwks = tmp_path / "jwks.json"
    jwks.write_text(json.dumps(idp.jwks))
    now = int(time.time())
    claims = {"iss": ISSUER, "aud": AUDIENCE, "sub": "x", "exp": now + 300, "roles": ["radiologist"]}
    cases = {
        "expired": (idp.token(exp=now - 3600, iat=now - 7200), 401),
        "other audience": (idp.token(aud="another-service"), 401),
        "other issuer": (idp.token(iss="https://evil.test/"), 401),
        "no exp": (idp.token(exp=None), 401),
        "signed by another key": (stranger.token(), 401),
        "alg none": (_unsigned(claims, "none", b""), 401),
        # the classic confusion: the public key used as an HMAC secret
        "HS256 with the public key": (_unsigned(claims, "HS256", idp.public_pem()), 401),
        "tampered payload": (_tamper(idp.token()), 401),
        "no mapped role": (idp.token(realm_access={"roles": ["nurse"]}), 403),
    }
    async with running_app(make_settings(auth=_auth(str(jwks)))) as (_app, client):
        for what, (token, status) in cases.items():
            r = await client.get("/v1/worklist", headers=_bearer(token))
            assert r.status_code == status, f"{what}: {r.status_code} {r.text}"
            assert r.headers["content-type"].startswith("application/problem+json"), what
            if status == 401:
                assert 'error="invalid_token"' in r.headers["www-authenticate"], what
        # Static machine tokens still work beside OIDC.
        assert (await client.get("/v1/worklist", headers=_bearer(MACHINE))).status_code == 200


def _b64(data: bytes) -> str:
    return jwt.utils.base64url_encode(data).decode()


def _unsigned(claims: dict[str, Any], alg: str, secret: bytes) -> str:
    """A JWS built by hand (PyJWT refuses to make these): ``none``, or HMAC with ``secret``."""
    signing_input = (
        f"{_b64(json.dumps({'alg': alg, 'kid': 'key-1'}).encode())}.{_b64(json.dumps(claims).encode())}"
    )
    signature = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest() if secret else b""
    return f"{signing_input}.{_b64(signature)}"


def _tamper(token: str) -> str:
    header, payload, signature = token.split(".")
    claims = json.loads(jwt.utils.base64url_decode(payload))
    claims["realm_access"] = {"roles": ["triage-admin"]}
    forged = jwt.utils.base64url_encode(json.dumps(claims).encode()).decode()
    return f"{header}.{forged}.{signature}"


async def test_jwks_from_a_url_is_fetched_once_and_cached(make_settings, jwks_server) -> None:
    idp, url, hits = jwks_server
    async with running_app(make_settings(auth=_auth(url))) as (_app, client):
        for _ in range(5):
            r = await client.get("/v1/worklist", headers=_bearer(idp.token()))
            assert r.status_code == 200, r.text
    assert hits == ["/certs"]


async def test_an_unreachable_identity_provider_is_503_not_a_guess(make_settings, caplog) -> None:
    idp = Idp()
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{sock.getsockname()[1]}/certs"
    auth = {**_auth(url), "failed_auth_burst": 3}
    async with running_app(make_settings(auth=auth)) as (_app, client):
        token = idp.token()
        codes = [(await client.get("/v1/worklist", headers=_bearer(token))).status_code for _ in range(6)]
        assert codes == [503] * 6  # never 429: the provider's outage costs the caller no attempt
        assert (await client.get("/v1/worklist", headers=_bearer(MACHINE))).status_code == 200
    outage = [r for r in caplog.records if "OIDC JWKS fetch" in r.getMessage()]
    assert len(outage) == 1 and outage[0].levelname == "WARNING"  # one line for the outage
