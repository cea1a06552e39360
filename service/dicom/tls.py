"""DICOM TLS (PS3.15 Annex B, the BCP 195 secure transport profiles), for the listener and the client.

One module for both ends of an association, so they read certificates, refuse encrypted keys, set the
TLS 1.2 floor and put ssl's errors into words the same way.

**Listener** (:func:`server_tls`, :func:`handshake`): with ``dicom.tls_cert_file`` and ``dicom.tls_key_file``
the port speaks TLS only, 1.2 or later. ``tls_ca_file`` alone verifies the certificates clients send (one
from another CA is refused) but lets clients without one in; with ``tls_require_client_cert`` a client needs
a certificate from that CA, the usual DICOM node authentication. Settings that cannot work together, or
files that cannot be used, stop the start with one sentence naming the setting. The acceptor does each
handshake on the event loop with :data:`TLS_HANDSHAKE_TIMEOUT_S`, counted as a not-yet-associated
connection (:mod:`service.ingest.door`), so a silent connection (a port scan, a load balancer's TCP check)
stalls nobody.

**Client** (:class:`TlsClient`, used by :mod:`service.deliver.association`): we verify the
peer's certificate chain against the given CA file (else the system CAs) and, by default, that the
certificate names the host we dialled: a host name against its DNS subjectAltNames, an IP address (how most
hospital DICOM peers are configured) against its IP subjectAltNames, never against the CN (RFC 6125 as BCP
195 asks; Python's ssl does both). Without that check any certificate from a hospital-wide CA could stand in
for the PACS. A peer whose certificate does not name its address needs a new certificate, or
``check_hostname=False`` with a CA file that signs DICOM peers only: the chain is still verified. TLS 1.2 is
the floor (BCP 195; DCMTK's default "non-downgrading" profile refuses 1.1 too). A failed handshake, or the
peer's TLS alert right after it (TLS 1.3 servers refuse a client certificate only then), becomes a
:class:`DicomPeerError` with ``reason="tls"`` naming the cause: pynetdicom itself only logs it.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from service.config import DicomSettings
from service.errors import DicomPeerError

__all__ = [
    "TLS_HANDSHAKE_TIMEOUT_S",
    "TlsClient",
    "TrackingContext",
    "describe_tls",
    "handshake",
    "server_tls",
    "tls_failure",
    "tls_words",
]

logger = logging.getLogger(__name__)

TLS_HANDSHAKE_TIMEOUT_S = 10.0  # a handshake takes milliseconds on a hospital LAN; this only bounds a stall


def tls_words(exc: BaseException) -> str:
    """An ssl error in words: ``[X509: KEY_VALUES_MISMATCH] key values mismatch (_ssl.c:3926)`` → ``the key
    does not belong to the certificate``; ``certificate verify failed: ...``; a timeout, an errno."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"certificate verify failed: {exc.verify_message}"
    if isinstance(exc, ssl.SSLError):
        if exc.reason == "KEY_VALUES_MISMATCH":
            return "the key does not belong to the certificate"
        if exc.library == "SSL" and exc.reason is None:  # "[SSL] PEM lib": a file that is not PEM
            return "not a PEM certificate and key"
        return str(exc.reason or exc).replace("_", " ").lower()
    if isinstance(exc, TimeoutError):
        return f"no handshake within {TLS_HANDSHAKE_TIMEOUT_S:g} s"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror.lower()
    return str(exc)


def _readable(path: Path, what: str) -> None:
    """ssl says "No such file" without saying which file: check each one ourselves first."""
    try:
        path.open("rb").close()
    except OSError as exc:
        raise ValueError(f"{what} {path}: {exc.strerror or exc}") from exc


def _no_password(what: str) -> Callable[[], str]:
    """Without a password callback OpenSSL would prompt on the terminal for an encrypted key, and hang."""

    def refuse() -> str:
        raise ValueError(f"{what} is encrypted: give an unencrypted PEM key (readable by this service only)")

    return refuse


# ---- listener -----------------------------------------------------------------------------------------


async def handshake(writer: asyncio.StreamWriter, context: ssl.SSLContext, peer: str) -> bool:
    """The server side of the handshake on an accepted connection; False (logged) when it failed."""
    try:
        async with asyncio.timeout(TLS_HANDSHAKE_TIMEOUT_S):
            await writer.start_tls(context)
    except (OSError, TimeoutError, ValueError) as exc:
        if isinstance(exc, ssl.SSLEOFError | ConnectionResetError):
            # Port scans and TCP health checks connect and go: not worth a warning each.
            logger.debug("TLS connection from %s closed before the handshake", peer)
        else:
            logger.warning("TLS handshake with %s failed: %s", peer, _heard(exc))
        return False
    return True


