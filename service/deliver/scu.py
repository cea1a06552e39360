"""The DICOM client (SCU): C-ECHO and C-STORE to a peer such as the PACS, for the CLI and the delivery outbox.

pynetdicom does the protocol (ACSE, DIMSE, fragmentation); this module decides what to propose, turns every
way an association can fail into one :class:`DicomPeerError` sentence, and reports each object's fate.

**Presentation contexts from the objects.** A requestor may propose at most 128 contexts (their IDs are the
odd numbers 1-255, PS3.8 9.3.2.2), fewer than there are storage SOP classes, so proposing "everything" is not
an option. For each SOP class among the objects we propose one context per non-native transfer syntax found
(JPEG, JPEG 2000, RLE, deflate...), that syntax alone, so a peer that accepts it gets the object as stored;
plus one context offering Explicit then Implicit VR Little Endian. pynetdicom converts uncompressed objects
to whichever of those the peer picked; a compressed object whose own syntax was refused is decompressed by
pydicom and sent uncompressed (``decompress_fallback``), as DICOM routers do. More than 128 contexts →
several associations, each SOP class kept in one.

**Failures.** No association at all (host unknown, port closed, timeout, A-ASSOCIATE-RJ, no context
accepted) raises :class:`DicomPeerError`: nothing was sent, so the caller retries everything. Once objects
flow, each gets a :class:`SendOutcome`; an association that aborts mid-way marks the rest "not sent" instead
of raising, so the outbox retries just those (the one in flight may have been stored: resending it is safe,
a PACS keeps one copy per SOP Instance UID).

**TCP_NODELAY.** pynetdicom sets only SO_REUSEADDR on its sockets; with Nagle on, each C-STORE can wait
~40 ms for a delayed ACK (../shared/PEERS.md). Our AE subclass sets TCP_NODELAY on each socket it creates,
before it connects.

**TLS** (PS3.15 Annex B, the BCP 195 secure transport profiles): pass a :class:`TlsClient`. We verify the
peer's certificate chain against the given CA file (else the system CAs) and, by default, that the
certificate names the host we dialled: a host name against its DNS subjectAltNames, an IP address (how most
hospital DICOM peers are configured) against its IP subjectAltNames, never against the CN (RFC 6125 as BCP
195 asks; Python's ssl does both). Without that check any certificate from a hospital-wide CA could stand in
for the PACS. A peer whose certificate does not name its address needs a new certificate, or
``check_hostname=False`` with a CA file that signs DICOM peers only: the chain is still verified. TLS 1.2 is
the floor (BCP 195; DCMTK's default "non-downgrading" profile refuses 1.1 too). A failed handshake, or the
peer's TLS alert right after it (TLS 1.3 servers refuse a client certificate only then), becomes a
:class:`DicomPeerError` with ``reason="tls"`` naming the cause: pynetdicom itself only logs it.

**No PHI in logs.** We log peers, counts, timings, statuses; SOP Instance UIDs only at DEBUG; never a dataset.
"""

from __future__ import annotations

import copy
import logging
import re
import socket
import ssl
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, build_context, evt
from pynetdicom.association import Association
from pynetdicom.pdu import A_ASSOCIATE_RJ
from pynetdicom.pdu_primitives import A_ASSOCIATE
from pynetdicom.presentation import PresentationContext
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]  # made at import
from pynetdicom.status import GENERAL_STATUS, STORAGE_SERVICE_CLASS_STATUS
from pynetdicom.transport import AddressInformation, AssociationSocket

from service.dicom.ae import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME
from service.errors import TriageError

__all__ = [
    "DEFAULT_CALLING_AE",
    "DicomPeerError",
    "EchoResult",
    "Peer",
    "SendOutcome",
    "TlsClient",
    "check_ae_title",
    "echo",
    "send",
]

logger = logging.getLogger(__name__)

