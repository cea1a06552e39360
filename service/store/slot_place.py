"""Received instances renamed from their slots into place, in the background; and the slots' replay at start.

The listener answers a C-STORE once the instance is written into a slot and ``fdatasync``'d
(:mod:`service.store.slots`). From there, here, in one thread, in arrival order and in batches: each slot
is renamed onto its file's path and each directory touched by the batch (the slots' own included) is
fsynced once (:func:`service.store.files.place_all`): no data are written again. Only then are the batch's
rows handed to the group commit (:mod:`service.store.group_commit`), so a row never exists before its
file: the worker, which finds a study's instances through their rows (:meth:`Instances.records`), and the
completion gates, which count rows, never see an instance that is not in its place. Until its row is
committed, the study counts as "rows waiting" (:meth:`GroupCommit.holds_rows_of`: the API answers 202,
never 404). An association's end is queued through here too, behind the instances it carried, so the
gate that judges a study at association end (:func:`service.store.gates.association_ended`) sees their
rows.

A placement that fails (a directory that cannot be made: disk full, I/O error) is retried with a backoff:
the instance was acknowledged and its data are in its slot; a process stopped meanwhile leaves it to the
replay. While placements fail, new instances are refused, but only after a fresh attempt asked for by the
arriving instance has failed too (:class:`service.store.background.RetryOnDemand`): once there is room
again, the first instance sent is taken.

**Replay** (:func:`replay_slots`, at start, before the listener opens and before the re-index): every
complete slot whose instance has no row is renamed into place and given its row through the same insert
as every arrival (:meth:`Instances.commit_rows`), so it is never lost and, since a study is complete only
on its rows, never analysed twice; a slot whose instance has a row is removed. A torn slot (a crash during
its write) is removed: its sender got no success. A slot that cannot be placed now (a full disk) stays and
is handed to the listener's placer (:meth:`GroupCommit.resume`), which places it once there is room (a
crash meanwhile replays it again). A complete slot that no longer parses is set aside as
``rejected-<n>.dcm`` beside the slots, never deleted. The segment journal of earlier versions
(:mod:`service.store.journal_legacy`) is read the same way once, then removed.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from service.errors import PacsTriageError, StorageFullError
from service.store.background import BATCH, RetryOnDemand, batch_ready
from service.store.files import (
    Staged,
    check_free_space,
    instance_relname,
    instance_relpath,
    make_parents,
    place_all,
    write_durably,
)
from service.store.instances import Instances
from service.store.journal_legacy import legacy_records, remove_legacy
from service.store.reindex import index_acknowledged, known_sops
from service.store.slots import SlotStore
from service.store.validate import ParsedInstance, parse_instance

__all__ = ["Placer", "Replayed", "Slotted", "replay_slots", "write_slot"]

logger = logging.getLogger(__name__)

PLACE_LINGER_S = 0.1
"""How long a placement waits for more instances once its first is queued, unless :func:`batch_ready` or a
full series cuts it short: an association's end, a flush, a stop, :data:`BATCH` instances, or an instance
that brings its series to the count it declares (ImagesInAcquisition: the study may be complete now).
Each batch costs one fsync per directory it touches and one row transaction (a WAL fsync and ~2 ms of
SQLAlchemy on the GIL), on the cores the receive path needs. 100 ms against 20 ms
(:data:`service.store.background.LINGER_S`): one association moved 1.14x as many instances (alternated,
800 instances, 8 rounds, 7 of 8 pairs; 1.06x in session 22). Session 22 put it back to 20 ms because the
database-full test then never recovered; that was the WAL growing into the room made for it
(:meth:`service.store.database.Database._restart_wal`), fixed since (bench/RESULTS.md, session 23)."""
_SERIES_KEPT = 4096
"""Series whose arrivals are counted at once; past that the count starts over (a series then waits out the
linger)."""


@dataclass
class Slotted:
    """What :meth:`Placer.write` returns: shaped like :class:`service.store.files.Staged` for the group
    commit (``discard`` when the instance is not wanted after all); its placement is the placer's."""

    slots: SlotStore
    path: Path

    def discard(self) -> None:
        self.slots.discard(self.path)


def write_slot(slots: SlotStore, data: bytes | memoryview, crc: int | None = None) -> Slotted:
    """:meth:`SlotStore.write`, a full disk or quota named as such (0xA700, "try again later")."""
    try:
        path = slots.write(data, crc)
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise StorageFullError("no space left to store the instance; try again later") from exc
        raise
    return Slotted(slots, path)


@dataclass(frozen=True)
class _Item:
    instance: ParsedInstance | None  # None: only ``then`` (an association end) passes through
    slot: Path | None
    then: Any
    """Handed to the group commit once the file is in place (its row, or an association end)."""