def _heard(exc: BaseException) -> str:
    """:func:`tls_words` with what a listener's operator most likely needs to know."""
    words = tls_words(exc)
    reason = exc.reason if isinstance(exc, ssl.SSLError) else None
    if reason in ("WRONG_VERSION_NUMBER", "HTTP_REQUEST"):
        return f"{words} (a client without TLS on the TLS port?)"
    if reason and reason.endswith(("ALERT_UNKNOWN_CA", "ALERT_BAD_CERTIFICATE")):
        return f"{words} (the client does not trust our certificate)"
    return words


def server_tls(s: DicomSettings) -> ssl.SSLContext | None:
    """The listener's TLS context from the settings, or None for plain TCP; ValueError naming the setting."""
    cert, key, ca = s.tls_cert_file, s.tls_key_file, s.tls_ca_file
    if cert is None and key is None:
        stray = [
            n for n, v in (("tls_ca_file", ca), ("tls_require_client_cert", s.tls_require_client_cert)) if v
        ]
        if stray:
            raise ValueError(
                f"dicom.{stray[0]} is set but the listener has no TLS:"
                " set dicom.tls_cert_file and dicom.tls_key_file too"
            )
        return None
    if cert is None or key is None:
        missing = "dicom.tls_cert_file" if cert is None else "dicom.tls_key_file"
        raise ValueError(f"{missing} is missing: a TLS listener needs both certificate and key")
    if s.tls_require_client_cert and ca is None:
        raise ValueError(
            "dicom.tls_require_client_cert needs dicom.tls_ca_file, the CA client certificates must chain to"
        )
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    for name, path in (("tls_cert_file", cert), ("tls_key_file", key), ("tls_ca_file", ca)):
        if path is not None:
            _readable(path, f"dicom.{name}")
    try:
        ctx.load_cert_chain(cert, key, password=_no_password("dicom.tls_key_file"))
    except ssl.SSLError as exc:
        if exc.reason == "KEY_VALUES_MISMATCH":
            why = f"dicom.tls_key_file {key} is not the key of dicom.tls_cert_file {cert}"
        elif exc.reason is None:  # "[SSL] PEM lib"
            why = f"dicom.tls_cert_file {cert} or dicom.tls_key_file {key} is not PEM (or they are swapped)"
        else:
            why = f"dicom.tls_cert_file {cert} with dicom.tls_key_file {key}: {tls_words(exc)}"
        raise ValueError(why) from exc
    if ca is not None:
        try:
            ctx.load_verify_locations(cafile=ca)
        except ssl.SSLError as exc:
            raise ValueError(f"dicom.tls_ca_file {ca} holds no PEM certificate") from exc
        ctx.verify_mode = ssl.CERT_REQUIRED if s.tls_require_client_cert else ssl.CERT_OPTIONAL
    return ctx


def describe_tls(s: DicomSettings, ctx: ssl.SSLContext | None) -> str:
    if ctx is None:
        return "TLS off"
    if ctx.verify_mode == ssl.CERT_REQUIRED:
        clients = f"client certificate required from {s.tls_ca_file}"
    elif ctx.verify_mode == ssl.CERT_OPTIONAL:
        clients = f"client certificates verified against {s.tls_ca_file} when sent"
    else:
        clients = "no client certificates asked"
    return f"TLS 1.2+ with {s.tls_cert_file}, {clients}"


# ---- client -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TlsClient:
    """DICOM TLS as the requestor: whom we trust and, for peers that ask, who we are.

    Parameters
    ----------
    ca_file
        PEM CA bundle the peer's certificate must chain to; None trusts the system CAs (a public CA rarely
        signs a PACS: give the hospital's CA).
    cert_file, key_file
        Our PEM client certificate and its unencrypted key, for peers that require one (DCMTK's storescp
        ``+tls`` does by default). Both or neither.
    check_hostname
        Check that the certificate names the host or IP address we connect to (subjectAltName). See the
        module docstring before turning it off.
    """

    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    check_hostname: bool = True

    def __post_init__(self) -> None:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("a TLS client certificate needs its key and a key its certificate: give both")

    def context(self) -> ssl.SSLContext:
        """A fresh client context (files read now, so renewed certificates are picked up), TLS 1.2 or later.

        Raises
        ------
        ValueError
            A file is missing or unreadable, not PEM, the key is encrypted or does not match the certificate.
        """
        return self.tracking_context()

    def tracking_context(self) -> TrackingContext:
        """:meth:`context` as a :class:`TrackingContext`, for an association that must explain a failure."""
        ctx = TrackingContext(ssl.PROTOCOL_TLS_CLIENT)  # CERT_REQUIRED and check_hostname on
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.check_hostname = self.check_hostname
        if self.ca_file is None:
            ctx.load_default_certs(ssl.Purpose.SERVER_AUTH)
        else:
            _readable(self.ca_file, "TLS CA file")
            try:
                ctx.load_verify_locations(cafile=self.ca_file)
            except ssl.SSLError as exc:
                raise ValueError(f"TLS CA file {self.ca_file} holds no PEM certificate") from exc
        if self.cert_file is not None and self.key_file is not None:
            _readable(self.cert_file, "TLS client certificate")
            _readable(self.key_file, "TLS client key")
            try:
                ctx.load_cert_chain(self.cert_file, self.key_file, password=_no_password("the key"))
            except ssl.SSLError as exc:
                raise ValueError(
                    f"TLS client certificate {self.cert_file} and key {self.key_file}: {tls_words(exc)}"
                ) from exc
        return ctx