DEFAULT_CALLING_AE = "PACS_TRIAGE"
DEFAULT_MAX_PDU = 16382  # pynetdicom's default; only limits what the peer sends us (small responses)
MAX_CONTEXTS = 128  # PS3.8 9.3.2.2: presentation context IDs are odd integers 1-255
# PS3.4 B.2.3: success, and the warnings under which the object was stored anyway.
OK_STATUSES = frozenset({0x0000, 0xB000, 0xB006, 0xB007})
_NATIVE = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
_AE_FORBIDDEN = re.compile(r"[\\\x00-\x1f\x7f]")

PeerFailure = Literal["unreachable", "timeout", "rejected", "aborted", "no-contexts", "tls"]


def check_ae_title(value: str, what: str = "AE title") -> str:
    """Return ``value`` without its (insignificant) spaces, or raise ValueError (PS3.5 6.2, VR AE)."""
    title = value.strip(" ")
    if not 1 <= len(title) <= 16:
        raise ValueError(f"{what} {value!r} must be 1 to 16 characters")
    if not title.isascii() or _AE_FORBIDDEN.search(title):
        raise ValueError(f"{what} {value!r} must be ASCII without backslash or control characters")
    return title


@dataclass(frozen=True)
class Peer:
    """A DICOM application entity on the network; written ``AE@host:port`` (``AE@[::1]:104`` for IPv6)."""

    ae_title: str
    host: str
    port: int

    def __post_init__(self) -> None:
        object.__setattr__(self, "ae_title", check_ae_title(self.ae_title, "called AE title"))
        if not self.host or any(c.isspace() for c in self.host) or "@" in self.host:
            raise ValueError(f"host {self.host!r} is not a host name or address")
        if not 1 <= self.port <= 65535:
            raise ValueError(f"port {self.port} is not between 1 and 65535")

    @classmethod
    def parse(cls, text: str) -> Peer:
        """``"PACS@10.0.0.5:104"`` → Peer; ValueError with the expected form for anything else."""
        form = "expected AE@host:port, e.g. PACS@10.0.0.5:104 or PACS@[::1]:104"
        ae_title, at, address = text.strip().rpartition("@")
        if not at or not ae_title:
            raise ValueError(f"peer {text!r}: {form}")
        if address.startswith("["):
            host, bracket, rest = address[1:].partition("]")
            colon, port_text = rest[:1], rest[1:]
            if not bracket or colon != ":":
                raise ValueError(f"peer {text!r}: {form}")
        else:
            host, colon, port_text = address.rpartition(":")
            if not colon or ":" in host:
                raise ValueError(f"peer {text!r}: {form}")
        if not (port_text.isascii() and port_text.isdigit()):
            raise ValueError(f"peer {text!r}: port {port_text!r} is not a number")
        return cls(ae_title, host, int(port_text))

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.ae_title}@{host}:{self.port}"


class DicomPeerError(TriageError):
    """No association with the peer: nothing was sent. ``reason`` says which way it failed.

    ``transient`` is False for a permanent A-ASSOCIATE-RJ (e.g. our AE title is not configured there) and
    for a certificate that fails verification: retrying will not help until someone changes a configuration.
    """

    http_status = 502
    slug = "dicom-peer"
    title = "DICOM peer unavailable"

    def __init__(self, detail: str, *, reason: PeerFailure, transient: bool = True) -> None:
        super().__init__(detail)
        self.reason: PeerFailure = reason
        self.transient = transient


@dataclass(frozen=True)
class EchoResult:
    """A C-ECHO answer: DIMSE status and seconds from connecting to the C-ECHO-RSP (what a user waits)."""

    status: int
    seconds: float

    @property
    def ok(self) -> bool:
        return self.status == 0x0000


@dataclass(frozen=True)
class SendOutcome:
    """One object's fate: ``status`` is None when no C-STORE-RSP came; ``error`` is set whenever not ok."""

    sop_instance_uid: str
    status: int | None
    ok: bool
    error: str | None = None


# ---- TLS ----------------------------------------------------------------------------------------------


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
        return self._context()

    def _context(self) -> _TlsContext:
        ctx = _TlsContext(ssl.PROTOCOL_TLS_CLIENT)  # CERT_REQUIRED and check_hostname on
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
                ctx.load_cert_chain(self.cert_file, self.key_file, password=_no_password)
            except ssl.SSLError as exc:
                raise ValueError(
                    f"TLS client certificate {self.cert_file} and key {self.key_file}: {_ssl_words(exc)}"
                ) from exc
        return ctx


