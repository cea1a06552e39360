"""What the group commit queues (a received instance's row, an association's end) and the one transaction
that commits a batch of them in queue order.

Split from :mod:`service.store.group_commit` (the queue, its committer thread and its retries; its
docstring says why rows follow the answer). The order matters: an association's end moves the gates of
its studies (:func:`service.store.gates.association_ended`) only after the rows it carried, in the same
transaction or a later one, so a study is never judged complete on rows not yet committed.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy.orm import Session

from service.clock import utcnow
from service.config import AssemblySettings
from service.store.gates import association_ended
from service.store.instances import Instances
from service.store.validate import ParsedInstance

__all__ = ["QueuedEnd", "QueuedRow", "commit_queued"]


@dataclass(frozen=True)
class QueuedRow:
    """A durable instance's row, its attributes only (rows need no pixels)."""

    instance: ParsedInstance
    held: bool
    """An association of its study was open when it was stored (the held gate applies)."""


@dataclass(frozen=True)
class QueuedEnd:
    """An association's end: no association carries these studies any more."""

    studies: tuple[str, ...]
    released: bool


def commit_queued(
    s: Session,
    group: list[QueuedRow | QueuedEnd],
    instances: Instances,
    *,
    quiet: timedelta,
    hold: timedelta,
    assembly: AssemblySettings,
) -> bool:
    """The rows in queue order (:meth:`Instances.commit_rows`), each association end after the rows queued
    before it, in the caller's transaction; True if a job became due now. ``quiet``: the quiet timer's
    wait; ``hold``: the longest an open association holds its study (``assembly.max_hold_seconds``)."""
    now = utcnow()
    quiet_until = now + quiet
    due = False
    rows: list[QueuedRow] = []
    for item in [*group, None]:
        if isinstance(item, QueuedRow):
            rows.append(item)
            continue
        for held in (True, False):
            part = [r.instance for r in rows if r.held is held]
            if part:
                done = instances.commit_rows(
                    s,
                    part,
                    not_before=quiet_until,
                    hold_until=now + hold if held else None,
                    complete_when_full=assembly.complete_when_full,
                )
                due = due or any(gate <= utcnow() for gate in done.gates)
        rows = []
        if isinstance(item, QueuedEnd):
            due = association_ended(s, list(item.studies), item.released, quiet_until, assembly) or due
    return due