class TrackingSocket(ssl.SSLSocket):
    """Keeps the first TLS error on its context: pynetdicom catches handshake and read errors and only logs
    them, so without this a bad certificate would read as "connection failed" or "aborted"."""

    def _keep(self, exc: OSError) -> None:
        ctx = self.context
        if isinstance(ctx, TrackingContext) and ctx.error is None:
            ctx.error = exc

    def do_handshake(self, block: bool = False) -> None:
        try:
            super().do_handshake(block)
        except OSError as exc:
            self._keep(exc)
            raise

    def recv(self, buflen: int = 1024, flags: int = 0) -> bytes:
        try:
            return super().recv(buflen, flags)
        except ssl.SSLError as exc:  # TLS 1.3: a server refuses our certificate after the handshake
            self._keep(exc)
            raise


class TrackingContext(ssl.SSLContext):
    """A client context for one association: wraps sockets as :class:`TrackingSocket` and tracks them.

    pynetdicom 3.0.4 leaks the TLS socket of a failed handshake as it does the plain socket of a failed
    connect (see :class:`service.deliver.association.ScuAE`): ``sockets`` is the AE's list, so the AE
    closes both kinds.
    """

    sslsocket_class = TrackingSocket

    def __init__(self, protocol: int) -> None:  # noqa: ARG002 - ssl.SSLContext.__new__ takes it
        super().__init__()
        self.error: OSError | None = None
        self.sockets: list[socket.socket] = []

    def wrap_socket(self, *args: Any, **kwargs: Any) -> ssl.SSLSocket:
        wrapped = super().wrap_socket(*args, **kwargs)
        self.sockets.append(wrapped)
        return wrapped


def tls_failure(
    peer: str, host: str, exc: OSError, timeout: float, *, trusted: Path | None
) -> DicomPeerError:
    """One sentence for a failed handshake (or the peer's TLS alert right after it), with the likely fix.

    Certificate problems and the peer's alerts are permanent (``transient=False``): only a configuration
    change helps. A reset or an early EOF may be a peer restarting, or a port without TLS.
    """
    hint = ""
    transient = False
    if isinstance(exc, ssl.SSLCertVerificationError):
        text = f"certificate verify failed: {exc.verify_message}"
        if exc.verify_code in (2, 19, 20, 21):  # no issuer / self-signed in chain / local issuer / leaf
            where = f"the CA file {trusted}" if trusted else "the system CAs (no CA file given)"
            hint = f" (is its certificate issued by {where}?)"
        elif "mismatch" in (exc.verify_message or "").lower():
            hint = f" (its certificate must name {host} in its subjectAltName)"
    elif isinstance(exc, ssl.SSLError):
        text = tls_words(exc)
        reason = exc.reason or ""
        if "CERTIFICATE_REQUIRED" in reason or "HANDSHAKE_FAILURE" in reason or "BAD_CERTIFICATE" in reason:
            hint = " (does the peer want a client certificate we did not give, or refuse ours?)"
        elif "UNKNOWN_CA" in reason:
            hint = " (the peer does not trust the CA of our client certificate)"
        elif "PROTOCOL_VERSION" in reason:
            hint = " (the peer does not speak TLS 1.2 or later)"
        elif "WRONG_VERSION_NUMBER" in reason or "EOF" in reason or "RECORD" in reason:
            transient = True
            hint = " (is that port TLS at all?)"
    elif isinstance(exc, TimeoutError):
        transient = True
        text = f"no answer within {timeout:g} s"
    else:
        transient = True
        text = str(exc.strerror or exc).lower()
        hint = " (is that port TLS at all?)" if isinstance(exc, ConnectionError) else ""
    return DicomPeerError(
        f"TLS handshake with {peer} failed: {text}{hint}", reason="tls", transient=transient
    )
