"""Which studies have a DICOM association open right now: the evidence the assembly gate reads.

DICOM has no "end of study" message (PS3.4 Annex B), but it has an end of association: a sender that
releases its association (A-RELEASE, PS3.8 §7.2) has sent what it meant to send on it. A study whose
instances all came on associations that have ended, with none of them still open, is therefore as
complete as the sender made it; while one is open, more instances may follow, however long the pause
between them (a busy sender, a busy receiver). The quiet timer stays the fallback for senders that keep
one association open for hours.

The tracker lives in the listener's process and is fed by the association handlers: ``stored`` on each
instance stored, ``ended`` once when the association is released, aborted or its connection closes.
Thread-safe: the acceptor (:mod:`service.ingest.acceptor`) calls ``stored`` and ``ended`` from its store
threads, ``opened`` from its event loop.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Hashable
from dataclasses import dataclass

__all__ = ["AssociationEnd", "OpenAssociations"]


@dataclass(frozen=True)
class AssociationEnd:
    """What ended with one association: the studies it carried that no other open association carries."""

    studies: tuple[str, ...]
    released: bool
    """A-RELEASE (the sender finished); False for an abort or a connection that dropped."""


class OpenAssociations:
    """Open associations per study, counted (several senders may send one study at once)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_assoc: dict[Hashable, set[str]] = {}
        self._open: Counter[str] = Counter()

    def opened(self, assoc: Hashable) -> None:
        """An association was accepted (it may carry no instance: a C-ECHO)."""
        with self._lock:
            self._by_assoc.setdefault(assoc, set())

    def stored(self, assoc: Hashable, study_uid: str) -> None:
        """An instance of ``study_uid`` was stored on ``assoc``: the study is open until ``assoc`` ends."""
        with self._lock:
            studies = self._by_assoc.setdefault(assoc, set())
            if study_uid not in studies:
                studies.add(study_uid)
                self._open[study_uid] += 1

    def is_open(self, study_uid: str) -> bool:
        with self._lock:
            return self._open[study_uid] > 0

    def ended(self, assoc: Hashable, *, released: bool) -> AssociationEnd:
        """``assoc`` is gone; idempotent (release, then connection close, report one end)."""
        with self._lock:
            studies = self._by_assoc.pop(assoc, set())
            closed = []
            for study_uid in sorted(studies):
                self._open[study_uid] -= 1
                if self._open[study_uid] <= 0:
                    del self._open[study_uid]
                    closed.append(study_uid)
            return AssociationEnd(tuple(closed), released)

    def __len__(self) -> int:
        """Open associations (with or without instances)."""
        with self._lock:
            return len(self._by_assoc)
