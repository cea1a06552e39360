"""What a listener process sends the service, applied to the store on that process's reader thread.

Split from :mod:`service.ingest.processes` (the processes' lives and the hand-over of connections; its
docstring says how the work is divided and why). One reader thread per process reads its channel in
order and applies each message as it comes: an admission is decided right there
(:meth:`GroupCommit.admit`, no hand-over on the answer path) unless another caller's claim on the same
instance must be waited for, which goes to a small pool so that the reader goes on reading (the claim's
holder may be this very process); "written" hands the slot to the placement and the row to the group
commit; association reports go to the open-associations tracker the assembly gate reads.

Messages (tuples, :mod:`service.ingest.channel`), from the process: ``("ready",)``, ``("admit", rid,
fields, held)``, ``("written", rid, slot path)``, ``("release", rid)``, ``("opened", aid)``, ``("stored",
aid, study)``, ``("ended", aid, released)``, ``("count", outcome)``, ``("gone",)`` (a connection closed),
``("pong", n)``, ``("bye",)``; to it: ``("verdict", rid, True | False | error)`` and those of
:mod:`service.ingest.processes` (``setup``, ``conn``, ``ping``, ``stop``).
"""

from __future__ import annotations

import contextlib
import logging
import pickle
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from service.errors import PacsTriageError, StorageFullError
from service.ingest.associations import OpenAssociations
from service.ingest.channel import Channel
from service.store.admission import Admitted
from service.store.claims import ClaimBusy
from service.store.group_commit import GroupCommit
from service.store.slot_place import Slotted
from service.store.slots import SlotStore
from service.store.validate import ParsedInstance

__all__ = ["ListenerProcess", "ProcessMessages"]

logger = logging.getLogger(__name__)


@dataclass(eq=False)
class ListenerProcess:
    """One listener process as the service sees it (its fields under the owner's condition)."""

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
    started: float = field(default_factory=time.monotonic)
    quick_deaths: int = 0
    """Deaths in a row of the processes in this place, each soon after its start
    (:func:`service.ingest.processes.restart_delay`)."""


class ProcessMessages:
    """The service's side of every process's channel: :meth:`read` (a reader thread's body), :meth:`forget`
    (a process gone), :meth:`shutdown`."""

    def __init__(
        self,
        group: GroupCommit,
        tracker: OpenAssociations,
        slots: SlotStore,
        cond: threading.Condition,
        *,
        on_outcome: Callable[[str], None],
        admit_threads: int,
    ) -> None:
        self.group = group
        self.tracker = tracker
        self.slots = slots
        self.on_outcome = on_outcome
        self._cond = cond
        """The owner's (:class:`~service.ingest.processes.ListenerProcesses`): guards the processes'
        ``load``, ``pongs`` and ``admitted``, and is notified when a pong arrives."""
        self._admits = ThreadPoolExecutor(admit_threads, thread_name_prefix="dicom-admit")

    def read(self, p: ListenerProcess, lost: Callable[[ListenerProcess], None]) -> None:
        """Read ``p``'s channel to its end, applying each message; then ``lost(p)``."""
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
            lost(p)

    def forget(self, p: ListenerProcess) -> None:
        """``p``'s channel ended (a stop or a death): its claims not written are released, its associations
        ended as aborted."""
        with self._cond:
            admitted, p.admitted = list(p.admitted.values()), {}
        for a in admitted:
            self.group.release(a)
        for aid in list(p.associations):
            self._ended(p, aid, released=False)

    def shutdown(self) -> None:
        self._admits.shutdown(wait=True)

    def _admit(
        self, p: ListenerProcess, rid: int, fields: tuple[Any, ...], held: bool, *, wait: bool = True
    ) -> None:
        """:meth:`GroupCommit.admit` for the process, on its reader thread unless another caller's claim
        must be waited for (then on the pool: see the module docstring). The verdict: True (claimed: write
        it), False (a duplicate: success), or the error the answer is made of."""
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
                    kept = p.alive
                    if kept:
                        p.admitted[rid] = admitted
                if not kept:  # gone meanwhile (an admission waited for on the pool): forgotten already
                    self.group.release(admitted)
                    return
        try:
            p.channel.send(("verdict", rid, verdict))
        except OSError:  # the process is gone: forget() releases the claim
            pass

    def _written(self, p: ListenerProcess, rid: int, path: str) -> None:
        with self._cond:
            admitted = p.admitted.pop(rid)
        self.group.written(admitted, Slotted(self.slots, Path(path)))
        self.on_outcome("stored")

    def _release(self, p: ListenerProcess, rid: int) -> None:
        with self._cond:
            admitted = p.admitted.pop(rid, None)
        if admitted is not None:
            self.group.release(admitted)

    def _opened(self, p: ListenerProcess, aid: int) -> None:
        p.associations.add(aid)
        self.tracker.opened((p.index, aid))

    def _ended(self, p: ListenerProcess, aid: int, released: bool) -> None:
        p.associations.discard(aid)
        end = self.tracker.ended((p.index, aid), released=released)
        self.group.ended(end.studies, released=end.released)

    def _ready(self, p: ListenerProcess) -> None:
        p.served = True
        p.ready.set()

    def _gone(self, p: ListenerProcess) -> None:
        with self._cond:
            p.load = max(0, p.load - 1)

    def _pong(self, p: ListenerProcess, n: int) -> None:
        with self._cond:
            p.pongs = max(p.pongs, n)
            self._cond.notify_all()


def _portable(exc: BaseException) -> BaseException:
    """The error as it can cross to the process (pickled); one that cannot becomes a 0xA700."""
    try:
        pickle.dumps(exc)
    except Exception:
        return StorageFullError(f"the store failed ({type(exc).__name__}); try again later")
    return exc
