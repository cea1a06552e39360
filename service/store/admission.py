"""An instance's admission: the checks its row would make, made before its slot is written and its sender
answered, and the claim that makes two callers storing the same instance store it once.

Split from :mod:`service.store.group_commit` (whose docstring says why the checks come before the answer
and the row after it). :class:`Admitted` is what :meth:`GroupCommit.admit` returns, in the service's
process or (pickled as a verdict) for a listener process (:mod:`service.ingest.front`);
:func:`store_admitted` is the one order both run: admitted, written into a slot, reported written, or
released if the write failed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from service.store.claims import Claim
from service.store.slot_place import Slotted
from service.store.validate import ParsedInstance

__all__ = ["Admits", "Admitted", "store_admitted"]


@dataclass(frozen=True)
class Admitted:
    """An instance that passed :meth:`~service.store.group_commit.GroupCommit.admit`: ``claim`` is this
    caller's, or None for a duplicate (a success with nothing to write)."""

    instance: ParsedInstance
    held: bool
    claim: Claim | None


class Admits(Protocol):
    """What :func:`store_admitted` needs: :class:`~service.store.group_commit.GroupCommit`, or a listener
    process's stand-in for it (:class:`service.ingest.front.RemoteCommits`)."""

    def admit(self, p: ParsedInstance, *, held: bool) -> Admitted: ...
    def release(self, admitted: Admitted) -> None: ...
    def written(self, admitted: Admitted, slotted: Slotted) -> None: ...


def store_admitted(
    side: Admits,
    write: Callable[[bytes | memoryview, int | None], Slotted],
    p: ParsedInstance,
    *,
    held: bool,
    crc: int | None,
) -> bool:
    """Admitted, written into a slot (``write``), reported written: True if new, False for a duplicate;
    a write that fails releases the claim (the sender's retry is stored) and raises."""
    admitted = side.admit(p, held=held)
    if admitted.claim is None:
        return False
    try:
        slotted = write(admitted.instance.data, crc)
    except BaseException:
        side.release(admitted)
        raise
    side.written(admitted, slotted)
    return True
