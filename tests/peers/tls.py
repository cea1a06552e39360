"""A throwaway PKI for DICOM TLS tests, made with the ``openssl`` CLI (the suite has no ``cryptography``).

Two certification authorities, so a test can show that a certificate from the wrong one is refused:

- ``ca``: our CA; ``server`` (CN 127.0.0.1, SAN IP 127.0.0.1 and DNS localhost, serverAuth) and ``client``
  (clientAuth) certificates signed by it;
- ``other_ca``: a stranger's CA; ``other_server`` and ``other_client`` signed by it (same names, so only
  the chain differs).

Keys are EC P-256 (``openssl genpkey`` takes milliseconds, RSA-2048 about a second each), unencrypted
PKCS#8 PEM, which DCMTK's ``+tls KEY CERT`` reads as is. Certificates are valid for two days.

Use the session fixture::

    def test_x(tls_pki: Pki) -> None:
        tls_pki.ca, tls_pki.server.cert, tls_pki.server.key, tls_pki.client.cert ...

Import it where needed: ``from tests.peers.tls import tls_pki``.
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

__all__ = ["KeyPair", "Pki", "make_pki", "tls_pki"]

DAYS = "2"
_SERVER_EXT = (
    "basicConstraints=critical,CA:FALSE\n"
    "keyUsage=critical,digitalSignature,keyAgreement\n"
    "extendedKeyUsage=serverAuth\n"
    "subjectAltName=IP:127.0.0.1,DNS:localhost\n"
    "subjectKeyIdentifier=hash\n"
    "authorityKeyIdentifier=keyid\n"
)
_CLIENT_EXT = (
    "basicConstraints=critical,CA:FALSE\n"
    "keyUsage=critical,digitalSignature,keyAgreement\n"
    "extendedKeyUsage=clientAuth\n"
    "subjectKeyIdentifier=hash\n"
    "authorityKeyIdentifier=keyid\n"
)


@dataclass(frozen=True)
class KeyPair:
    """A PEM certificate and its unencrypted PEM private key."""

    cert: Path
    key: Path


@dataclass(frozen=True)
class Pki:
    """Paths of everything :func:`make_pki` wrote (see the module docstring)."""

    ca: Path
    server: KeyPair
    client: KeyPair
    other_ca: Path
    other_server: KeyPair
    other_client: KeyPair


def _openssl(*args: str, cwd: Path) -> None:
    proc = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"openssl {' '.join(args)} failed:\n{proc.stderr}")


def _key(path: Path) -> None:
    _openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", path.name,
             cwd=path.parent)  # fmt: skip


def _ca(folder: Path, name: str) -> KeyPair:
    pair = KeyPair(folder / f"{name}.crt", folder / f"{name}.key")
    _key(pair.key)
    _openssl(
        "req", "-x509", "-new", "-key", pair.key.name, "-out", pair.cert.name, "-days", DAYS,
        "-subj", f"/O=pacs-triage tests/CN={name}",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        cwd=folder,
    )  # fmt: skip
    return pair


def _leaf(folder: Path, name: str, cn: str, ext: str, ca: KeyPair) -> KeyPair:
    pair = KeyPair(folder / f"{name}.crt", folder / f"{name}.key")
    _key(pair.key)
    (folder / f"{name}.ext").write_text(ext)
    _openssl("req", "-new", "-key", pair.key.name, "-out", f"{name}.csr", "-subj", f"/CN={cn}", cwd=folder)
    _openssl(
        "x509", "-req", "-in", f"{name}.csr", "-CA", ca.cert.name, "-CAkey", ca.key.name,
        "-CAcreateserial", "-days", DAYS, "-extfile", f"{name}.ext", "-out", pair.cert.name,
        cwd=folder,
    )  # fmt: skip
    return pair


def make_pki(folder: Path) -> Pki:
    """Write both CAs and their server and client certificates into ``folder`` (created if needed)."""
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command line tool is not installed")
    folder.mkdir(parents=True, exist_ok=True)
    ca = _ca(folder, "ca")
    other = _ca(folder, "other-ca")
    return Pki(
        ca=ca.cert,
        server=_leaf(folder, "server", "127.0.0.1", _SERVER_EXT, ca),
        client=_leaf(folder, "client", "MODALITY", _CLIENT_EXT, ca),
        other_ca=other.cert,
        other_server=_leaf(folder, "other-server", "127.0.0.1", _SERVER_EXT, other),
        other_client=_leaf(folder, "other-client", "MODALITY", _CLIENT_EXT, other),
    )


@pytest.fixture(scope="session")
def tls_pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """One throwaway PKI for the whole test session (about 0.1 s to make)."""
    return make_pki(tmp_path_factory.mktemp("pki"))
