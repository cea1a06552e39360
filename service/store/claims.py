"""Claims on received instances between their arrival and their committed row: who writes an instance two
senders send at once, and what the second one is told.

Why: the listener answers before the row is committed (:mod:`service.store.group_commit`), so for a while
the database does not know an acknowledged instance. Two associations sending the same new instance at
once would both find it unknown and both write it. The first caller claims its SOP Instance UID here; a
second waits until the first is done, then answers as for a duplicate (a success: PS3.4 B.2.3), or
0xA900 when the first named another study, or writes it itself if the first failed. A claim lasts until
the row is committed, so the admit check's database read and this table together always know an
acknowledged instance.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from service.store.instances import sop_conflict
from service.store.validate import ParsedInstance

__all__ = ["Claim", "ClaimBusy", "Claims"]


class ClaimBusy(Exception):
    """Another caller holds the instance's claim, and this one asked not to wait (a thread that must not
    block: :mod:`service.ingest.processes` then waits on a pool thread)."""


@dataclass(eq=False)
class Claim:
    """A new instance being written or waiting for its row; others sending it meanwhile wait on ``done``."""

    study_uid: str
    done: threading.Event = field(default_factory=threading.Event)
    durable: bool = False
    """Written and acknowledged (or found stored): a second sender's answer is "duplicate"."""


class Claims:
    """The claims of instances between their arrival and their committed row, by SOP Instance UID."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._claims: dict[str, Claim] = {}

    def claim(self, p: ParsedInstance, *, wait: bool = True) -> Claim | None:
        """This caller's claim on the instance, or None when another caller stored it meanwhile (a
        duplicate); :class:`SopInstanceConflictError` when that one named another study. With ``wait``
        False, :class:`ClaimBusy` instead of waiting for another caller's claim."""
        while True:
            with self._lock:
                claim = self._claims.get(p.sop_instance_uid)
                if claim is None:
                    claim = self._claims[p.sop_instance_uid] = Claim(p.study_uid)
                    return claim
            if not wait and not claim.done.is_set():
                raise ClaimBusy(p.sop_instance_uid)
            claim.done.wait()
            if claim.study_uid != p.study_uid:
                raise sop_conflict(p, claim.study_uid)
            if claim.durable:
                return None
            # the first writer failed: try ourselves

    def hold(self, p: ParsedInstance) -> None:
        """An instance acknowledged before a restart whose row is still to come: held as stored."""
        claim = Claim(p.study_uid, durable=True)
        claim.done.set()
        with self._lock:
            self._claims[p.sop_instance_uid] = claim

    def release(self, sop_uid: str, claim: Claim) -> None:
        """The caller is done with its claim without a row to come (a failure, a duplicate found)."""
        with self._lock:
            if self._claims.get(sop_uid) is claim:
                del self._claims[sop_uid]
        claim.done.set()

    def committed(self, sop_uid: str) -> None:
        """The instance's row is committed: the database answers for it from now on."""
        with self._lock:
            claim = self._claims.pop(sop_uid, None)
        if claim is not None:
            claim.done.set()
