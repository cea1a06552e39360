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
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any

from pydicom.dataset import Dataset
from pydicom.pixels import get_decoder
from pydicom.uid import UID
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, evt
from pynetdicom.events import Event
from pynetdicom.sop_class import _STORAGE_CLASSES, Verification  # type: ignore[attr-defined]
from pynetdicom.transport import ThreadedAssociationServer

from service.config import DicomSettings
from service.errors import StorageFullError, TriageError
from service.store.db import utcnow
from service.store.repository import Store
from service.store.validate import parse_instance

__all__ = ["DicomListener", "storage_transfer_syntaxes"]

logger = logging.getLogger(__name__)

STATUS_SUCCESS = 0x0000
STATUS_OUT_OF_RESOURCES = 0xA700
STATUS_PROCESSING_FAILURE = 0x0110

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
    """Nagle off on accepted sockets: otherwise each C-STORE response waits ~40 ms for a delayed ACK."""

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        client, address = super().get_request()
        client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return client, address


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
    ) -> None:
        self.settings = settings
        self.store = store
        self.quiet = timedelta(seconds=quiet_seconds)
        self.on_stored = on_stored
        self.metrics = metrics
        self._server: ThreadedAssociationServer | None = None
        self._thread: threading.Thread | None = None
        self.ae = self._make_ae()

    def _make_ae(self) -> AE:
        s = self.settings
        ae = AE(ae_title=s.ae_title)
        ae.maximum_pdu_size = s.max_pdu
        ae.maximum_associations = s.max_associations
        ae.require_called_aet = s.check_called_aet
        ae.require_calling_aet = list(s.allowed_calling_aets)
        ae.add_supported_context(Verification)
        syntaxes = storage_transfer_syntaxes()
        for uid in _STORAGE_CLASSES.values():
            ae.add_supported_context(uid, syntaxes)
        return ae

    @property
    def port(self) -> int:
        """The bound port (useful when the setting is 0)."""
        if self._server is None:
            raise RuntimeError("the listener is not started")
        return int(self._server.server_address[1])

    def start(self) -> None:
        handlers = [
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_C_ECHO, self._on_echo),
            (evt.EVT_REJECTED, self._on_rejected),
        ]
        server = self.ae.make_server(
            (self.settings.host, self.settings.port),
            evt_handlers=handlers,
            server_class=_NoDelayServer,
        )
        self._server = server
        self.ae._servers.append(server)  # as AE.start_server does, so AE.shutdown() finds it
        self._thread = threading.Thread(target=server.serve_forever, name="dicom-listener", daemon=True)
        self._thread.start()
        logger.info(
            "DICOM listener %s on %s:%d (%d transfer syntaxes, calling AEs: %s)",
            self.settings.ae_title,
            self.settings.host,
            self.port,
            len(storage_transfer_syntaxes()),
            ", ".join(self.settings.allowed_calling_aets) or "any",
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
            parsed = parse_instance(data, part="C-STORE dataset", images_only=False)
        except TriageError as exc:
            logger.warning("C-STORE from %s refused: %s", calling, exc.detail)
            return self._count(_status(exc.dimse_status, exc.detail), "refused")
        except Exception as exc:  # pynetdicom decoding the P-DATA into a file failed
            logger.warning(
                "C-STORE from %s refused: dataset cannot be read (%s)", calling, type(exc).__name__
            )
            return self._count(_status(0xC000, "the dataset cannot be read"), "refused")
        try:
            new, due_now = self.store.ingest_blocking(parsed, not_before=utcnow() + self.quiet)
        except StorageFullError as exc:
            logger.error("C-STORE from %s refused: %s", calling, exc.detail)
            return self._count(_status(STATUS_OUT_OF_RESOURCES, "out of disk space"), "out_of_resources")
        except OSError as exc:
            logger.error("C-STORE from %s: writing the instance failed (%s)", calling, exc.strerror)
            return self._count(
                _status(STATUS_OUT_OF_RESOURCES, "cannot write the instance"), "out_of_resources"
            )
        except Exception:
            logger.exception("C-STORE from %s: storing the instance failed", calling)
            return self._count(_status(STATUS_PROCESSING_FAILURE, "internal error storing"), "failed")
        if new and self.metrics is not None:
            self.metrics.instances_received.labels(source="dicom").inc()
        if due_now:
            self.on_stored()
        logger.debug(
            "C-STORE from %s: %s stored in %.1f ms", calling, parsed.role, (time.perf_counter() - t0) * 1000
        )
        return self._count(STATUS_SUCCESS, "stored" if new else "duplicate")

    def _count(self, status: int | Dataset, outcome: str) -> int | Dataset:
        if self.metrics is not None:
            self.metrics.dicom_stores.labels(outcome=outcome).inc()
        return status