def _readable(path: Path, what: str) -> None:
    """ssl says "No such file" without saying which file: check each one ourselves first."""
    try:
        path.open("rb").close()
    except OSError as exc:
        raise ValueError(f"{what} {path}: {exc.strerror or exc}") from exc


def _no_password() -> str:
    """Without a password callback OpenSSL would prompt on the terminal for an encrypted key, and hang."""
    raise ValueError("the key is encrypted: give an unencrypted PEM key (readable by this service only)")


def _ssl_words(exc: ssl.SSLError) -> str:
    """``[X509: KEY_VALUES_MISMATCH] key values mismatch (_ssl.c:3926)`` → ``key values mismatch``."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"certificate verify failed: {exc.verify_message}"
    if exc.reason == "KEY_VALUES_MISMATCH":
        return "the key does not belong to the certificate"
    if exc.library == "SSL" and exc.reason is None:  # "[SSL] PEM lib": a file that is not PEM
        return "not a PEM certificate and key"
    return str(exc.reason or exc).replace("_", " ").lower()


class _TlsSocket(ssl.SSLSocket):
    """Keeps the first TLS error on its context: pynetdicom catches handshake and read errors and only logs
    them, so without this a bad certificate would read as "connection failed" or "aborted"."""

    def _keep(self, exc: OSError) -> None:
        ctx = self.context
        if isinstance(ctx, _TlsContext) and ctx.error is None:
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


class _TlsContext(ssl.SSLContext):
    """A client context for one association: wraps sockets as :class:`_TlsSocket` and tracks them.

    pynetdicom 3.0.4 leaks the TLS socket of a failed handshake as it does the plain socket of a failed
    connect (see :class:`_AE`): ``sockets`` is the AE's list, so the AE closes both kinds.
    """

    sslsocket_class = _TlsSocket

    def __init__(self, protocol: int) -> None:  # noqa: ARG002 - ssl.SSLContext.__new__ takes it
        super().__init__()
        self.error: OSError | None = None
        self.sockets: list[socket.socket] = []

    def wrap_socket(self, *args: Any, **kwargs: Any) -> ssl.SSLSocket:
        wrapped = super().wrap_socket(*args, **kwargs)
        self.sockets.append(wrapped)
        return wrapped


def _tls_failure(peer: Peer, exc: OSError, timeout: float, *, trusted: Path | None) -> DicomPeerError:
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
            hint = f" (its certificate must name {peer.host} in its subjectAltName)"
    elif isinstance(exc, ssl.SSLError):
        text = _ssl_words(exc)
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


# ---- associations -------------------------------------------------------------------------------------


@dataclass
class _Watch:
    """What pynetdicom's events told us, to explain a failed association."""

    opened: bool = False
    accepted: bool = False
    rejection: A_ASSOCIATE | None = None


def _handle_conn_open(_event: evt.Event, watch: _Watch) -> None:
    watch.opened = True


def _handle_accepted(_event: evt.Event, watch: _Watch) -> None:
    watch.accepted = True


def _handle_pdu_recv(event: evt.Event, watch: _Watch) -> None:
    """Keep an A-ASSOCIATE-RJ as it arrives: when the peer closes the connection right after it (storescp
    ``--refuse`` does), pynetdicom 3.0.4 may see the closed socket first and report a plain abort."""
    pdu = event.pdu
    if isinstance(pdu, A_ASSOCIATE_RJ):
        watch.rejection = pdu.to_primitive()


