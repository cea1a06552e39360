"""Several listener processes behind one port: the service's side (``dicom.processes`` above one).

Why: one interpreter receiving four associations is bound by its GIL, not by the disk: ~1.2 ms of Python
per instance, the two cores not busy, 0.56-0.97x of DCMTK ``storescp`` (which forks nothing, but runs no
Python) where one association reached 1.1x its durable rate; two whole services taking two associations
each moved 1.22x one taking four (bench/RESULTS.md, session 27). Issue 20 named the remedy: several
listener processes on one port, sharing the store.

How the work is split, so that nothing the store answers for is decided twice:

- **Here** (the service's process): the port is bound, and each connection accepted goes to whichever serves
  the fewest connections: this process's own listener (:mod:`service.ingest.scp`) first, up to two (its
  instances cross no channel, so one or two senders are served exactly as with one process), or a listener
  process, handed with ``SCM_RIGHTS`` over its channel (:mod:`service.ingest.channel`). (The kernel's
  ``SO_REUSEPORT`` spreads by a hash of addresses: four senders land 3:1 or 4:0 on two processes half the
  time.) The store stays here: claims and the admission check (:meth:`GroupCommit.admit`: a duplicate, 0xA900,
  a full study, a full disk) made on the channel's reader thread as each request arrives
  (:mod:`service.ingest.process_messages`), the rows' group commit, the placement of slots into their files,
  and the open-associations evidence the assembly gate reads (:class:`OpenAssociations`).
- **In a listener process** (:mod:`service.ingest.front`): the whole upper layer of its connections (the door
  with its share of the limits, TLS, negotiation, P-DATA), the dataset assembled, scanned and parsed, and
  written into a slot of its own (``<slots>/front-<k>``) and ``fdatasync``'d while the service admits it; only
  then is the sender answered, after the slot's path went to the service ("written"). A process that dies
  leaves its admitted-but-unwritten claims released here, its associations ended (aborted), and is started
  again (after a growing wait if it keeps dying soon after its start: :func:`restart_delay`); a slot it synced
  but never reported (so never acknowledged) is placed at the next start, which first gathers every
  ``front-*`` slot into the service's slot directory (:meth:`service.store.slots.SlotStore.open`), so the
  replay and re-index treat them as any other.

Ordering: a process sends an instance's "written" before its answer and an association's "ended" after the
last answer it carried, on one channel, so the service sees them in that order (as the in-process listener
hands them to the group commit). :meth:`ListenerProcesses.caught_up` waits until everything the processes
sent so far has been read: a flush, or an API asking whether a study has rows still to come right after
its sender was answered.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import service
from service.config import AssemblySettings, DicomSettings
from service.ingest.acceptor import STORE_ON_LOOP_UP_TO
from service.ingest.associations import OpenAssociations
from service.ingest.channel import Channel
from service.ingest.process_messages import ListenerProcess, ProcessMessages
from service.logs import JsonFormatter
from service.store.group_commit import GroupCommit
from service.store.slots import FRONT_PREFIX, SlotStore

__all__ = ["ListenerProcesses", "restart_delay", "share"]

_READY_S = 30.0
_QUICK_DEATH_S = 60.0
"""A process that dies within this of its start counts towards :func:`restart_delay`."""
_BACKOFF_MAX_S = 60.0

logger = logging.getLogger(__name__)


class ListenerProcesses:
    """:meth:`start` (bind, start the processes, accept), :meth:`stop`; :meth:`caught_up`."""

    def __init__(
        self,
        settings: DicomSettings,
        group: GroupCommit,
        tracker: OpenAssociations,
        *,
        slots: SlotStore,
        assembly: AssemblySettings,
        keep_truncated: bool,
        on_outcome: Callable[[str], None],
        local: Callable[[socket.socket], None],
    ) -> None:
        self.settings = settings
        self.count = settings.processes
        self.group = group
        self.tracker = tracker
        self.slots = slots
        self.assembly = assembly
        self.keep_truncated = keep_truncated
        self.on_outcome = on_outcome
        self.local = local
        """Hands a connection to this process's own listener (the first of ``processes``)."""
        self._local_load = 0
        self._cond = threading.Condition()
        self._processes: list[ListenerProcess] = []
        self._server: socket.socket | None = None
        self._acceptor: threading.Thread | None = None
        self._stopping = False
        self._messages = ProcessMessages(
            group, tracker, slots, self._cond, on_outcome=on_outcome, admit_threads=settings.store_threads
        )

    # ---- start and stop -----------------------------------------------------------------------------

    def start(self) -> int:
        """Bind, start the other processes, wait until they are ready (~1 s: an interpreter and its
        imports; at most :data:`_READY_S`) and accept; returns the port (OSError when it cannot be bound).
        A process that is not ready in time is logged and left out until it is: this process's own
        listener takes its connections meanwhile."""
        s = self.settings
        self._server = socket.create_server((s.host, s.port), backlog=128)
        try:
            for k in range(self.count - 1):
                self._processes.append(self._spawn(k))
        except BaseException:
            self.stop(5.0)
            raise
        deadline = time.monotonic() + _READY_S
        for p in self._processes:
            if not p.ready.wait(max(0.0, deadline - time.monotonic())):
                logger.error("DICOM listener process %d is not ready after %.0f s", p.index, _READY_S)
        self._acceptor = threading.Thread(target=self._accept, name="dicom-accept", daemon=True)
        self._acceptor.start()
        return int(self._server.getsockname()[1])

    def _spawn(self, k: int) -> ListenerProcess:
        ours, theirs = Channel.pair()
        fd = theirs.sock.fileno()
        env = dict(os.environ)
        root = str(Path(service.__file__).resolve().parent.parent)  # where `service` is importable from
        env["PYTHONPATH"] = os.pathsep.join(x for x in (root, env.get("PYTHONPATH", "")) if x)
        proc = subprocess.Popen(  # noqa: S603 (our own interpreter and module)
            [sys.executable, "-m", "service.ingest.front", str(fd)],
            pass_fds=(fd,),
            env=env,
            stdin=subprocess.DEVNULL,
        )
        theirs.close()
        p = ListenerProcess(k, proc, ours)
        ours.send(("setup", self._setup(k)))
        p.reader = threading.Thread(
            target=self._messages.read, args=(p, self._lost), name=f"dicom-process-{k}", daemon=True
        )
        p.reader.start()
        return p

    def _setup(self, k: int) -> dict[str, Any]:
        """What process ``k`` needs: the settings with its share of the door's limits, its slots."""
        root = logging.getLogger()
        json_logs = any(isinstance(h.formatter, JsonFormatter) for h in root.handlers)
        return {
            "dicom": share(self.settings).model_dump_json(),
            "assembly": self.assembly.model_dump_json(),
            "slots": str(self.slots.directory / f"{FRONT_PREFIX}{k}"),
            "keep_truncated": self.keep_truncated,
            "log_level": logging.getLevelName(root.getEffectiveLevel()),
            "log_format": "json" if json_logs else "text",
        }

    def stop(self, timeout: float = 30.0) -> None:
        """Stop accepting; each process aborts its associations, finishes the stores in progress (their
        admissions still answered here) and exits."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()  # (a restart waiting out its delay gives up)
        if self._server is not None:
            with contextlib.suppress(OSError):
                self._server.shutdown(socket.SHUT_RDWR)  # wakes accept()
            self._server.close()
        if self._acceptor is not None:
            self._acceptor.join(timeout)
        for p in self._processes:
            with contextlib.suppress(OSError):
                p.channel.send(("stop",))
        deadline = time.monotonic() + timeout
        for p in self._processes:
            if p.reader is not None:
                p.reader.join(max(0.0, deadline - time.monotonic()))
            try:
                p.proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                logger.error("DICOM listener process %d did not stop; killed", p.index)
                p.proc.kill()
                p.proc.wait()
            p.channel.close()
        self._messages.shutdown()

    # ---- connections --------------------------------------------------------------------------------

    def _accept(self) -> None:
        assert self._server is not None
        while True:
            try:
                conn, _addr = self._server.accept()
            except OSError:
                if self._stopping:
                    return
                time.sleep(0.05)  # EMFILE and the like: the connection waits in the backlog meanwhile
                continue
            self._hand_over(conn)

    def _hand_over(self, conn: socket.socket) -> None:
        """To this process's own listener while it serves fewer than :data:`STORE_ON_LOOP_UP_TO` (its
        instances cross no channel, and its loop stores that many itself); then to whichever serves
        the fewest, a ready process on a tie (the descriptor is duplicated into it)."""
        with self._cond:
            live = [p for p in self._processes if p.alive and p.ready.is_set()]
            p = min(live, key=lambda q: q.load, default=None)
            if p is None or self._local_load < max(STORE_ON_LOOP_UP_TO, p.load):
                self._local_load += 1
                p = None
            else:
                p.load += 1
                p.handed += 1
        if p is not None:
            try:
                p.channel.send(("conn",), (conn.fileno(),))
            except OSError:  # it died just now: served here instead
                with self._cond:
                    p.load -= 1
                    self._local_load += 1
            else:
                conn.close()  # (its duplicate is the process's)
                return
        self.local(conn)

    def gone_here(self) -> None:
        """A connection this process's own listener served is closed."""
        with self._cond:
            self._local_load = max(0, self._local_load - 1)

    def caught_up(self, timeout: float | None, *, busy_only: bool = False) -> bool:
        """Wait until every message each live process sent before this call has been read and handled.
        ``busy_only``: only processes serving a connection now; one that serves none has sent everything
        (its "gone" for a connection comes after the rest of that connection's messages), which spares
        an API request the round trip while no sender is connected there."""
        with self._cond:
            targets = []
            for p in self._processes:
                if p.alive and p.ready.is_set() and (p.load or not busy_only):
                    p.pings += 1
                    targets.append((p, p.pings))
        for p, n in targets:
            with contextlib.suppress(OSError):
                p.channel.send(("ping", n))
        with self._cond:
            return self._cond.wait_for(lambda: all(p.pongs >= n or not p.alive for p, n in targets), timeout)

    def _lost(self, p: ListenerProcess) -> None:
        """The process's channel ended: a stop, or a death. Its claims not written are released, its
        associations ended as aborted (:meth:`ProcessMessages.forget`); a process that died is started
        again, at once the first time, later after a wait when it keeps dying (:func:`restart_delay`)."""
        with self._cond:
            p.alive = False
            self._cond.notify_all()
        p.ready.set()  # (a start waiting for it waits no more)
        self._messages.forget(p)
        with self._cond:
            if self._stopping:
                return
        if not p.served:
            logger.error("DICOM listener process %d exited before it was ready; not started again", p.index)
            return
        code = p.proc.wait()
        p.channel.close()
        deaths = p.quick_deaths + 1 if time.monotonic() - p.started < _QUICK_DEATH_S else 0
        delay = restart_delay(deaths)
        logger.error(
            "DICOM listener process %d exited (status %s); starting it again%s",
            p.index,
            code,
            f" in {delay:g} s ({deaths} deaths in a row, each within {_QUICK_DEATH_S:g} s of its start)"
            if delay
            else "",
        )
        with self._cond:  # (a stop meanwhile sees either no new process or the new one in the list)
            if self._cond.wait_for(lambda: self._stopping, delay):
                return
            try:
                again = self._spawn(p.index)
            except OSError:
                logger.exception("DICOM listener process %d could not be started again", p.index)
                return
            again.quick_deaths = deaths
            self._processes[self._processes.index(p)] = again


def restart_delay(quick_deaths: int) -> float:
    """Seconds before a listener process is started again after ``quick_deaths`` deaths in a row, each
    within :data:`_QUICK_DEATH_S` of its start: none after the first (a crash is restarted at once), then
    1 s, 2 s, 4 s, ... at most :data:`_BACKOFF_MAX_S`, so that a process that dies at once every time (a
    sender whose data crashes it, a broken install) does not keep a core busy starting interpreters."""
    if quick_deaths <= 1:
        return 0.0
    return float(min(_BACKOFF_MAX_S, 2.0 ** (quick_deaths - 2)))


def share(settings: DicomSettings) -> DicomSettings:
    """One process's settings: its share of the door's limits (associations, waiting connections: each
    process keeps its own door, and connections go to the least busy, so the shares add up to the
    limits), as a process of its own (``processes`` 1)."""
    n = settings.processes
    shares = {
        name: max(1, math.ceil(getattr(settings, name) / n))
        for name in ("max_associations", "max_pending", "max_pending_per_address")
    }
    return settings.model_copy(update={**shares, "processes": 1})
