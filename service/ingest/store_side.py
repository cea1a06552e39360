"""What the DICOM listener's handlers store through and report to, as protocols: in the service's process
the store itself (:class:`~service.store.group_commit.GroupCommit`, :class:`OpenAssociations`); in a
listener process (``dicom.processes``, :mod:`service.ingest.front`) stand-ins that ask the service over
its channel. :class:`service.ingest.scp.DicomListener` is written against these, so both run one copy of
the receive path."""

from __future__ import annotations

from typing import Protocol

from service.ingest.associations import AssociationEnd
from service.ingest.requests import Association
from service.store.admission import Admitted
from service.store.slot_place import Slotted
from service.store.validate import ParsedInstance

__all__ = ["Commits", "SlotWriter", "Tracker", "Verdict"]


class SlotWriter(Protocol):
    """What the answer path writes an instance's slot with (:class:`Placer`, or a listener process's own)."""

    def write(self, data: bytes | memoryview, crc: int | None = None) -> Slotted: ...


class Commits(Protocol):
    """The store side of a C-STORE: :class:`GroupCommit` in the service's process, its stand-in in a listener
    process (:class:`service.ingest.front.RemoteCommits`, which asks the service)."""

    @property
    def placer(self) -> SlotWriter | None: ...
    def store(self, p: ParsedInstance, *, held: bool, crc: int | None = None) -> bool: ...
    def admit(self, p: ParsedInstance, *, held: bool) -> Admitted: ...
    def written(self, admitted: Admitted, slotted: Slotted) -> None: ...
    def release(self, admitted: Admitted) -> None: ...
    def ended(self, studies: tuple[str, ...], *, released: bool) -> None: ...
    def takes_at_once(self) -> bool: ...


class Verdict(Protocol):
    """An admission under way beside the slot's write: its :meth:`result` waits for it (raises as
    :meth:`GroupCommit.admit` does)."""

    def result(self) -> Admitted: ...


class Tracker(Protocol):
    """Which studies have an association open (:class:`OpenAssociations`, or a listener process's
    messages to the one in the service)."""

    def opened(self, assoc: Association) -> None: ...
    def stored(self, assoc: Association, study_uid: str) -> None: ...
    def ended(self, assoc: Association, *, released: bool) -> AssociationEnd: ...