class _AE(AE):
    """An AE whose sockets have TCP_NODELAY on, and that closes each socket once its association is over.

    Both go through the one place pynetdicom creates a socket (bound, not yet connected). The closing is
    needed because pynetdicom 3.0.4 leaks the socket of a failed TCP connect: ``AssociationSocket.connect``
    calls ``shutdown()`` on the unconnected socket, which raises before ``close()`` (pynetdicom#979, fixed
    upstream by #999); the ResourceWarning at garbage collection fails tests that treat warnings as errors.
    With TLS, pynetdicom wraps that socket while connecting (the plain one is then detached and closing it
    does nothing); the wrapped socket joins ``sockets`` through :class:`_TlsContext`.
    """

    def __init__(self, ae_title: str) -> None:
        super().__init__(ae_title=ae_title)
        self.sockets: list[socket.socket] = []

    def _create_socket(
        self, assoc: Association, address: AddressInformation, tls_args: tuple[ssl.SSLContext, str] | None
    ) -> AssociationSocket:
        sock = super()._create_socket(assoc, address, tls_args)
        if sock.socket is not None:
            sock.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.sockets.append(sock.socket)
        return sock

    def close_sockets(self) -> None:
        while self.sockets:
            self.sockets.pop().close()  # a no-op for sockets pynetdicom closed itself


def _make_ae(calling_ae: str, timeout: float) -> _AE:
    ae = _AE(ae_title=check_ae_title(calling_ae, "calling AE title"))
    # Who we are, in the A-ASSOCIATE-RQ user information (PS3.7 D.3.3.2), not pynetdicom's defaults.
    ae.implementation_class_uid = IMPLEMENTATION_CLASS_UID
    ae.implementation_version_name = IMPLEMENTATION_VERSION_NAME
    ae.connection_timeout = timeout
    ae.acse_timeout = timeout
    ae.dimse_timeout = timeout
    ae.network_timeout = timeout
    return ae


def _associate(
    ae: _AE,
    peer: Peer,
    contexts: list[PresentationContext],
    *,
    timeout: float,
    max_pdu: int,
    tls: TlsClient | None = None,
) -> Association:
    """An established association, or DicomPeerError saying why not."""
    watch = _Watch()
    tls_context: _TlsContext | None = None
    if tls is not None:
        tls_context = tls._context()
        tls_context.sockets = ae.sockets
    handlers: list[Any] = [  # pynetdicom's own annotation is an invariant list of a union
        (evt.EVT_CONN_OPEN, _handle_conn_open, [watch]),
        (evt.EVT_ACCEPTED, _handle_accepted, [watch]),
        (evt.EVT_PDU_RECV, _handle_pdu_recv, [watch]),
    ]
    started = time.monotonic()
    try:
        assoc = ae.associate(
            peer.host,
            peer.port,
            contexts,
            ae_title=peer.ae_title,
            max_pdu=max_pdu,
            evt_handlers=handlers,
            tls_args=None if tls_context is None else (tls_context, peer.host),  # host: what we verify
        )
    except OSError as exc:  # socket.gaierror while resolving the host name
        raise DicomPeerError(
            f"cannot resolve host of {peer}: {exc.strerror or exc}", reason="unreachable"
        ) from exc
    if assoc.is_established:
        return assoc
    if tls_context is not None and tls_context.error is not None:
        error = _tls_failure(peer, tls_context.error, timeout, trusted=tls.ca_file if tls else None)
    else:
        error = _why_not(assoc, peer, watch, time.monotonic() - started, timeout, len(contexts))
    _finish(assoc)
    raise error


def _why_not(
    assoc: Association, peer: Peer, watch: _Watch, elapsed: float, timeout: float, n_contexts: int
) -> DicomPeerError:
    rj = watch.rejection or (assoc.acceptor.primitive if assoc.is_rejected else None)
    if rj is not None:  # the A-ASSOCIATE-RJ (PS3.8 9.3.4: result, source, reason/diagnostic)
        reason = rj.reason_str[:1].lower() + rj.reason_str[1:]
        kind = "transient" if rj.result == 0x02 else "permanent"
        return DicomPeerError(
            f"association rejected by {peer}: {reason} ({kind}, from the {rj.source_str.lower()})",
            reason="rejected",
            transient=rj.result == 0x02,
        )
    if not watch.opened:
        if elapsed >= 0.9 * timeout:
            return DicomPeerError(
                f"cannot connect to {peer}: timed out after {timeout:g} s", reason="timeout"
            )
        return DicomPeerError(
            f"cannot connect to {peer}: {_connect_error(peer, timeout)}", reason="unreachable"
        )
    if watch.accepted:
        return DicomPeerError(
            f"{peer} accepted the association but none of the {n_contexts} proposed presentation contexts",
            reason="no-contexts",
            transient=False,
        )
    if elapsed >= 0.9 * timeout:
        return DicomPeerError(
            f"no answer to the association request from {peer} within {timeout:g} s", reason="timeout"
        )
    return DicomPeerError(f"{peer} aborted the association request", reason="aborted")


