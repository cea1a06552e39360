"""Group commit of received DICOM instances: the success status after the file, the row soon after.

Why: a C-STORE sender waits for each response before it sends the next instance (PS3.7 9.1.1, an
asynchronous operations window of 1), so whatever the listener does before answering is paid once per
instance. Committing each instance's rows in its own transaction cost one more fsync (the WAL, or
PostgreSQL's commit) per instance on one serialised writer: the store, not the network, capped the
listener at a tenth of DCMTK ``storescp`` (bench/RESULTS.md, issue 20).

So a C-STORE is answered once its file and its directory are fsynced (:meth:`GroupCommit.store`): the
data are durable, which is all PS3.4 B.2.3 and our promise ("nothing reports success before its data is
fsynced") ask for. The rows follow in a **group commit**: a thread, woken (never polling) when rows wait,
writes every row that arrived while the previous commit ran in one transaction, with the assembly gates
and jobs of their studies (:meth:`service.store.instances.Instances.commit_rows`). A crash between the
success and the commit leaves a file without a row; the start-up re-index (:mod:`service.store.reindex`)
gives it its row before the listener opens, so an acknowledged instance is never lost, and since the
gates see it as an ordinary arrival, never analysed twice.

With slots (``dicom.journal``, :mod:`service.store.slots`), "durable" is one ``fdatasync`` of the
instance written into a slot file made ahead, instead of its own file's and directory's fsyncs; the placer
(:mod:`service.store.slot_place`) then renames the slot into place and hands its row here, and association
ends travel through it too, behind the instances they carried, so the order above holds.

Checks a row would make at commit are made before the answer instead, in one read (without slots it
runs while the file is being fsynced under a temporary name, and the rename into place waits for its
verdict; with them, it comes before the slot is written): a duplicate (stored, or waiting in this queue)
is a success written once; a SOP Instance UID already naming an instance of another study is 0xA900; a
study at ``api.max_instances_per_study`` is 0xA700. Two associations sending the same new instance at
once: see :mod:`service.store.claims`; the admission's types: :mod:`service.store.admission`. Order: an
association's end (:meth:`GroupCommit.ended`) is queued after the rows of every instance it carried
(:mod:`service.store.queued_rows`: what is queued, and the transaction that commits it).

A commit that fails (database full, connection lost) is retried with a backoff, one row per transaction
so that one bad row holds up no other; the files stay, and a process stopped meanwhile leaves them to
the re-index. While commits fail, an arriving instance asks for a fresh attempt at once and is refused
with 0xA700 ("try again later") if that fails too (so is any while ``max_waiting`` rows wait): what
cannot be indexed is not taken in, and the first instance after the database has room again is. Queued
rows keep the instance's attributes only, not its bytes. Logs name counts and error classes, never UIDs or
values (a failed statement's text would carry them).
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections import Counter
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import timedelta

from service.config import AssemblySettings
from service.errors import StorageFullError
from service.store.admission import Admitted, store_admitted
from service.store.background import LINGER_S, RetryOnDemand, batch_ready
from service.store.claims import Claim, Claims
from service.store.files import Staged
from service.store.instances import Instances
from service.store.queued_rows import QueuedEnd, QueuedRow, commit_queued
from service.store.slot_place import Placer, Slotted
from service.store.validate import ParsedInstance

__all__ = ["GroupCommit"]

logger = logging.getLogger(__name__)


class GroupCommit:
    """:meth:`store` on the listener's store threads, :meth:`ended` at association end; one committer
    thread between :meth:`start` and :meth:`stop`. ``on_due`` is called (on that thread) when a commit
    made a job due at once."""

    def __init__(
        self,
        instances: Instances,
        *,
        quiet_seconds: float,
        assembly: AssemblySettings,
        on_due: Callable[[], object] = lambda: None,
        delay_seconds: float = 0.0,
        staging_threads: int = 4,
        max_waiting: int = 10_000,
        placer: Placer | None = None,
        linger_seconds: float = LINGER_S,
    ) -> None:
        self.instances = instances
        self.linger_seconds = linger_seconds
        """Without slots, how long a commit waits for more rows once the first is queued (the placer
        batches the others): the senders were answered already, and each commit costs a WAL fsync."""
        self.placer = placer
        """With slots: an instance is durable once written into its slot, its file and row follow."""
        if placer is not None:
            placer.forward = self._placed
        self.quiet = timedelta(seconds=quiet_seconds)
        self.hold = timedelta(seconds=assembly.max_hold_seconds)
        self.assembly = assembly
        self.on_due = on_due
        self.delay_seconds = delay_seconds
        self.max_waiting = max_waiting
        """Rows acknowledged and not yet committed beyond which new instances are refused (0xA700)."""
        self._cond = threading.Condition()
        self._retry = RetryOnDemand(  # while commits fail: refuse
            self._cond, lambda: self._stopping, logger, "group commit of received instance rows"
        )
        self._queue: list[QueuedRow | QueuedEnd] = []
        self._claims = Claims()
        self._per_study: Counter[str] = Counter()
        # Items ever queued and ever committed, in queue order: flush() waits for the second to reach the
        # first (a row that failed and waits for its retry may be overtaken by later ones).
        self._queued = 0
        self._committed = 0
        self._hurry = 0  # flush() callers waiting: commit without lingering
        self._stopping = False
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None
        self._staging_threads = staging_threads
        self._staging = ThreadPoolExecutor(staging_threads, thread_name_prefix="dicom-stage")

    # ---- producers ----------------------------------------------------------------------------------

    def store(self, p: ParsedInstance, *, held: bool, crc: int | None = None) -> bool:
        """Write the instance durably and queue its row; True if it was new, False for a duplicate.
        ``crc``: the CRC-32 of ``p.data`` after its preamble, where the caller has it (the slot's record).

        Raises what the answer must say instead of success: :class:`SopInstanceConflictError`,
        :class:`service.errors.StudyTooLargeError`, :class:`service.errors.StorageFullError`, OSError.
        """
        if self.placer is None:
            claim = self._claims.claim(p)
            return claim is not None and self._store_claimed(p, claim, held)
        return store_admitted(self, self.placer.write, p, held=held, crc=crc)

    def admit(self, p: ParsedInstance, *, held: bool, wait: bool = True) -> Admitted:
        """With slots, the checks of :meth:`store` before the write: claimed for this caller (``claim``), or
        a duplicate (``claim`` None: success, nothing to write). The caller writes the slot
        (:meth:`Placer.write`), then calls :meth:`written`, or :meth:`release` if the write failed. Raises
        as :meth:`store` does, the claim released. Duplicates are found before anything is written.
        ``wait`` False: :class:`ClaimBusy` where another caller's claim would be waited for."""
        assert self.placer is not None
        claim = self._claims.claim(p, wait=wait)
        if claim is None:
            return Admitted(p, held, None)
        try:
            self._refuse_while_failing()
            known = self._admit(p)
            if not known:
                self.placer.check()
        except BaseException:
            self._release(p.sop_instance_uid, claim)
            raise
        if known:
            claim.durable = True
            self._release(p.sop_instance_uid, claim)
            return Admitted(p, held, None)
        return Admitted(p, held, claim)

    def release(self, admitted: Admitted) -> None:
        """An admitted instance was not written after all (its write failed): others may try it."""
        if admitted.claim is not None:
            self._release(admitted.instance.sop_instance_uid, admitted.claim)

    def written(self, admitted: Admitted, slotted: Slotted) -> None:
        """An admitted instance is durable in ``slotted``: its row follows its placement."""
        assert admitted.claim is not None and self.placer is not None
        row = self._queue_row(admitted.instance, admitted.claim, admitted.held)
        self.placer.submit(row.instance, slotted, row)
        admitted.claim.done.set()

    def takes_at_once(self) -> bool:
        """Would :meth:`store` wait for nothing but one slot's sync (and the database read of its admit
        check): slots are in use and one is ready, and neither the row commits nor the placements are
        failing or behind. The listener stores such an instance on its event loop when it is the loop's
        only work (:mod:`service.ingest.acceptor`)."""
        if self.placer is None:
            return False
        with self._cond:
            if self._retry.failing or self._backlogged():
                return False
        return self.placer.takes_at_once()

    def _backlogged(self) -> bool:
        """``max_waiting`` acknowledged rows wait for their commit (under ``_cond``): take no more."""
        return self._queued - self._committed >= self.max_waiting

    def _refuse_while_failing(self) -> None:
        with self._cond:  # while commits fail: refused only if a fresh attempt fails too
            refuse = self._retry.still_failing() or self._backlogged()
        if refuse:  # rows are not being written (database full or gone): "try again later", not more
            raise StorageFullError(
                "the database is not taking the rows of received instances (full or unavailable);"
                " try again later"
            )

    def _store_claimed(self, p: ParsedInstance, claim: Claim, held: bool) -> bool:
        """Without slots: the file is fsynced under a temporary name on a side thread while this one asks
        the database whether it is wanted, and renamed into place (directory fsynced) only then."""
        try:
            self._refuse_while_failing()
            known, staged = self._admit_while_staging(p)
            if known or staged is None:
                if staged is not None:
                    staged.discard()
                claim.durable = True
                self._release(p.sop_instance_uid, claim)
                return False
            staged.place()
        except BaseException:
            self._release(p.sop_instance_uid, claim)
            raise
        self._queue_row(p, claim, held)
        claim.done.set()
        return True

    def _queue_row(self, p: ParsedInstance, claim: Claim, held: bool) -> QueuedRow:
        """The row of a durable instance, queued (without slots) or handed back for the placer."""
        row = QueuedRow(p.attributes_only(), held)  # rows need no pixels
        with self._cond:
            claim.durable = True
            self._per_study[p.study_uid] += 1
            self._queued += 1
            if self.placer is None:  # (with the placer, nobody here waits for what it hands on later)
                self._queue.append(row)
                self._cond.notify_all()
        return row

    def _admit(self, p: ParsedInstance) -> bool:
        """:meth:`Instances.admit_blocking`, counting the study's instances still waiting for their rows."""
        with self._cond:
            waiting = self._per_study[p.study_uid]
        return self.instances.admit_blocking(p, waiting + 1)

    def _admit_while_staging(self, p: ParsedInstance) -> tuple[bool, Staged | None]:
        """:meth:`_admit` while the file is written and fsynced under a temporary name on a staging
        thread; ``(known, staged)``, ``staged`` None when a duplicate's file could not be written."""
        staging: Future[Staged] = self._staging.submit(self.instances.stage, p)
        try:
            known = self._admit(p)
        except BaseException:
            with contextlib.suppress(Exception):
                staging.result().discard()
            raise
        try:
            return known, staging.result()
        except BaseException:
            if not known:
                raise
            return True, None  # a duplicate is a success even when the disk could not take it again

    def resume(self, waiting: list[tuple[ParsedInstance, Slotted]]) -> None:
        """Instances in slots the start-up replay could not place (the disk was full): acknowledged
        before the restart, so placed and indexed like any arrival once there is room; meanwhile a
        sender sending one again is answered as for a duplicate (:meth:`store`)."""
        assert self.placer is not None, "instances in slots to place, and no slots"
        for p, slotted in waiting:
            self._claims.hold(p)
            with self._cond:
                self._per_study[p.study_uid] += 1
                self._queued += 1
            row = QueuedRow(p.attributes_only(), held=False)  # no association survives a restart
            self.placer.submit(row.instance, slotted, row)

    def _release(self, sop_uid: str, claim: Claim) -> None:
        self._claims.release(sop_uid, claim)

    def holds_rows_of(self, study_uid: str) -> bool:
        """Has the study instances acknowledged whose rows are not committed yet? Until they are, the API
        must not say "no such study" (404) or give an earlier result as final: the sender was told they
        are stored (a load test saw 279 such 404s right after storescu's last answer)."""
        with self._cond:
            return self._per_study.get(study_uid, 0) > 0

    def ended(self, studies: tuple[str, ...], *, released: bool) -> None:
        """No association carries these studies any more: move their gates, after their rows."""
        if not studies:
            return
        with self._cond:
            if self.placer is None:
                self._queue.append(QueuedEnd(studies, released))
            self._queued += 1
            self._cond.notify_all()
        if self.placer is not None:  # behind the files of the instances it carried
            self.placer.submit(None, None, QueuedEnd(studies, released))

    def _placed(self, items: list[QueuedRow | QueuedEnd]) -> None:
        """The placer put these rows' files in place (in arrival order): queue them."""
        with self._cond:
            self._queue += items
            self._cond.notify_all()

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every row queued so far is committed; False if ``timeout`` passed first. Nothing
        lingers meanwhile (a stop, or a test, waits)."""
        with contextlib.ExitStack() as hurried:
            if self.placer is not None:
                hurried.enter_context(self.placer.hurried())
            with self._cond:
                self._hurry += 1
                self._cond.notify_all()
                try:
                    target = self._queued
                    return self._cond.wait_for(lambda: self._committed >= target, timeout)
                finally:
                    self._hurry -= 1

    @property
    def waiting(self) -> int:
        """Rows and association ends acknowledged but not committed yet."""
        with self._cond:
            return self._queued - self._committed

    # ---- the committer thread -----------------------------------------------------------------------

    def start(self) -> None:
        if self.placer is not None:
            self.placer.start()
        self._stopping = False
        self._stopped.clear()
        self._thread = threading.Thread(target=self._run, name="dicom-group-commit", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Commit what waits (at most ``timeout`` seconds), then end the thread."""
        if not self.flush(timeout) and (left := self.waiting):
            logger.warning(
                "%d acknowledged instance row(s) not committed at stop: the next start re-indexes or"
                " replays them",
                left,
            )
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        self._stopped.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        if self.placer is not None:
            self.placer.stop(timeout)
        self._staging.shutdown(wait=True)  # a fresh pool (no thread until used) if started again
        self._staging = ThreadPoolExecutor(self._staging_threads, thread_name_prefix="dicom-stage")

    def _run(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: bool(self._queue) or self._stopping)
                if self.placer is None:
                    self._cond.wait_for(self._batch_ready, self.linger_seconds)
                if self._stopping:
                    return
            if self.delay_seconds:  # the crash tests' window between success and row; a stop cuts it short
                self._stopped.wait(self.delay_seconds)
            with self._cond:
                batch, self._queue = self._queue, []
                self._retry.begin()
            failed = self._commit(batch, one_by_one=self._retry.failing)
            with self._cond:
                self._queue[:0] = failed
                self._committed += len(batch) - len(failed)
                self._retry.attempted(not failed)
                if failed:
                    self._retry.backoff()

    def _batch_ready(self) -> bool:
        return batch_ready(
            self._queue, lambda i: isinstance(i, QueuedEnd), stopping=self._stopping, hurried=self._hurry > 0
        )

    def _commit(self, batch: list[QueuedRow | QueuedEnd], *, one_by_one: bool) -> list[QueuedRow | QueuedEnd]:
        """Commit ``batch`` (one transaction, or one per item after a failure); returns what failed."""
        groups = [[item] for item in batch] if one_by_one else [batch]
        failed: list[QueuedRow | QueuedEnd] = []
        due = False
        for group in groups:
            try:
                due = (
                    self.instances.db.run_blocking(
                        commit_queued,
                        group,
                        self.instances,
                        quiet=self.quiet,
                        hold=self.hold,
                        assembly=self.assembly,
                    )
                    or due
                )
            except Exception as exc:  # retried; the files are durable and the re-index is the last resort
                self._retry.log.failed(type(exc).__name__)  # once per spell, not per row or retry
                failed += group
                continue
            for item in group:
                if isinstance(item, QueuedRow):
                    self._committed_row(item.instance)
        if due:
            self.on_due()
        return failed

    def _committed_row(self, p: ParsedInstance) -> None:
        with self._cond:
            self._per_study[p.study_uid] -= 1
            if self._per_study[p.study_uid] <= 0:
                del self._per_study[p.study_uid]
        self._claims.committed(p.sop_instance_uid)
