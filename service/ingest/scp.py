"""The DICOM listener: C-ECHO and C-STORE SCP on pynetdicom, storing into the same store as the HTTP API.

One C-STORE is answered on its association's thread: parse and validate the encoded dataset as received
(no decode, no re-encode), write it durably (temporary file, fsync, rename, directory fsync), commit its
row, and only then return 0x0000. Everything after "instance stored" is shared with the HTTP path: the
row schedules a job behind the assembly gate (:mod:`service.assemble`), the worker does the rest.

Status codes (PS3.4 Annex B.2.3 and GG.4): 0xA700 out of resources (disk full, write error: "try again
later"), 0xC000 cannot understand (not parseable, bad UIDs), 0x0110 processing failure (a bug of ours;
logged with its traceback). Failures carry an ErrorComment the sender's log shows.

Presentation contexts: every storage SOP class, with the uncompressed transfer syntaxes plus each
compressed one that pydicom can decode here; a sender with anything else converts or is told at
negotiation, never after we accepted an instance we cannot read.

TLS (PS3.15 Annex B, BCP 195): with ``tls_cert_file`` and ``tls_key_file`` the port speaks TLS only, 1.2 or
later. ``tls_ca_file`` alone verifies the certificates clients send (one from another CA is refused) but
lets clients without one in; with ``tls_require_client_cert`` a client needs a certificate from that CA,
the usual DICOM node authentication. Settings that cannot work together, or files that cannot be used,
stop the start with one sentence naming the setting. pynetdicom's server does the TLS handshake on its
accepting thread with no timeout, so one silent connection (a port scan, a load balancer's TCP check)
would stall every later client; our server does it on the association's own thread, with a timeout.
"""

from __future__ import annotations

import logging
import socket
import ssl
import threading
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset
from pydicom.pixels import get_decoder
from pydicom.uid import UID
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, evt
from pynetdicom.events import Event
from pynetdicom.sop_class import Verification
from pynetdicom.transport import ThreadedAssociationServer

from service.config import AssemblySettings, DicomSettings
from service.dicom.ae import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME
from service.errors import StorageFullError, StudyTooLargeError, TriageError
from service.ingest.associations import OpenAssociations
from service.store.db import utcnow
from service.store.repository import Store
from service.store.validate import parse_instance

__all__ = ["DicomListener", "storage_transfer_syntaxes"]

logger = logging.getLogger(__name__)

STATUS_SUCCESS = 0x0000
STATUS_OUT_OF_RESOURCES = 0xA700
STATUS_PROCESSING_FAILURE = 0x0110
TLS_HANDSHAKE_TIMEOUT_S = 10.0  # a handshake takes milliseconds on a hospital LAN; this only bounds a stall

_UNCOMPRESSED = (
    "1.2.840.10008.1.2.1",  # Explicit VR Little Endian first: our preferred
    "1.2.840.10008.1.2",  # Implicit VR Little Endian, the default every SCU must support
    "1.2.840.10008.1.2.1.99",  # Deflated Explicit VR Little Endian
    "1.2.840.10008.1.2.2",  # Explicit VR Big Endian (retired, still sent by old modalities)
)


def storage_transfer_syntaxes() -> list[str]:
    """Uncompressed syntaxes plus every compressed one pydicom has a working decoder for here."""
    decodable = []
    for ts in ALL_TRANSFER_SYNTAXES:
        if ts in _UNCOMPRESSED:
            continue
        try:
            if get_decoder(UID(ts)).is_available:
                decodable.append(ts)
        except NotImplementedError:
            continue
    return [*_UNCOMPRESSED, *decodable]


class _NoDelayServer(ThreadedAssociationServer):
    """Nagle off on accepted sockets (otherwise each C-STORE response waits ~40 ms for a delayed ACK), and
    the TLS handshake moved off the accepting thread (see the module docstring)."""

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        assert self.socket is not None
        client, address = self.socket.accept()
        client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self.ssl_context is not None:
            client = self.ssl_context.wrap_socket(client, server_side=True, do_handshake_on_connect=False)
        return client, address

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        if isinstance(request, ssl.SSLSocket) and not self._handshake(request, client_address):
            self.shutdown_request(request)
            return
        super().process_request_thread(request, client_address)

    def _handshake(self, sock: ssl.SSLSocket, address: tuple[str, int]) -> bool:
        blocking = sock.gettimeout()
        sock.settimeout(TLS_HANDSHAKE_TIMEOUT_S)
        try:
            sock.do_handshake()
        except (OSError, ValueError) as exc:
            if isinstance(exc, ssl.SSLEOFError | ConnectionResetError):
                # Port scans and TCP health checks connect and go: not worth a warning each.
                logger.debug("TLS connection from %s:%s closed before the handshake", *address[:2])
            else:
                logger.warning("TLS handshake with %s:%s failed: %s", *address[:2], _tls_words(exc))
            return False
        sock.settimeout(blocking)
        return True