def _connect_error(peer: Peer, timeout: float) -> str:
    """Why TCP failed: pynetdicom only logs it, so connect once more to get the errno's words."""
    try:
        with socket.create_connection((peer.host, peer.port), timeout=min(timeout, 5.0)):
            return "connection failed (the port answers now: try again)"
    except OSError as exc:
        return str(exc.strerror or exc).lower()


def _finish(assoc: Association, *, abort: bool = False) -> None:
    """Release (or abort) and close the sockets.

    Abort after a missing response: pynetdicom may not have processed the peer's A-ABORT yet, and a
    release would wait a whole ACSE timeout for an answer that cannot come.
    """
    if assoc.is_established:
        if abort:
            assoc.abort()
        else:
            assoc.release()
    ae = assoc.ae
    if isinstance(ae, _AE):
        ae.close_sockets()


# ---- C-ECHO -------------------------------------------------------------------------------------------


def echo(
    peer: Peer, *, calling_ae: str = DEFAULT_CALLING_AE, timeout: float = 10.0, tls: TlsClient | None = None
) -> EchoResult:
    """C-ECHO (Verification, PS3.4 Annex A): does the peer answer us, with our AE title, right now?

    With ``tls`` the association runs over TLS (a good check of certificates before the first delivery).

    Raises
    ------
    DicomPeerError
        No association (refused, rejected with the reason, aborted, timed out, TLS handshake failed) or no
        C-ECHO response.
    ValueError
        ``tls`` names a file that cannot be used (missing, not PEM, key not matching the certificate).
    """
    ae = _make_ae(calling_ae, timeout)
    started = time.perf_counter()
    cxs = [build_context(Verification)]
    assoc = _associate(ae, peer, cxs, timeout=timeout, max_pdu=DEFAULT_MAX_PDU, tls=tls)
    try:
        status = assoc.send_c_echo()
        seconds = time.perf_counter() - started
    finally:
        _finish(assoc)
    if "Status" not in status:
        raise DicomPeerError(
            f"no C-ECHO response from {peer} (aborted, or no answer within {timeout:g} s)", reason="aborted"
        )
    logger.info("C-ECHO to %s: status 0x%04X in %.1f ms", peer, status.Status, seconds * 1000)
    return EchoResult(status=int(status.Status), seconds=seconds)


# ---- C-STORE ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Item:
    """What we need to plan an object's presentation context, without holding its pixels."""

    index: int
    source: Dataset | Path
    sop_class: UID
    sop_instance_uid: str
    transfer_syntax: UID


