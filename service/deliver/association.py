"""Associations as a requestor (PS3.8 ACSE): who the peer is, our AE, and every way an association fails.

Used by the client (:mod:`service.deliver.scu`: C-ECHO, C-STORE) and the retrieve helpers
(:mod:`service.retrieve`: C-FIND/C-MOVE, :mod:`service.retrieve_get`: C-GET), so all of them announce
the same implementation UID (PS3.7 D.3.3.2), set the same timeouts and explain a failed association in
the same sentence. pynetdicom does the protocol; :func:`associate` turns a refused, rejected, aborted or
timed-out request, or a failed TLS handshake (:mod:`service.dicom.tls`), into one :class:`DicomPeerError`
with its ``reason``, and :func:`finish` releases or aborts and closes the sockets.

**TCP_NODELAY.** pynetdicom sets only SO_REUSEADDR on its sockets; with Nagle on, each C-STORE can wait
~40 ms for a delayed ACK (../shared/PEERS.md). Our AE subclass sets TCP_NODELAY on each socket it creates,
before it connects. It also gives each association the reactor loop of :mod:`service.deliver.reactor`,
which cannot take a response away from the request waiting for it.
"""

from __future__ import annotations

import re
import socket
import ssl
import time
from dataclasses import dataclass
from typing import Any

from pynetdicom import AE, evt
from pynetdicom.association import Association
from pynetdicom.pdu import A_ASSOCIATE_RJ
from pynetdicom.pdu_primitives import A_ASSOCIATE
from pynetdicom.presentation import PresentationContext
from pynetdicom.transport import AddressInformation, AssociationSocket

from service.deliver import reactor
from service.dicom.ae import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME
from service.dicom.tls import TlsClient, TrackingContext, tls_failure
from service.errors import DicomPeerError

__all__ = [
    "DEFAULT_CALLING_AE",
    "DEFAULT_MAX_PDU",
    "MAX_CONTEXTS",
    "Peer",
    "ScuAE",
    "associate",
    "check_ae_title",
    "finish",
    "make_ae",
]

DEFAULT_CALLING_AE = "PACS_TRIAGE"
DEFAULT_MAX_PDU = 16382  # pynetdicom's default; only limits what the peer sends us (small responses)
MAX_CONTEXTS = 128  # PS3.8 9.3.2.2: presentation context IDs are odd integers 1-255
_AE_FORBIDDEN = re.compile(r"[\\\x00-\x1f\x7f]")


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


class ScuAE(AE):
    """An AE whose sockets have TCP_NODELAY on, and that closes each socket once its association is over.

    Both go through the one place pynetdicom creates a socket (bound, not yet connected). The closing is
    needed because pynetdicom 3.0.4 leaks the socket of a failed TCP connect: ``AssociationSocket.connect``
    calls ``shutdown()`` on the unconnected socket, which raises before ``close()`` (pynetdicom#979, fixed
    upstream by #999); the ResourceWarning at garbage collection fails tests that treat warnings as errors.
    With TLS, pynetdicom wraps that socket while connecting (the plain one is then detached and closing it
    does nothing); the wrapped socket joins ``sockets`` through
    :class:`~service.dicom.tls.TrackingContext`.
    """

    def __init__(self, ae_title: str) -> None:
        super().__init__(ae_title=ae_title)
        self.sockets: list[socket.socket] = []

    def _create_socket(
        self, assoc: Association, address: AddressInformation, tls_args: tuple[ssl.SSLContext, str] | None
    ) -> AssociationSocket:
        reactor.install(assoc)  # before the association's thread starts: pynetdicom's pause race
        sock = super()._create_socket(assoc, address, tls_args)
        if sock.socket is not None:
            sock.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.sockets.append(sock.socket)
        return sock

    def close_sockets(self) -> None:
        while self.sockets:
            self.sockets.pop().close()  # a no-op for sockets pynetdicom closed itself


def make_ae(calling_ae: str, timeout: float) -> ScuAE:
    """Our AE as a requestor: its title checked, our implementation UID and version, one timeout for all."""
    ae = ScuAE(ae_title=check_ae_title(calling_ae, "calling AE title"))
    # Who we are, in the A-ASSOCIATE-RQ user information (PS3.7 D.3.3.2), not pynetdicom's defaults.
    ae.implementation_class_uid = IMPLEMENTATION_CLASS_UID
    ae.implementation_version_name = IMPLEMENTATION_VERSION_NAME
    ae.connection_timeout = timeout
    ae.acse_timeout = timeout
    ae.dimse_timeout = timeout
    ae.network_timeout = timeout
    return ae


def associate(
    ae: ScuAE,
    peer: Peer,
    contexts: list[PresentationContext],
    *,
    timeout: float,
    max_pdu: int,
    tls: TlsClient | None = None,
) -> Association:
    """An established association, or DicomPeerError saying why not."""
    watch = _Watch()
    tls_context: TrackingContext | None = None
    if tls is not None:
        tls_context = tls.tracking_context()
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
        error = tls_failure(
            str(peer), peer.host, tls_context.error, timeout, trusted=tls.ca_file if tls else None
        )
    else:
        error = _why_not(assoc, peer, watch, time.monotonic() - started, timeout, len(contexts))
    finish(assoc)
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


def finish(assoc: Association, *, abort: bool = False) -> None:
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
    if isinstance(ae, ScuAE):
        ae.close_sockets()
