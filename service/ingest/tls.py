"""DICOM TLS for the listener (PS3.15 Annex B, BCP 195): the server context from the settings, and errors in
words.

With ``tls_cert_file`` and ``tls_key_file`` the port speaks TLS only, 1.2 or later. ``tls_ca_file`` alone
verifies the certificates clients send (one from another CA is refused) but lets clients without one in;
with ``tls_require_client_cert`` a client needs a certificate from that CA, the usual DICOM node
authentication. Settings that cannot work together, or files that cannot be used, stop the start with one
sentence naming the setting. The acceptor does each handshake on the event loop with
:data:`TLS_HANDSHAKE_TIMEOUT_S`, counted as a not-yet-associated connection (:mod:`service.ingest.door`), so
a silent connection (a port scan, a load balancer's TCP check) stalls nobody.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from pathlib import Path

from service.config import DicomSettings

__all__ = ["TLS_HANDSHAKE_TIMEOUT_S", "describe_tls", "handshake", "server_tls", "tls_words"]

logger = logging.getLogger(__name__)

TLS_HANDSHAKE_TIMEOUT_S = 10.0  # a handshake takes milliseconds on a hospital LAN; this only bounds a stall


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
            logger.warning("TLS handshake with %s failed: %s", peer, tls_words(exc))
        return False
    return True


def tls_words(exc: BaseException) -> str:
    """An ssl error in words: ``certificate verify failed: ...``, ``peer did not return a certificate``."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"certificate verify failed: {exc.verify_message}"
    if isinstance(exc, ssl.SSLError) and exc.reason:
        words = exc.reason.replace("_", " ").lower()
        if exc.reason in ("WRONG_VERSION_NUMBER", "HTTP_REQUEST"):
            return f"{words} (a client without TLS on the TLS port?)"
        if exc.reason.endswith("ALERT_UNKNOWN_CA") or exc.reason.endswith("ALERT_BAD_CERTIFICATE"):
            return f"{words} (the client does not trust our certificate)"
        return words
    if isinstance(exc, TimeoutError):
        return f"no handshake within {TLS_HANDSHAKE_TIMEOUT_S:g} s"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror.lower()
    return str(exc)


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
        _check_readable(name, path)
    try:
        ctx.load_cert_chain(cert, key, password=_no_password)
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


def _check_readable(name: str, path: Path | None) -> None:
    if path is None:
        return
    try:
        path.open("rb").close()
    except OSError as exc:
        raise ValueError(f"dicom.{name} {path}: {exc.strerror or exc}") from exc


def _no_password() -> str:
    """Without a password callback OpenSSL would prompt on the terminal for an encrypted key, and hang."""
    raise ValueError("dicom.tls_key_file is encrypted: give an unencrypted PEM key (readable by us only)")
