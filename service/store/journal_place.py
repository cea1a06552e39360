"""Journalled instances into their files, in the background; and the journal's replay at start.

The listener answers a C-STORE once the instance's journal record is covered by an ``fdatasync``
(:mod:`service.store.journal`). From there, here, in one thread, in arrival order and in batches: each
instance is written to its file (temporary name, write, fsync; the fsyncs of a batch run side by side, so
the filesystem merges their commits), renamed into place, and each directory touched by the batch is
fsynced once (:func:`service.store.files.place_all`). Only then are the batch's rows handed to the group
commit (:mod:`service.store.group_commit`), so a row never exists before its file: the worker, which finds
a study's instances through their rows (:meth:`Instances.records`), and the completion gates, which count
rows, never see an instance that is not in its place. Until its row is committed, the study counts as
"rows waiting" (:meth:`GroupCommit.holds_rows_of`: the API answers 202, never 404). An association's end is
queued through here too, behind the instances it carried, so the gate that judges a study at association
end (:func:`service.store.gates.association_ended`) sees their rows.

A record's space is released (:meth:`Journal.done`) once its row is committed, or at once when the
instance turned out to be a duplicate. A placement that fails (disk full, I/O error) is retried with a
backoff: the instance was acknowledged and its data are in the journal; a process stopped meanwhile leaves
it to the replay. While placements fail, new instances are refused, but only after a fresh attempt asked
for by the arriving instance has failed too (:class:`service.store.background.RetryOnDemand`): once there
is room again, the first instance sent is taken.

**Replay** (:func:`replay_journal`, at start, before the listener opens and before the re-index): every
complete record whose instance has no row is written to its file durably and given its row through the
same insert as every arrival (:meth:`Instances.commit_rows`), so it is never lost and, since a study is
complete only on its rows, never analysed twice; a record whose row exists is skipped (placed and committed
before the crash). A torn tail record is discarded: its sender got no success. A record whose file the
disk has no room for is neither skipped nor lost: its segment stays, and the listener's placer
(:meth:`GroupCommit.resume`) places it and gives it its row once there is room, as for any arrival (a
crash meanwhile replays it again). The replay used to count such a record "cannot be placed" and reuse its
segment: a restart on a full disk lost acknowledged instances.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from service.clock import utcnow
from service.errors import PacsTriageError, StorageFullError
from service.store.background import BATCH, LINGER_S, RetryOnDemand, batch_ready
from service.store.db import InstanceRow
from service.store.files import Staged, check_free_space, instance_relpath, place_all, stage, write_durably
from service.store.instances import Instances
from service.store.journal import Entry, Journal
from service.store.journal_format import Record
from service.store.validate import ParsedInstance, parse_instance

__all__ = ["Journalled", "Placer", "Replayed", "replay_journal"]

logger = logging.getLogger(__name__)

_CHUNK = 500


@dataclass
class Journalled:
    """What :meth:`Placer.journal` returns: shaped like :class:`service.store.files.Staged` for the group
    commit (``discard`` when the instance is a duplicate); the file itself is the placer's."""

    journal: Journal
    entry: Entry

    def discard(self) -> None:
        self.journal.done(self.entry)


@dataclass(frozen=True)
class _Item:
    instance: ParsedInstance | None  # None: only ``then`` (an association end) passes through
    entry: Entry | None
    then: Any
    """Handed to the group commit once the file is in place (its row, or an association end)."""