def _one_line(exc: BaseException, limit: int = 300) -> str:
    """An exception on one short line: codec errors span lines; outcomes end up in logs and a DB column."""
    text = " ".join(f"{type(exc).__name__}: {exc}".split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _describe(index: int, obj: Dataset | Path | str) -> _Item | SendOutcome:
    """An _Item from the object's header (a path is read up to its pixels only), or a failed outcome."""
    source: Dataset | Path
    if isinstance(obj, Dataset):
        ds, source = obj, obj
    else:
        source = Path(obj)
        try:
            ds = dcmread(source, stop_before_pixels=True, specific_tags=["SOPClassUID", "SOPInstanceUID"])
        except Exception as exc:  # pydicom raises many types for damaged files: one object's failure only
            return SendOutcome("", None, False, f"cannot read {source.name}: {_one_line(exc)}")
    meta = getattr(ds, "file_meta", None)
    sop_class = ds.get("SOPClassUID") or (meta.get("MediaStorageSOPClassUID") if meta is not None else None)
    sop_uid = str(ds.get("SOPInstanceUID") or "")
    syntax = meta.get("TransferSyntaxUID") if meta is not None else None
    missing = [name for name, v in (("SOPClassUID", sop_class), ("SOPInstanceUID", sop_uid)) if not v]
    if syntax is None:
        missing.append("file meta TransferSyntaxUID")
    if missing:
        return SendOutcome(sop_uid, None, False, f"not sent: no {', '.join(missing)}")
    return _Item(index, source, UID(str(sop_class)), sop_uid, UID(str(syntax)))


def _plan(items: list[_Item]) -> list[tuple[list[PresentationContext], list[_Item]]]:
    """Batches of at most 128 contexts, one association each; objects in input order within a batch."""
    by_class: dict[UID, list[_Item]] = {}
    for it in items:
        by_class.setdefault(it.sop_class, []).append(it)
    units: list[tuple[list[PresentationContext], list[_Item]]] = []
    for sop_class, group in by_class.items():
        odd = sorted({it.transfer_syntax for it in group} - set(_NATIVE))
        step = MAX_CONTEXTS - 1  # room for the native fallback; only forged files have this many syntaxes
        chunks = [odd[i : i + step] for i in range(0, len(odd), step)] or [[]]
        for n, chunk in enumerate(chunks):
            wanted = set(chunk) | (set(_NATIVE) if n == 0 else set())
            cxs = [build_context(sop_class, ts) for ts in chunk] + [build_context(sop_class, list(_NATIVE))]
            units.append((cxs, [it for it in group if it.transfer_syntax in wanted]))
    batches: list[tuple[list[PresentationContext], list[_Item]]] = []
    for cxs, members in units:
        if batches and len(batches[-1][0]) + len(cxs) <= MAX_CONTEXTS:
            batches[-1][0].extend(cxs)
            batches[-1][1].extend(members)
        else:
            batches.append((list(cxs), list(members)))
    return [(cxs, sorted(members, key=lambda it: it.index)) for cxs, members in batches]


def _route(assoc: Association, item: _Item) -> Literal["as-is", "decompress"] | None:
    """How the object can travel on the contexts the peer accepted (pynetdicom converts only uncompressed)."""
    accepted = {
        cx.transfer_syntax[0]
        for cx in assoc.accepted_contexts
        if cx.abstract_syntax == item.sop_class and cx.as_scu and cx.transfer_syntax
    }
    ts = item.transfer_syntax
    if ts in accepted:
        return "as-is"
    if not ts.is_transfer_syntax:  # a private syntax: exact match only
        return None
    if not ts.is_compressed:
        same_order = [s for s in accepted if s.is_transfer_syntax and not s.is_compressed]
        return "as-is" if any(s.is_little_endian == ts.is_little_endian for s in same_order) else None
    return "decompress" if accepted & set(_NATIVE) else None


def _status_error(code: int, status: Dataset) -> str:
    category, meaning = STORAGE_SERVICE_CLASS_STATUS.get(code) or GENERAL_STATUS.get(code) or ("Failure", "?")
    text = f"status 0x{code:04X} ({category}: {meaning})"
    comment = status.get("ErrorComment")
    return f"{text}: {comment}" if comment else text


def _failed(item: _Item, error: str) -> SendOutcome:
    return SendOutcome(item.sop_instance_uid, None, False, error)


def _no_context(item: _Item, peer: Peer) -> SendOutcome:
    what = f"{item.sop_class.name} in {item.transfer_syntax.name}"
    return _failed(item, f"not sent: {peer.ae_title} accepted no presentation context for {what}")


def _store(
    assoc: Association, item: _Item, peer: Peer, *, decompress_fallback: bool, timeout: float
) -> tuple[SendOutcome, bool]:
    """C-STORE one object; also says whether the association is lost (no response: abort or timeout)."""
    route = _route(assoc, item)
    if route is None or (route == "decompress" and not decompress_fallback):
        return _no_context(item, peer), False
    try:
        if isinstance(item.source, Dataset):  # never change the caller's dataset
            ds = copy.deepcopy(item.source) if route == "decompress" else item.source
        else:
            ds = dcmread(item.source)
        if route == "decompress":
            ds.decompress()
    except Exception as exc:  # unreadable or undecodable: this object fails, the batch goes on
        return _failed(item, f"not sent: {_one_line(exc)}"), False
    started = time.monotonic()
    try:
        status = assoc.send_c_store(ds)
    except RuntimeError:  # the association ended between our check and the send
        return _failed(item, f"not sent: the association with {peer} ended"), True
    except (ValueError, AttributeError) as exc:  # pynetdicom could not encode it for the accepted context
        return _failed(item, f"not sent: {_one_line(exc)}"), False
    if "Status" not in status:  # it may or may not have been stored; resending is safe
        if time.monotonic() - started >= 0.9 * timeout:
            return _failed(item, f"no C-STORE response from {peer} within {timeout:g} s"), True
        return _failed(item, f"{peer} aborted the association before its C-STORE response"), True
    code = int(status.Status)
    ok = code in OK_STATUSES
    logger.debug("C-STORE %s → status 0x%04X", item.sop_instance_uid, code)
    return SendOutcome(item.sop_instance_uid, code, ok, None if ok else _status_error(code, status)), False


def send(
    peer: Peer,
    datasets_or_paths: Iterable[Dataset | Path | str],
    *,
    calling_ae: str = DEFAULT_CALLING_AE,
    timeout: float = 30.0,
    max_pdu: int = DEFAULT_MAX_PDU,
    decompress_fallback: bool = True,
    tls: TlsClient | None = None,
) -> list[SendOutcome]:
    """C-STORE every object to ``peer`` on one association (more only past 128 presentation contexts).

    Paths are read twice, each time one at a time: their headers to plan the contexts, then whole just
    before sending, so a 1,000-slice CT never sits in memory at once. Datasets need
    ``file_meta.TransferSyntaxUID`` (how they are encoded) and are never modified.

    Returns
    -------
    list[SendOutcome]
        One per input, in input order. Unreadable inputs, objects the peer accepted no context for and
        objects left when an association aborted are ``ok=False`` with ``status=None``.

    Raises
    ------
    DicomPeerError
        The first association failed (peer down, rejected us, timed out, TLS handshake failed): nothing
        was sent. A peer that accepts the association but none of the objects' SOP classes is a
        per-object failure instead.
    ValueError
        ``tls`` names a file that cannot be used (missing, not PEM, key not matching the certificate).
    """
    described = [_describe(i, obj) for i, obj in enumerate(datasets_or_paths)]
    outcomes: list[SendOutcome | None] = [d if isinstance(d, SendOutcome) else None for d in described]
    items = [d for d in described if isinstance(d, _Item)]
    ae = _make_ae(calling_ae, timeout)
    for n, (contexts, batch) in enumerate(_plan(items)):
        started = time.monotonic()
        try:
            assoc = _associate(ae, peer, contexts, timeout=timeout, max_pdu=max_pdu, tls=tls)
        except DicomPeerError as exc:
            if exc.reason == "no-contexts":  # about these objects, not the peer: each gets its own answer
                for it in batch:
                    outcomes[it.index] = _no_context(it, peer)
            elif n == 0:
                raise
            else:
                for it in batch:
                    outcomes[it.index] = _failed(it, f"not sent: {exc}")
            continue
        lost = False
        try:
            for it in batch:
                if lost or not assoc.is_established:
                    outcomes[it.index] = _failed(it, f"not sent: the association with {peer} was aborted")
                    continue
                outcomes[it.index], lost = _store(
                    assoc, it, peer, decompress_fallback=decompress_fallback, timeout=timeout
                )
        finally:
            _finish(assoc, abort=lost)
        done = [outcomes[it.index] for it in batch]
        n_ok = sum(1 for o in done if o is not None and o.ok)
        logger.info(
            "C-STORE to %s: %d of %d object(s) stored in %.2f s (%d presentation contexts)",
            peer,
            n_ok,
            len(batch),
            time.monotonic() - started,
            len(contexts),
        )
    assert all(o is not None for o in outcomes), "every input gets an outcome"
    return [o for o in outcomes if o is not None]