def _tls_words(exc: BaseException) -> str:
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


def _server_tls(s: DicomSettings) -> ssl.SSLContext | None:
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
            why = f"dicom.tls_cert_file {cert} with dicom.tls_key_file {key}: {_tls_words(exc)}"
        raise ValueError(why) from exc
    if ca is not None:
        try:
            ctx.load_verify_locations(cafile=ca)
        except ssl.SSLError as exc:
            raise ValueError(f"dicom.tls_ca_file {ca} holds no PEM certificate") from exc
        ctx.verify_mode = ssl.CERT_REQUIRED if s.tls_require_client_cert else ssl.CERT_OPTIONAL
    return ctx


def _describe_tls(s: DicomSettings, ctx: ssl.SSLContext | None) -> str:
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


def _status(code: int, comment: str) -> Dataset:
    ds = Dataset()
    ds.Status = code
    ds.ErrorComment = comment[:64]  # LO: 64 characters at most
    return ds


class DicomListener:
    """A pynetdicom association server in background threads; :meth:`start` / :meth:`stop`.

    ``on_stored`` is called (from the association thread) when a committed instance made its study due at
    once (its series is full): the app uses it to wake the workers on the event loop. Instances that only
    push the quiet timer forward wake nobody; the workers sleep until the earliest gate.
    """

    def __init__(
        self,
        settings: DicomSettings,
        store: Store,
        *,
        quiet_seconds: float,
        on_stored: Callable[[], None] = lambda: None,
        metrics: Any = None,
        assembly: AssemblySettings | None = None,
        keep_truncated: bool = False,
    ) -> None:
        self.settings = settings
        self.store = store
        self.assembly = assembly or AssemblySettings(quiet_seconds=quiet_seconds)
        self.keep_truncated = keep_truncated
        """``store.keep_truncated``: store datasets cut short (noted) instead of answering 0xC000."""
        self.quiet = timedelta(seconds=quiet_seconds)
        self.hold = timedelta(seconds=self.assembly.max_hold_seconds)
        self.open = OpenAssociations()
        """Studies with an association open: the assembly gate's evidence (:mod:`service.assemble`)."""
        self.on_stored = on_stored
        self.metrics = metrics
        self._server: ThreadedAssociationServer | None = None
        self._thread: threading.Thread | None = None
        self.ae = self._make_ae()

    def _make_ae(self) -> AE:
        s = self.settings
        ae = AE(ae_title=s.ae_title)
        ae.implementation_class_uid = IMPLEMENTATION_CLASS_UID  # in our A-ASSOCIATE-AC (PS3.7 D.3.3.2)
        ae.implementation_version_name = IMPLEMENTATION_VERSION_NAME
        ae.maximum_pdu_size = s.max_pdu
        ae.maximum_associations = s.max_associations
        ae.require_called_aet = s.check_called_aet
        ae.require_calling_aet = list(s.allowed_calling_aets)
        ae.add_supported_context(Verification)
        syntaxes = storage_transfer_syntaxes()
        for cx in AllStoragePresentationContexts:
            ae.add_supported_context(cx.abstract_syntax, syntaxes)
        return ae

    @property
    def port(self) -> int:
        """The bound port (useful when the setting is 0)."""
        if self._server is None:
            raise RuntimeError("the listener is not started")
        return int(self._server.server_address[1])

    def start(self) -> None:
        """Bind and serve in a thread; ValueError naming the setting when the TLS settings cannot work."""
        tls = _server_tls(self.settings)
        handlers = [
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_C_ECHO, self._on_echo),
            (evt.EVT_REJECTED, self._on_rejected),
            (evt.EVT_RELEASED, self._on_released),
            (evt.EVT_ABORTED, self._on_aborted),
            (evt.EVT_CONN_CLOSE, self._on_aborted),
        ]
        server = self.ae.make_server(
            (self.settings.host, self.settings.port),
            evt_handlers=handlers,
            server_class=_NoDelayServer,
            ssl_context=tls,
        )
        self._server = server
        self.ae._servers.append(server)  # as AE.start_server does, so AE.shutdown() finds it
        self._thread = threading.Thread(target=server.serve_forever, name="dicom-listener", daemon=True)
        self._thread.start()
        logger.info(
            "DICOM listener %s on %s:%d (%d transfer syntaxes, calling AEs: %s, %s)",
            self.settings.ae_title,
            self.settings.host,
            self.port,
            len(storage_transfer_syntaxes()),
            ", ".join(self.settings.allowed_calling_aets) or "any",
            _describe_tls(self.settings, tls),
        )

    def stop(self) -> None:
        """Stop accepting, then let running associations end (pynetdicom aborts them on shutdown)."""
        if self._server is not None:
            self._server.shutdown()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None
        self.ae.shutdown()

    # ---- handlers (run on association threads) ------------------------------------------------------

    def _on_echo(self, event: Event) -> int:  # noqa: ARG002 - pynetdicom passes the event
        return STATUS_SUCCESS

    def _on_rejected(self, event: Event) -> None:
        requestor = event.assoc.requestor
        logger.warning(
            "association from %s:%s rejected (calling AE %r, called AE %r)",
            requestor.address,
            requestor.port,
            requestor.ae_title,
            event.assoc.acceptor.ae_title,
        )

    def _on_store(self, event: Event) -> int | Dataset:
        t0 = time.perf_counter()
        calling = event.assoc.requestor.ae_title
        try:
            data = event.encoded_dataset()
            parsed = parse_instance(
                data, part="C-STORE dataset", images_only=False, keep_truncated=self.keep_truncated
            )
        except TriageError as exc:
            logger.warning("C-STORE from %s refused: %s", calling, exc.detail)
            return self._count(_status(exc.dimse_status, exc.detail), "refused")
        except Exception as exc:  # pynetdicom decoding the P-DATA into a file failed
            logger.warning(
                "C-STORE from %s refused: dataset cannot be read (%s)", calling, type(exc).__name__
            )
            return self._count(_status(0xC000, "the dataset cannot be read"), "refused")
        now = utcnow()
        try:
            new, due_now = self.store.ingest_blocking(
                parsed,
                not_before=now + self.quiet,
                hold_until=now + self.hold if self.assembly.hold_while_associated else None,
                complete_when_full=self.assembly.complete_when_full,
            )
        except StorageFullError as exc:
            logger.error("C-STORE from %s refused: %s", calling, exc.detail)
            too_many = isinstance(exc, StudyTooLargeError)
            comment = "too many instances in the study" if too_many else "disk full"
            return self._count(_status(STATUS_OUT_OF_RESOURCES, comment), "out_of_resources")
        except TriageError as exc:  # SopInstanceConflictError: 0xA900, the UID is in another study
            logger.warning("C-STORE from %s refused: %s", calling, exc.detail)
            return self._count(_status(exc.dimse_status, exc.title), "refused")
        except OSError as exc:
            logger.error("C-STORE from %s: writing the instance failed (%s)", calling, exc.strerror)
            return self._count(
                _status(STATUS_OUT_OF_RESOURCES, "cannot write the instance"), "out_of_resources"
            )
        except Exception:
            logger.exception("C-STORE from %s: storing the instance failed", calling)
            return self._count(_status(STATUS_PROCESSING_FAILURE, "internal error storing"), "failed")
        if parsed.role == "image":
            self.open.stored(event.assoc, parsed.study_uid)
        if new and self.metrics is not None:
            self.metrics.instances_received.labels(source="dicom").inc()
        if due_now:
            self.on_stored()
        logger.debug(
            "C-STORE from %s: %s stored in %.1f ms", calling, parsed.role, (time.perf_counter() - t0) * 1000
        )
        return self._count(STATUS_SUCCESS, "stored" if new else "duplicate")

    def _on_released(self, event: Event) -> None:
        self._ended(event, released=True)

    def _on_aborted(self, event: Event) -> None:
        """An abort, or the connection closing (after a release this finds nothing left to end)."""
        self._ended(event, released=False)

    def _ended(self, event: Event, *, released: bool) -> None:
        """The association is gone: its studies, if no other association carries them, may be complete."""
        end = self.open.ended(event.assoc, released=released)
        if not end.studies:
            return
        try:
            due = self.store.association_ended(
                end.studies,
                released=end.released,
                quiet_until=utcnow() + self.quiet,
                settings=self.assembly,
            )
        except Exception:  # the quiet timer still completes the study: log, never break the association
            logger.exception("updating the assembly gate at association end failed")
            return
        if due:
            self.on_stored()

    def _count(self, status: int | Dataset, outcome: str) -> int | Dataset:
        if self.metrics is not None:
            self.metrics.dicom_stores.labels(outcome=outcome).inc()
        return status
