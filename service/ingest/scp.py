"""The DICOM listener: C-ECHO and C-STORE SCP, storing into the same store as the HTTP API.

:class:`DicomListener` runs our upper-layer acceptor (:mod:`service.ingest.acceptor`) on its own event loop in
one background thread, with the same ``start`` / ``stop`` / ``port`` whoever embeds it (the app, tests). One
C-STORE is answered after :meth:`DicomListener.handle_store` returns on the store thread pool (or on the
listener's loop, with one or two associations open and a store that would not wait:
:mod:`service.ingest.acceptor`; the loop then writes the slot while a store thread checks the instance): parse
and validate the dataset as received (no decode, no re-encode), write it durably (into a slot file made ahead
and ``fdatasync``'d, :mod:`service.store.slots`, renamed into place in the background; or, with
``dicom.journal`` off, temporary file, fsync, rename, directory fsync), and only then 0x0000; its row follows
in the next group commit (:mod:`service.store.group_commit`: one transaction for every row that arrived
meanwhile, after the responses), and a crash before that commit is repaired by the start-up re-index
(:mod:`service.store.reindex`, after the slots' replay). Everything after "instance stored" is shared with the
HTTP path: the row schedules a job behind the assembly gate (:mod:`service.assemble`), the worker does the
rest.

Status codes (PS3.4 Annex B.2.3): :func:`service.ingest.attempt.store_attempt` maps what the store raised
(0xA700 out of resources, 0xA900 another study's UID, 0xC000 cannot understand, 0x0110 processing failure,
0xC211 a bug of ours, logged with its traceback), with an ErrorComment the sender's log shows; an instance
we already hold is a success (PS3.4 B.2.3: the SCP may ignore a duplicate). The acceptor refuses a dataset
above ``max_dataset_bytes`` itself (0xA700).

Presentation contexts: every storage SOP class, with the uncompressed transfer syntaxes plus each
compressed one that pydicom can decode here (:func:`storage_transfer_syntaxes`); a sender with anything
else converts or is told at negotiation, never after we accepted an instance we cannot read. TLS: see
:mod:`service.dicom.tls`.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from service.config import AssemblySettings, DicomSettings
from service.dicom.tls import describe_tls, server_tls
from service.ingest.acceptor import Acceptor
from service.ingest.associations import OpenAssociations
from service.ingest.attempt import STATUS_OUT_OF_RESOURCES, STATUS_SUCCESS, store_attempt
from service.ingest.negotiation import storage_transfer_syntaxes
from service.ingest.processes import ListenerProcesses, share
from service.ingest.receive import ReceivePath
from service.ingest.requests import Association, StoreRequest
from service.ingest.store_side import Commits, Tracker
from service.store.group_commit import GroupCommit
from service.store.instances import Instances
from service.store.slot_place import Placer, Slotted
from service.store.slots import SlotStore
from service.store.validate import ParsedInstance

__all__ = ["DicomListener", "storage_transfer_syntaxes"]

logger = logging.getLogger(__name__)

_STOP_TIMEOUT_S = 30.0
_CAUGHT_UP_S = 1.0
"""At most this long an API request waits, asking whether a study has rows still to come, for what the
listener processes serving connections sent so far (a round trip, ~0.1 ms)."""


class DicomListener(ReceivePath):
    """The acceptor on its own event loop in a background thread; :meth:`start` / :meth:`stop`.

    ``on_stored`` is called (from the group-commit thread) when committed rows made a study due at once (its
    series is full, or its association ended): the app uses it to wake the workers on its event loop.
    Instances that only push the quiet timer forward wake nobody; the workers sleep until the earliest gate.
    """

    def __init__(
        self,
        settings: DicomSettings,
        instances: Instances | None,
        *,
        quiet_seconds: float,
        on_stored: Callable[[], object] = lambda: None,
        metrics: Any = None,
        assembly: AssemblySettings | None = None,
        keep_truncated: bool = False,
        slots: SlotStore | None = None,
        commits: Commits | None = None,
        tracker: Tracker | None = None,
    ) -> None:
        self.settings = settings
        self.instances = instances
        self.assembly = assembly or AssemblySettings(quiet_seconds=quiet_seconds)
        self.keep_truncated = keep_truncated
        """``store.keep_truncated``: store datasets cut short (noted) instead of answering 0xC000."""
        self.slots = slots
        self.open = OpenAssociations()
        """Studies with an association open: the assembly gate's evidence (:mod:`service.assemble`)."""
        self.tracker: Tracker = tracker or self.open
        """Where the handlers report associations: :attr:`open`, or (in a listener process) the service."""
        self.group: GroupCommit | None = None
        """Rows of acknowledged instances, committed in groups after their responses (in the service's
        process; a listener process hands its instances to the service's instead)."""
        if commits is None:
            assert instances is not None, "the service's listener stores into its instances"
            self.group = commits = GroupCommit(
                instances,
                quiet_seconds=quiet_seconds,
                assembly=self.assembly,
                on_due=on_stored,
                delay_seconds=settings.commit_delay_seconds,
                staging_threads=settings.store_threads,
                placer=None
                if slots is None
                else Placer(slots, instances, delay_seconds=settings.journal_place_delay_seconds),
            )
        self.commits: Commits = commits
        self.metrics = metrics
        self._counters: dict[str, Any] = {}
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._port: int | None = None
        self._checker: ThreadPoolExecutor | None = None
        """The store pool, which checks an instance stored on the loop while the loop writes it."""
        self._acceptor: Acceptor | None = None
        self._processes: ListenerProcesses | None = None
        """With ``dicom.processes`` above one: the listener processes this one hands connections to."""
        self.handed = False
        """Connections are handed to this listener (:meth:`adopt`) rather than accepted on its port."""
        self._adopting: set[asyncio.Task[None]] = set()

    @property
    def port(self) -> int:
        """The bound port (useful when the setting is 0)."""
        if self._port is None:
            raise RuntimeError("the listener is not started")
        return self._port

    def start(self) -> None:
        """Bind and serve in a thread; ValueError naming the setting when the TLS settings cannot work,
        OSError when the port cannot be bound."""
        tls = server_tls(self.settings)
        started = threading.Event()
        failure: list[BaseException] = []

        def run() -> None:
            try:
                asyncio.run(self._serve(tls, started))
            except BaseException as exc:  # reported to start() if it happened while starting
                failure.append(exc)
                if started.is_set():
                    logger.exception("the DICOM listener stopped on an error")
            finally:
                started.set()

        several = self.settings.processes > 1 and self.group is not None and self.slots is not None
        if self.settings.processes > 1 and self.group is not None and self.slots is None:
            logger.warning(
                "dicom.processes is %d, but instances are not written into slots (dicom.journal off, or"
                " the slots are not on the instances' file system): this process receives alone",
                self.settings.processes,
            )
        self.handed = self.handed or several
        if self.group is not None:
            self.group.start()
        self._thread = threading.Thread(target=run, name="dicom-listener", daemon=True)
        self._thread.start()
        started.wait()
        if not failure and several:
            try:
                self._start_processes()
            except BaseException as exc:
                failure.append(exc)
                assert self._loop is not None and self._stop is not None
                self._loop.call_soon_threadsafe(self._stop.set)
        if failure:
            self._thread.join()
            self._thread = None
            if self.group is not None:
                self.group.stop()
            raise failure[0]
        if self.group is None:
            return  # a listener process: the service logs what it serves
        logger.info(
            "DICOM listener %s on %s:%d (%d transfer syntaxes, calling AEs: %s, %s)",
            self.settings.ae_title,
            self.settings.host,
            self.port,
            len(storage_transfer_syntaxes()),
            ", ".join(self.settings.allowed_calling_aets) or "any",
            describe_tls(self.settings, tls),
        )

    def _start_processes(self) -> None:
        """``dicom.processes`` above one: bind here and hand each connection to the least busy of this
        listener (:meth:`adopt`) and the listener processes (:mod:`service.ingest.processes`), which answer
        their C-STOREs into slots of their own; their rows, claims and associations come back to
        :attr:`group` and :attr:`open` here."""
        assert self.group is not None and self.slots is not None
        self._processes = ListenerProcesses(
            self.settings,
            self.group,
            self.open,
            slots=self.slots,
            assembly=self.assembly,
            keep_truncated=self.keep_truncated,
            on_outcome=self._count_remote,
            local=self.adopt,
        )
        self._port = self._processes.start()

    def stop(self) -> None:
        """Stop accepting, abort open associations, wait for stores in progress to finish and their rows
        to be committed."""
        if self._processes is not None:  # first: their last rows and association ends come here
            self._processes.stop(_STOP_TIMEOUT_S)
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        if self._thread is not None:
            self._thread.join(timeout=_STOP_TIMEOUT_S)
            self._thread = None
            if self.group is not None:
                self.group.stop(_STOP_TIMEOUT_S)
        self._loop = self._stop = None
        self._processes = None

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until the rows of every instance acknowledged so far are committed (tests, shutdown); at
        most ``timeout`` seconds in all (the listener processes' reports first, then the rows)."""
        assert self.group is not None
        deadline = None if timeout is None else time.monotonic() + timeout
        if self._processes is not None and not self._processes.caught_up(timeout):
            return False
        return self.group.flush(None if deadline is None else max(0.0, deadline - time.monotonic()))

    def rows_waiting(self, study_uid: str) -> bool:
        """Instances of the study acknowledged here whose rows are not committed yet (with listener
        processes: once every message they sent so far is read, as a sender answered a moment ago expects)."""
        assert self.group is not None
        if self._processes is not None:
            self._processes.caught_up(_CAUGHT_UP_S, busy_only=True)
        return self.group.holds_rows_of(study_uid)

    def resume(self, waiting: list[tuple[ParsedInstance, Slotted]]) -> None:
        """Instances the start-up replay could not place yet: :meth:`GroupCommit.resume`."""
        assert self.group is not None
        self.group.resume(waiting)

    async def _serve(self, tls: Any, started: threading.Event) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        executor = ThreadPoolExecutor(self.settings.store_threads, thread_name_prefix="dicom-store")
        self._checker = executor
        acceptor = Acceptor(
            share(self.settings) if self.handed else self.settings,
            tls_context=tls,
            handle_store=self.handle_store,
            on_opened=self.handle_opened,
            on_end=self.handle_end,
            on_refused=self.handle_refused,
            executor=executor,
            store_at_once=self.commits.takes_at_once,
            on_gone=self.handle_gone,
        )
        self._acceptor = acceptor
        try:
            self._port = await self._listen(acceptor)
            started.set()
            await self._stop.wait()
        finally:
            await acceptor.stop()
            executor.shutdown(wait=True)  # a store in progress finishes before the store is closed
            self._checker = self._acceptor = None

    async def _listen(self, acceptor: Acceptor) -> int:
        """Bind the port, unless this listener is handed its connections (:meth:`adopt`)."""
        return 0 if self.handed else await acceptor.start()

    def adopt(self, sock: socket.socket) -> None:
        """Serve a connection accepted elsewhere (:mod:`service.ingest.processes`), from any thread."""
        loop, acceptor = self._loop, self._acceptor
        if loop is None or acceptor is None:
            sock.close()
            return

        def begin() -> None:
            task = loop.create_task(acceptor.adopt(sock))
            self._adopting.add(task)
            task.add_done_callback(self._adopting.discard)

        loop.call_soon_threadsafe(begin)

    # ---- handlers ---------------------------------------------------------------------------------------

    def handle_store(self, request: StoreRequest) -> tuple[int, str]:
        """One complete C-STORE, on a store thread: ``(status, error comment)``; success only once durable."""
        t0 = time.perf_counter()
        assoc = request.association
        with store_attempt(assoc) as attempt:
            parsed, new = self._store(request)
            attempt.stored(new)
        if attempt.failed:
            return self._count(attempt.status, attempt.comment, attempt.outcome)
        if parsed.role == "image":
            self.tracker.stored(assoc, parsed.study_uid)
        if attempt.outcome == "stored" and self.metrics is not None:
            self._counter("received", self.metrics.instances_received, source="dicom").inc()
        logger.debug(
            "C-STORE from %s: %s stored in %.1f ms", assoc, parsed.role, (time.perf_counter() - t0) * 1000
        )
        return self._count(STATUS_SUCCESS, "", attempt.outcome)

    def handle_opened(self, assoc: Association) -> None:
        """An association was accepted (on the listener's loop: the tracker only counts it)."""
        self.tracker.opened(assoc)

    def handle_end(self, assoc: Association, released: bool) -> None:
        """The association is gone (on a store thread, after its last store returned): its studies, if no
        other association carries them, may be complete once the rows it carried are committed."""
        end = self.tracker.ended(assoc, released=released)
        how = "released" if released else "aborted"
        logger.debug("association %d from %s ended (%s)", assoc.id, assoc, how)
        self.commits.ended(end.studies, released=end.released)  # applied after this association's rows

    def handle_gone(self) -> None:
        """A connection handed here closed (on the loop): the hand-over counts what each process serves."""
        if self._processes is not None:
            self._processes.gone_here()

    def handle_refused(self, status: int) -> None:
        """A C-STORE the acceptor refused itself (dataset too large, UIDs not UIDs): counted as today."""
        self._count(status, "", "out_of_resources" if status == STATUS_OUT_OF_RESOURCES else "refused")

    def _count_remote(self, outcome: str) -> None:
        """A C-STORE's outcome in a listener process, counted here (it has no metrics of its own)."""
        if outcome == "stored" and self.metrics is not None:
            self._counter("received", self.metrics.instances_received, source="dicom").inc()
        self._count(STATUS_SUCCESS, "", outcome)

    def _count(self, status: int, comment: str, outcome: str) -> tuple[int, str]:
        if self.metrics is not None:
            self._counter(outcome, self.metrics.dicom_stores, outcome=outcome).inc()
        return status, comment

    def _counter(self, key: str, family: Any, **labels: str) -> Any:
        """A labelled counter, looked up once: ``labels()`` costs ~10 µs a call, twice per C-STORE."""
        child = self._counters.get(key)
        if child is None:
            child = self._counters[key] = family.labels(**labels)
        return child
