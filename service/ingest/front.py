"""A listener process: the upper layer and the slot writes of the connections the service hands it.

Started by :mod:`service.ingest.processes` (``dicom.processes`` above one) as ``python -m
service.ingest.front <fd>``, with one end of a channel (:mod:`service.ingest.channel`); see that module
for why and how the work is split. Here runs the same :class:`DicomListener` as in the service, with its
store side replaced: :class:`RemoteCommits` asks the service to admit each instance (claims, duplicates,
conflicts, room) while this process writes it into a slot of its own, and reports the slot once it is
durable; :class:`RemoteTracker` reports associations. Nothing here touches the database.

The process ends when the service says so (it stops its listener first, finishing the stores in
progress, whose admissions are still answered) or when the channel ends (the service is gone: stores
waiting for an admission are refused with 0xA700, and the associations aborted).
"""

from __future__ import annotations

import itertools
import logging
import signal
import socket
import sys
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from service.config import AssemblySettings, DicomSettings
from service.errors import StorageFullError
from service.ingest.associations import AssociationEnd
from service.ingest.channel import Channel
from service.ingest.requests import Association
from service.ingest.scp import DicomListener
from service.logs import configure_logging
from service.runtime import freeze_startup_objects
from service.store.admission import Admitted, store_admitted
from service.store.claims import Claim
from service.store.slot_place import Slotted, write_slot
from service.store.slots import SlotsBusyError, SlotStore
from service.store.validate import ParsedInstance

__all__ = ["Asked", "FrontListener", "RemoteCommits", "RemoteTracker", "main"]

logger = logging.getLogger(__name__)

_LOCK_WAIT_S = 10.0
"""How long a process started again waits for its slot directory's lock (its predecessor's exit)."""


@dataclass(eq=False)
class _RemoteClaim(Claim):
    """The service's claim on an instance this process writes: its request number there."""

    rid: int = 0


@dataclass(frozen=True)
class Asked:
    """An admission asked of the service (:meth:`RemoteCommits.ask`); :meth:`result` waits for its verdict."""

    instance: ParsedInstance
    held: bool
    rid: int
    answer: Future[bool | BaseException]

    def result(self) -> Admitted:
        verdict = self.answer.result()
        if isinstance(verdict, BaseException):
            raise verdict
        claim = _RemoteClaim(self.instance.study_uid, rid=self.rid) if verdict else None
        return Admitted(self.instance, self.held, claim)


class SlotWriter:
    """This process's slots, written on the answer path (:func:`write_slot`: the placer's write without
    its database)."""

    def __init__(self, slots: SlotStore) -> None:
        self.slots = slots

    def write(self, data: bytes | memoryview, crc: int | None = None) -> Slotted:
        return write_slot(self.slots, data, crc)


class RemoteCommits:
    """The store side of :class:`DicomListener` in a listener process (:class:`~service.ingest.scp.Commits`):
    the service admits, this process writes."""

    def __init__(self, channel: Channel, writer: SlotWriter) -> None:
        self.channel = channel
        self._writer = writer
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._waiting: dict[int, Future[bool | BaseException]] = {}
        self._gone = False

    @property
    def placer(self) -> SlotWriter:
        return self._writer

    def admit(self, p: ParsedInstance, *, held: bool) -> Admitted:
        """Asked of the service (:meth:`GroupCommit.admit` there): raises what it raised."""
        return self.ask(p, held).result()

    def ask(self, p: ParsedInstance, held: bool) -> Asked:
        """Send the admission of ``p``; the verdict comes while the caller writes its slot."""
        rid = next(self._ids)
        answer: Future[bool | BaseException] = Future()
        with self._lock:
            if self._gone:
                raise StorageFullError("the service is stopping; try again later")
            self._waiting[rid] = answer
        try:
            self.channel.send(("admit", rid, p.fields(), held))
        except OSError:
            self.settle(rid, StorageFullError("the service is not answering; try again later"))
        return Asked(p, held, rid, answer)

    def settle(self, rid: int, verdict: bool | BaseException) -> None:
        """The service's verdict on request ``rid`` (from the channel's reader)."""
        with self._lock:
            answer = self._waiting.pop(rid, None)
        if answer is not None:
            answer.set_result(verdict)

    def fail_all(self) -> None:
        """The service is gone: every admission still waiting is refused (0xA700), and any later one."""
        with self._lock:
            self._gone = True
            waiting, self._waiting = list(self._waiting.values()), {}
        for answer in waiting:
            answer.set_result(StorageFullError("the service is not answering; try again later"))

    def written(self, admitted: Admitted, slotted: Slotted) -> None:
        """Durable in its slot: the service places it and commits its row (sent before the answer)."""
        assert isinstance(admitted.claim, _RemoteClaim)
        self.channel.send(("written", admitted.claim.rid, str(slotted.path)))

    def release(self, admitted: Admitted) -> None:
        if isinstance(admitted.claim, _RemoteClaim):
            self.channel.send(("release", admitted.claim.rid))

    def store(self, p: ParsedInstance, *, held: bool, crc: int | None = None) -> bool:
        """Admitted, written, reported: True if new, False for a duplicate (:meth:`GroupCommit.store`)."""
        return store_admitted(self, self._writer.write, p, held=held, crc=crc)

    def ended(self, studies: tuple[str, ...], *, released: bool) -> None:
        """Association ends are the service's to apply (:class:`RemoteTracker`)."""

    def takes_at_once(self) -> bool:
        return self._writer.slots.takes_at_once()