class Placer:
    """One thread between :meth:`start` and :meth:`stop`; ``forward`` (the group commit's) takes the rows
    and association ends of each placed batch, in order."""

    def __init__(
        self,
        slots: SlotStore,
        instances: Instances,
        *,
        delay_seconds: float = 0.0,
        linger_seconds: float = PLACE_LINGER_S,
    ) -> None:
        self.slots = slots
        self.linger_seconds = linger_seconds
        self.instances = instances
        self.delay_seconds = delay_seconds
        """Testing only (``dicom.journal_place_delay_seconds``): hold each placement this long."""
        self.forward: Callable[[list[Any]], None] = lambda _items: None
        self._cond = threading.Condition()
        self._queue: list[_Item] = []
        self._created: set[Path] = set()  # directories made by a batch not yet placed: fsynced with it
        self._hurry = 0  # callers waiting for everything queued to be placed: no lingering meanwhile
        self._series: dict[str, int] = {}  # instances queued per series that declares its count
        self._series_full = False  # one queued instance made its series reach the count it declares
        self._stopping = False
        self._retry = RetryOnDemand(  # while placements fail: refuse
            self._cond, lambda: self._stopping, logger, "placing received instances from their slots"
        )
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None

    def check(self) -> None:
        """Refuse with :class:`StorageFullError` (0xA700, "try again later") what could not be placed:
        above the disk's high watermark, or while placements fail (after a fresh attempt,
        :class:`RetryOnDemand`). Called before an instance is written (:meth:`GroupCommit.admit`)."""
        check_free_space(self.instances.instances_dir, self.instances.disk_high_watermark)
        if self._retry.failing:  # read without the lock first: the common case costs nothing
            with self._cond:
                failing = self._retry.still_failing()
            if failing:
                raise StorageFullError("received instances cannot be placed in their files; try again later")

    def write(self, data: bytes | memoryview, crc: int | None = None) -> Slotted:
        """Write the Part 10 file ``data`` into a slot (``crc``: its CRC-32 after the preamble, where the
        caller has it: :meth:`SlotStore.write`); durable when this returns. :meth:`check` first."""
        return write_slot(self.slots, data, crc)

    def takes_at_once(self) -> bool:
        """Would :meth:`write` wait for nothing but its own ``fdatasync``: placements are not failing (no
        fresh attempt to wait for) and a slot is ready (:meth:`SlotStore.takes_at_once`; any size fits)."""
        return not self._retry.failing and self.slots.takes_at_once()

    def submit(self, p: ParsedInstance | None, slotted: Slotted | None, then: object) -> None:
        """Place ``p`` (if any; its attributes only are needed) in the background, then forward ``then``.

        The placer thread is woken only when this item can change what it does: the first item (it waits
        for one), an association's end (``p`` None), a series made full, a full batch. Not for every
        instance: while it lingers, each wake took the GIL to find the batch still not ready, on the
        listener's answer path (~one wake per received instance; bench/RESULTS.md, session 26)."""
        with self._cond:
            first = not self._queue
            self._queue.append(_Item(p, slotted.path if slotted else None, then))
            if p is not None and p.expected_in_series:
                if len(self._series) >= _SERIES_KEPT:  # forgetting costs a linger, never a wrong answer
                    self._series.clear()
                seen = self._series[p.series_uid] = self._series.get(p.series_uid, 0) + 1
                if seen >= p.expected_in_series:
                    del self._series[p.series_uid]
                    self._series_full = True
            if first or p is None or self._series_full or len(self._queue) >= BATCH:
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

    def start(self) -> None:
        self._stopping = False
        self._stopped.clear()
        self.slots.start()
        self._thread = threading.Thread(target=self._run, name="dicom-place", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """End the thread (what is not placed stays in its slot for the replay) and close the slots."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        self._stopped.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        self.slots.close()

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
                self._series_full = False
                self._retry.begin()
            try:
                self._place([i for i in batch if i.instance is not None and i.slot is not None])
            except Exception as exc:  # retried: the data are in their slots
                self._retry.log.failed(type(exc).__name__)  # once per spell, not per retry
                with self._cond:
                    self._queue[:0] = batch
                    self._retry.attempted(False)
                    self._retry.backoff()
                continue
            with self._cond:
                self._retry.attempted(True)
            self.forward([i.then for i in batch])

    def _batch_ready(self) -> bool:
        return self._series_full or batch_ready(
            self._queue, lambda i: i.instance is None, stopping=self._stopping, hurried=self._hurry > 0
        )

    def _place(self, items: list[_Item]) -> None:
        """Every slot renamed onto its file, then one fsync per directory. Retried whole after a failure:
        a slot an earlier attempt already moved is not moved again, but its directory (and those the
        attempt made) are fsynced all the same: its row must not come before its name is durable."""
        root = self.instances.instances_dir
        moves, dirs = [], {self.slots.directory}
        for i in items:
            assert i.instance is not None and i.slot is not None
            p = i.instance
            target = root / instance_relname(p.study_uid, p.series_uid, p.sop_instance_uid)
            self._created.update(make_parents(root, target))
            dirs.add(target.parent)
            dirs.add(i.slot.parent)  # the slots' own, or a listener process's (service.ingest.processes)
            if i.slot.exists() or not target.exists():
                moves.append(Staged(target, i.slot, []))
        place_all(moves, also=dirs | {d.parent for d in self._created})
        self._created.clear()


@dataclass
class Replayed:
    """What a replay did (counts only: the log never names an instance)."""

    records: int = 0
    """Complete slots (and old journal records) found."""
    instances: int = 0
    """Those whose instance had no row: placed and indexed now."""
    torn: int = 0
    """Slots (or old journal segments) that ended in a torn write (never acknowledged), discarded."""
    unreadable: int = 0
    """Complete slots that no longer parse: set aside (``rejected-<n>.dcm``)."""
    due: bool = False
    in_use: bool = False
    """The slots stay open for the listener (the setting is on and they are beside the instances, or some
    wait for their placement)."""
    waiting: list[tuple[ParsedInstance, Slotted]] = field(default_factory=list)
    """Slots that could not be placed now (a directory that cannot be made): for
    :meth:`GroupCommit.resume` to place and index once they can be (their senders were told they are
    stored)."""


@dataclass(frozen=True)
class _Source:
    data: bytes
    slot: Path | None  # None: a record of the old journal, written to its file anew


def replay_slots(
    slots: SlotStore,
    instances: Instances,
    *,
    quiet_seconds: float,
    complete_when_full: bool = True,
    keep: bool = True,
    legacy: Path | None = None,
) -> Replayed:
    """Open ``slots`` and place and index what they hold that has no row (blocking, before the listener
    opens); then the slots are kept ready (``keep``: used from now on) or removed. ``legacy``: the old
    segment journal's directory, read once and removed."""
    found, torn = slots.open()
    renames = slots.beside(instances.instances_dir)
    if not renames:  # an instances directory mounted from elsewhere: a slot cannot be renamed into it
        logger.warning(
            "the slot directory %s is not on the instances' file system: slots are not used, each"
            " instance's file is fsynced before its answer instead",
            slots.directory,
        )
        keep = False
    sources = [_Source(f.data, f.path) for f in found]
    old, old_torn = legacy_records(legacy) if legacy is not None and legacy.is_dir() else ([], 0)
    sources += [_Source(r.data, None) for r in old]
    done = Replayed(records=len(sources), torn=torn + old_torn)
    parsed: list[tuple[ParsedInstance, _Source]] = []
    for src in sources:
        try:
            p = parse_instance(
                src.data, part="stored slot", images_only=False, keep_truncated=True, with_dataset=False
            )
        except (PacsTriageError, ValueError) as exc:
            logger.error(
                "slot replay: a stored instance no longer parses (%s); set aside", type(exc).__name__
            )
            done.unreadable += 1
            if src.slot is not None:
                _set_aside(src.slot)
            continue
        parsed.append((p, src))
    known = known_sops(instances, (p.sop_instance_uid for p, _ in parsed))
    fresh: dict[str, ParsedInstance] = {}
    legacy_kept = False
    for p, src in parsed:
        if p.sop_instance_uid in known or p.sop_instance_uid in fresh:
            if src.slot is not None:
                slots.discard(src.slot)
            continue
        relpath = instance_relpath(p.study_uid, p.series_uid, p.sop_instance_uid)
        try:
            if src.slot is None or not renames:
                write_durably(instances.instances_dir, relpath, src.data)
                if src.slot is not None:
                    slots.discard(src.slot)
            else:  # acknowledged: never removed on a failure (Staged.place would), left for the placer
                target = instances.instances_dir / relpath
                place_all([Staged(target, src.slot, make_parents(instances.instances_dir, target))])
        except (StorageFullError, OSError) as exc:  # acknowledged and durable where it is: placed later
            if src.slot is not None and renames:
                done.waiting.append((p, Slotted(slots, src.slot)))
            else:  # kept where it is (an old journal record, or a slot on another file system)
                legacy_kept = legacy_kept or src.slot is None
                logger.error(
                    "slot replay: an acknowledged instance cannot be placed now (%s); kept for the next"
                    " start",
                    type(exc).__name__,
                )
            continue
        fresh[p.sop_instance_uid] = p
    batch = list(fresh.values())
    done.due = index_acknowledged(
        instances, batch, quiet_seconds=quiet_seconds, complete_when_full=complete_when_full
    )
    done.instances = len(batch)
    if legacy is not None and legacy.is_dir() and not legacy_kept:
        remove_legacy(legacy)
    done.in_use = keep or bool(done.waiting)
    if not done.in_use:
        slots.close(remove_ready=True)  # (anything kept for the next start stays: only the ready go)
        with contextlib.suppress(OSError):
            slots.directory.rmdir()  # empty unless something was set aside
    return done


def _set_aside(slot: Path) -> None:
    """Keep a complete slot that does not parse out of the replay's way, under a name the operator finds."""
    with contextlib.suppress(OSError):
        slot.rename(slot.with_name("rejected-" + slot.name.removeprefix("slot-")))
