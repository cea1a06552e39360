"""Several listener processes behind one port: the service's side (``dicom.processes`` above one).

Why: one interpreter receiving four associations is bound by its GIL, not by the disk: ~1.2 ms of Python
per instance, the two cores not busy, 0.56-0.97x of DCMTK ``storescp`` (which forks nothing, but runs no
Python) where one association reached 1.1x its durable rate; two whole services taking two associations
each moved 1.22x one taking four (bench/RESULTS.md, session 27). Issue 20 named the remedy: several
listener processes on one port, sharing the store.

How the work is split, so that nothing the store answers for is decided twice:

- **Here** (the service's process): the port is bound, and each connection accepted goes to whichever
  serves the fewest connections: this process's own listener (:mod:`service.ingest.scp`) first, up to
  two (its instances cross no channel, so one or two senders are served exactly as with one process), or
  a listener process, handed with ``SCM_RIGHTS`` over its channel (:mod:`service.ingest.channel`). (The
  kernel's ``SO_REUSEPORT`` spreads by a hash of addresses: four senders land 3:1 or 4:0 on two
  processes half the time.) The store stays here: claims and the admission check
  (:meth:`GroupCommit.admit`: a duplicate, 0xA900, a full study, a full disk) made on the channel's
  reader thread as each request arrives, the rows' group commit, the placement of slots into their
  files, and the open-associations evidence the assembly gate reads (:class:`OpenAssociations`).
- **In a listener process** (:mod:`service.ingest.front`): the whole upper layer of its connections (the
  door with its share of the limits, TLS, negotiation, P-DATA), the dataset assembled, scanned and parsed,
  and written into a slot of its own (``<slots>/front-<k>``) and ``fdatasync``'d while the service admits
  it; only then is the sender answered, after the slot's path went to the service ("written"). A process
  that dies leaves its admitted-but-unwritten claims released here, its associations ended (aborted), and
  is started again; a slot it synced but never reported (so never acknowledged) is placed at the next
  start, which first gathers every ``front-*`` slot into the service's slot directory
  (:meth:`service.store.slots.SlotStore.open`), so the replay and re-index treat them as any other.

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
import pickle
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import service
from service.config import AssemblySettings, DicomSettings
from service.errors import PacsTriageError, StorageFullError
from service.ingest.acceptor import STORE_ON_LOOP_UP_TO
from service.ingest.associations import OpenAssociations
from service.ingest.channel import Channel
from service.logs import JsonFormatter
from service.store.claims import ClaimBusy
from service.store.group_commit import Admitted, GroupCommit
from service.store.slot_place import Slotted
from service.store.slots import FRONT_PREFIX, SlotStore
from service.store.validate import ParsedInstance

__all__ = ["ListenerProcesses", "share"]

_READY_S = 30.0

logger = logging.getLogger(__name__)


@dataclass(eq=False)
class _Process:
    index: int
    proc: subprocess.Popen[bytes]
    channel: Channel
    ready: threading.Event = field(default_factory=threading.Event)
    load: int = 0
    """Connections handed to it and not yet closed."""
    handed: int = 0
    """Connections handed to it in all."""
    alive: bool = True
    served: bool = False
    """It said it was ready once (one that dies before is not started again: it would again)."""
    admitted: dict[int, Admitted] = field(default_factory=dict)
    """Instances admitted for it and not yet written (by its request number)."""
    associations: set[int] = field(default_factory=set)
    """Its open associations (their ids there)."""
    pings: int = 0
    pongs: int = 0
    reader: threading.Thread | None = None


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
        self._processes: list[_Process] = []
        self._server: socket.socket | None = None
        self._acceptor: threading.Thread | None = None
        self._stopping = False
        self._admits = ThreadPoolExecutor(settings.store_threads, thread_name_prefix="dicom-admit")

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

    def _spawn(self, k: int) -> _Process:
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
        p = _Process(k, proc, ours)
        ours.send(("setup", self._setup(k)))
        p.reader = threading.Thread(target=self._read, args=(p,), name=f"dicom-process-{k}", daemon=True)
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
        self._admits.shutdown(wait=True)

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

    # ---- what a process sends ------------------------------------------------------------------------

    def _read(self, p: _Process) -> None:
        handlers: dict[str, Callable[..., object]] = {
            "admit": lambda rid, fields, held: self._admit(p, rid, fields, held, wait=False),
            "written": lambda rid, path: self._written(p, rid, path),
            "release": lambda rid: self._release(p, rid),
            "opened": lambda aid: self._opened(p, aid),
            "stored": lambda aid, study: self.tracker.stored((p.index, aid), study),
            "ended": lambda aid, released: self._ended(p, aid, released),
            "count": self.on_outcome,
            "gone": lambda: self._gone(p),
            "pong": lambda n: self._pong(p, n),
            "ready": lambda: self._ready(p),
            "bye": lambda: None,
        }
        try:
            while (message := p.channel.recv_message()) is not None:
                try:
                    handlers[message[0]](*message[1:])
                except Exception:
                    logger.exception("DICOM listener process %d: handling %r failed", p.index, message[0])
                if message[0] == "bye":  # it stopped: our end's shutdown lets it exit
                    with contextlib.suppress(OSError):
                        p.channel.sock.shutdown(socket.SHUT_RDWR)
                    break
        finally:
            self._lost(p)

    def _admit(
        self, p: _Process, rid: int, fields: tuple[Any, ...], held: bool, *, wait: bool = True
    ) -> None:
        """:meth:`GroupCommit.admit` for the process, on its reader thread (no hand-over on the answer
        path) unless another caller's claim on the instance must be waited for: then on a pool thread, so
        that the reader goes on reading (the claim's holder may be this very process). The verdict: True
        (claimed: write it), False (a duplicate: success), or the error the answer is made of."""
        verdict: bool | BaseException
        try:
            admitted = self.group.admit(ParsedInstance.from_fields(fields), held=held, wait=wait)
        except ClaimBusy:
            self._admits.submit(self._admit, p, rid, fields, held)
            return
        except BaseException as exc:
            if not isinstance(exc, PacsTriageError):
                logger.exception("DICOM listener process %d: admitting an instance failed", p.index)
            verdict = _portable(exc)
        else:
            if admitted.claim is None:
                verdict = False
                self.on_outcome("duplicate")
            else:
                verdict = True
                with self._cond:
                    p.admitted[rid] = admitted
        try:
            p.channel.send(("verdict", rid, verdict))
        except OSError:  # the process is gone: _lost releases the claim
            pass

    def _written(self, p: _Process, rid: int, path: str) -> None:
        with self._cond:
            admitted = p.admitted.pop(rid)
        self.group.written(admitted, Slotted(self.slots, Path(path)))
        self.on_outcome("stored")

    def _release(self, p: _Process, rid: int) -> None:
        with self._cond:
            admitted = p.admitted.pop(rid, None)
        if admitted is not None:
            self.group.release(admitted)

    def _opened(self, p: _Process, aid: int) -> None:
        p.associations.add(aid)
        self.tracker.opened((p.index, aid))

    def _ended(self, p: _Process, aid: int, released: bool) -> None:
        p.associations.discard(aid)
        end = self.tracker.ended((p.index, aid), released=released)
        self.group.ended(end.studies, released=end.released)

    def _ready(self, p: _Process) -> None:
        p.served = True
        p.ready.set()

    def _gone(self, p: _Process) -> None:
        with self._cond:
            p.load = max(0, p.load - 1)

    def _pong(self, p: _Process, n: int) -> None:
        with self._cond:
            p.pongs = max(p.pongs, n)
            self._cond.notify_all()

    def _lost(self, p: _Process) -> None:
        """The process's channel ended: a stop, or a death. Its claims not written are released, its
        associations ended as aborted; a process that died is started again."""
        with self._cond:
            p.alive = False
            stopping = self._stopping
            admitted, p.admitted = list(p.admitted.values()), {}
            self._cond.notify_all()
        p.ready.set()  # (a start waiting for it waits no more)
        for a in admitted:
            self.group.release(a)
        for aid in list(p.associations):
            self._ended(p, aid, released=False)
        if stopping:
            return
        if not p.served:
            logger.error("DICOM listener process %d exited before it was ready; not started again", p.index)
            return
        code = p.proc.wait()
        logger.error("DICOM listener process %d exited (status %s); starting it again", p.index, code)
        p.channel.close()
        try:
            again = self._spawn(p.index)
        except OSError:
            logger.exception("DICOM listener process %d could not be started again", p.index)
            return
        with self._cond:
            self._processes[self._processes.index(p)] = again


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


def _portable(exc: BaseException) -> BaseException:
    """The error as it can cross to the process (pickled); one that cannot becomes a 0xA700."""
    try:
        pickle.dumps(exc)
    except Exception:
        return StorageFullError(f"the store failed ({type(exc).__name__}); try again later")
    return exc