class Placer:
    """One thread between :meth:`start` and :meth:`stop`; ``forward`` (the group commit's) takes the rows
    and association ends of each placed batch, in order."""

    def __init__(
        self,
        journal: Journal,
        instances: Instances,
        *,
        delay_seconds: float = 0.0,
        threads: int = 4,
        linger_seconds: float = LINGER_S,
    ) -> None:
        self.journal = journal
        self.linger_seconds = linger_seconds
        self.instances = instances
        self.delay_seconds = delay_seconds
        """Testing only (``dicom.journal_place_delay_seconds``): hold each placement this long."""
        self.forward: Callable[[list[Any]], None] = lambda _items: None
        self._cond = threading.Condition()
        self._queue: list[_Item] = []
        self._entries: dict[str, Entry] = {}  # placed, row not committed yet
        self._hurry = 0  # callers waiting for everything queued to be placed: no lingering meanwhile
        self._stopping = False
        self._retry = RetryOnDemand(  # while placements fail: refuse
            self._cond, lambda: self._stopping, logger, "placing journalled instances into their files"
        )
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None
        self._threads = threads
        self._pool: ThreadPoolExecutor | None = None

    def journal_record(self, p: ParsedInstance) -> Journalled:
        """Append the instance to the journal; durable when this returns (on a staging thread).

        Refused with :class:`StorageFullError` (0xA700, "try again later") while placements fail (after a
        fresh attempt, :class:`RetryOnDemand`) or the journal is full: what cannot be placed is not taken
        in."""
        check_free_space(self.instances.instances_dir, self.instances.disk_high_watermark)
        if self._retry.failing:  # read without the lock first: the common case costs nothing
            with self._cond:
                failing = self._retry.still_failing()
            if failing:
                raise StorageFullError("received instances cannot be written to their files; try again later")
        try:
            entry = self.journal.append(p.study_uid, p.series_uid, p.sop_instance_uid, p.data)
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise StorageFullError("no space left to store the instance; try again later") from exc
            raise
        return Journalled(self.journal, entry)

    def takes_at_once(self, size: int) -> bool:
        """Would :meth:`journal_record` of about ``size`` bytes wait for nothing but the journal's own sync:
        placements are not failing (no fresh attempt to wait for) and the journal has room
        (:meth:`Journal.takes_at_once`)."""
        return not self._retry.failing and self.journal.takes_at_once(size)

    def submit(self, p: ParsedInstance | None, journalled: Journalled | None, then: object) -> None:
        """Place ``p`` (if any) in the background, then forward ``then`` to the group commit."""
        with self._cond:
            self._queue.append(_Item(p, journalled.entry if journalled else None, then))
            self._cond.notify_all()

    @contextlib.contextmanager
    def hurried(self) -> Iterator[None]:
        """While inside, batches are placed without lingering (a caller is waiting for the rows)."""
        with self._cond:
            self._hurry += 1
            self._cond.notify_all()
        try:
            yield
        finally:
            with self._cond:
                self._hurry -= 1

    def committed(self, sop_instance_uid: str) -> None:
        """The instance's row is committed: its journal record is no longer needed."""
        with self._cond:
            entry = self._entries.pop(sop_instance_uid, None)
        if entry is not None:
            self.journal.done(entry)

    def start(self) -> None:
        self._stopping = False
        self._stopped.clear()
        self._pool = ThreadPoolExecutor(self._threads, thread_name_prefix="dicom-place")
        self._thread = threading.Thread(target=self._run, name="dicom-place", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """End the thread (what is not placed stays in the journal for the replay) and close the journal."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        self._stopped.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        self.journal.close()

    def _run(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: bool(self._queue) or self._stopping)
                self._cond.wait_for(self._batch_ready, self.linger_seconds)
                if self._stopping:
                    return
            if self.delay_seconds:  # the crash test's window between the answer and the file
                self._stopped.wait(self.delay_seconds)
                if self._stopped.is_set():
                    return
            with self._cond:
                batch, self._queue = self._queue[:BATCH], self._queue[BATCH:]
            try:
                self._place([i.instance for i in batch if i.instance is not None])
            except Exception as exc:  # retried: the data are in the journal
                self._retry.log.failed(type(exc).__name__)  # once per spell, not per retry
                with self._cond:
                    self._queue[:0] = batch
                    self._retry.attempted(False)
                    self._retry.backoff()
                continue
            with self._cond:
                self._retry.attempted(True)
                for i in batch:
                    if i.instance is not None and i.entry is not None:
                        self._entries[i.instance.sop_instance_uid] = i.entry
            self.forward([i.then for i in batch])
            try:
                self.journal.prepare()  # a spare segment ready before the current one fills
            except OSError as exc:
                logger.warning("preparing a journal segment failed (%s)", type(exc).__name__)

    def _batch_ready(self) -> bool:
        return batch_ready(
            self._queue, lambda i: i.instance is None, stopping=self._stopping, hurried=self._hurry > 0
        )

    def _place(self, instances: list[ParsedInstance]) -> None:
        """Files written and fsynced side by side, renamed, one fsync per directory."""
        if not instances:
            return
        assert self._pool is not None
        root = self.instances.instances_dir
        staged: list[Staged] = []
        futures = [
            self._pool.submit(
                stage, root, instance_relpath(p.study_uid, p.series_uid, p.sop_instance_uid), p.data
            )
            for p in instances
        ]
        try:
            for f in futures:
                staged.append(f.result())
        except BaseException:
            for f in futures:
                if f.exception() is None:
                    f.result().discard()
            raise
        try:
            place_all(staged)
        except BaseException:  # retried whole: no temporary file is left behind meanwhile
            for st in staged:
                st.discard()
            raise


@dataclass
class Replayed:
    """What a replay did (counts only: the log never names an instance)."""

    records: int = 0
    """Complete records found."""
    instances: int = 0
    """Records whose instance had no row: placed and indexed now."""
    torn: int = 0
    """Segments that ended in a torn record (never acknowledged), discarded."""
    unreadable: int = 0
    due: bool = False
    waiting: list[tuple[ParsedInstance, Entry]] = field(default_factory=list)
    """Records whose file the disk had no room for: still in the journal, for :meth:`GroupCommit.resume`
    to place and index once there is room (their senders were told they are stored)."""


def replay_journal(
    journal: Journal,
    instances: Instances,
    *,
    quiet_seconds: float,
    complete_when_full: bool = True,
    keep: bool = True,
) -> Replayed:
    """Open ``journal`` and place and index what it holds that has no row (blocking, before the listener
    opens); then its segments are reused (``keep``: the journal is used from now on) or removed."""
    records, torn = journal.open()
    done = Replayed(records=len(records), torn=torn)
    known: set[str] = set()
    sops = sorted({r.sop_instance_uid for r in records})
    for i in range(0, len(sops), _CHUNK):
        known |= instances.db.read_blocking(_known, sops[i : i + _CHUNK])
    fresh: dict[str, ParsedInstance] = {}
    waiting: dict[str, tuple[ParsedInstance, Record]] = {}
    for r in records:
        if r.sop_instance_uid in known or r.sop_instance_uid in fresh or r.sop_instance_uid in waiting:
            continue
        try:
            p = parse_instance(
                r.data, part="journal record", images_only=False, keep_truncated=True, with_dataset=False
            )
            if (p.study_uid, p.series_uid, p.sop_instance_uid) != (
                r.study_uid,
                r.series_uid,
                r.sop_instance_uid,
            ):
                raise ValueError("the record's UIDs differ from its dataset's")
            write_durably(instances.instances_dir, r.relpath, r.data)
        except StorageFullError:  # acknowledged and durable in the journal: kept there, placed later
            waiting[p.sop_instance_uid] = (p, r)
            continue
        except (PacsTriageError, ValueError) as exc:
            logger.error("journal replay: a record cannot be placed (%s); skipped", type(exc).__name__)
            done.unreadable += 1
            continue
        fresh[p.sop_instance_uid] = p
    now = utcnow()
    batch = list(fresh.values())
    for i in range(0, len(batch), _CHUNK):
        ingested = instances.db.run_blocking(
            instances.commit_rows,
            batch[i : i + _CHUNK],
            not_before=now + timedelta(seconds=quiet_seconds),
            hold_until=None,  # no association survives a restart
            complete_when_full=complete_when_full,
        )
        done.due = done.due or any(gate <= utcnow() for gate in ingested.gates)
    done.instances = len(batch)
    entries = journal.reset(keep=keep, hold=[r for _, r in waiting.values()])
    done.waiting = [(p, e) for (p, _), e in zip(waiting.values(), entries, strict=True)]
    return done


def _known(s: Session, sops: list[str]) -> set[str]:
    return set(s.scalars(select(InstanceRow.sop_instance_uid).where(InstanceRow.sop_instance_uid.in_(sops))))