class RemoteTracker:
    """Associations reported to the service's :class:`OpenAssociations` (each study once per association)."""

    def __init__(self, channel: Channel) -> None:
        self.channel = channel
        self._lock = threading.Lock()
        self._sent: dict[int, set[str]] = {}

    def opened(self, assoc: Association) -> None:
        with self._lock:
            self._sent[assoc.id] = set()
        self.channel.send(("opened", assoc.id))

    def stored(self, assoc: Association, study_uid: str) -> None:
        with self._lock:
            studies = self._sent.setdefault(assoc.id, set())
            if study_uid in studies:
                return
            studies.add(study_uid)
        self.channel.send(("stored", assoc.id, study_uid))

    def ended(self, assoc: Association, *, released: bool) -> AssociationEnd:
        with self._lock:
            self._sent.pop(assoc.id, None)
        self.channel.send(("ended", assoc.id, released))
        return AssociationEnd((), released)


class FrontListener(DicomListener):
    """:class:`DicomListener` serving the connections it is handed (:meth:`DicomListener.adopt`), not a
    port, and storing through the service (:class:`RemoteCommits`)."""

    def __init__(self, channel: Channel, remote: RemoteCommits, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, commits=remote, **kwargs)
        self.channel = channel
        self.remote = remote
        self.handed = True

    def _check_beside(self, view: memoryview, size: int, held: bool) -> Asked:
        """Checked here, before the write (no store thread woken and waited for: ~0.1 ms of Python), and
        admitted by the service while the slot is written."""
        return self.remote.ask(self._checked(view, size), held)

    def handle_gone(self) -> None:
        self.channel.send(("gone",))

    def _count(self, status: int, comment: str, outcome: str) -> tuple[int, str]:
        """Outcomes the service does not see itself (it counts what it admitted and what was written)."""
        if outcome not in ("stored", "duplicate"):
            self.channel.send(("count", outcome))
        return status, comment


def _open_slots(directory: Path, *, direct: bool) -> SlotStore:
    """This process's slots; complete ones found (a predecessor's, being placed or for the next start's
    gathering) are left alone."""
    slots = SlotStore(directory, direct=direct)
    deadline = time.monotonic() + _LOCK_WAIT_S
    while True:
        try:
            slots.open()
            return slots
        except SlotsBusyError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def main(argv: list[str]) -> int:
    # The service says when to stop (or its channel ends): a Ctrl-C or a SIGTERM sent to the whole process
    # group must not end this process before the service has stopped handing it connections.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    channel = Channel(socket.socket(fileno=int(argv[1])))
    got = channel.recv()
    if got is None or got[0][0] != "setup":
        return 2
    setup: dict[str, Any] = got[0][1]
    configure_logging(setup["log_level"], setup["log_format"])
    settings = DicomSettings.model_validate_json(setup["dicom"])
    assembly = AssemblySettings.model_validate_json(setup["assembly"])
    slots = _open_slots(Path(setup["slots"]), direct=settings.direct_io)
    slots.start()
    commits = RemoteCommits(channel, SlotWriter(slots))
    listener = FrontListener(
        channel,
        commits,
        settings,
        None,
        quiet_seconds=assembly.quiet_seconds,
        assembly=assembly,
        keep_truncated=setup["keep_truncated"],
        slots=slots,
        tracker=RemoteTracker(channel),
    )
    listener.start()
    freeze_startup_objects()
    channel.send(("ready",))
    stopping: threading.Thread | None = None

    def stop() -> None:  # the stores in progress still get their verdicts from the loop below
        listener.stop()
        slots.close()
        channel.send(("bye",))

    while (got := channel.recv()) is not None:
        message, fds = got
        kind = message[0]
        if kind == "verdict":
            commits.settle(message[1], message[2])
        elif kind == "conn":
            listener.adopt(socket.socket(fileno=fds[0]))
        elif kind == "ping":
            channel.send(("pong", message[1]))
        elif kind == "stop" and stopping is None:
            stopping = threading.Thread(target=stop, name="dicom-front-stop")
            stopping.start()
    commits.fail_all()  # the service is gone (or has said goodbye)
    if stopping is None:
        listener.stop()
        slots.close()
    else:
        stopping.join()
    channel.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
