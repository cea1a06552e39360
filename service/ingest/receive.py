"""How one C-STORE's dataset becomes a durable instance: assembled, checked, written, admitted.

Split from :mod:`service.ingest.scp` (the listener's life and its handlers), whose :class:`DicomListener`
takes this path as a mixin; a listener process (:mod:`service.ingest.front`) runs the same path, its
admission asked of the service instead (:meth:`ReceivePath._check_beside`). The order of the steps and why
each is where it is: :mod:`service.ingest.scp`'s docstring, :meth:`ReceivePath._written_while_checked`.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

from pydicom.uid import ImplicitVRLittleEndian

from service.config import AssemblySettings
from service.dicom.ae import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME
from service.ingest.dimse import part10_head, trailing_padding
from service.ingest.requests import StoreRequest
from service.ingest.store_side import Commits, Verdict
from service.store.admission import Admitted
from service.store.direct_write import assemble, extend_assembled
from service.store.element_scan import scan
from service.store.slot_place import Slotted
from service.store.slots import SlotStore, joined_crc
from service.store.validate import DEFER_BYTES, ParsedInstance, parse_instance

__all__ = ["ReceivePath"]

_WRITTEN_WHILE_CHECKED_FROM = 64 * 1024
"""Instances stored on the loop at least this large are written while another thread checks them
(:meth:`DicomListener._written_while_checked`); a smaller one's write is shorter than that thread's wake."""


class ReceivePath:
    """The store path of :class:`service.ingest.scp.DicomListener` (which sets these attributes)."""

    commits: Commits
    slots: SlotStore | None
    assembly: AssemblySettings
    keep_truncated: bool
    _checker: ThreadPoolExecutor | None

    def _store(self, request: StoreRequest) -> tuple[ParsedInstance, bool]:
        """The received dataset assembled (:meth:`_assemble`), checked and stored: ``(instance, new)``."""
        held = self.assembly.hold_while_associated
        data, size, crc = self._assemble(request)
        if not isinstance(data, memoryview):
            parsed = self._parse_whole(data)
            return parsed, self.commits.store(parsed, held=held)
        if (
            request.on_loop
            and len(data) >= _WRITTEN_WHILE_CHECKED_FROM
            and self._checker is not None
            and self.commits.placer is not None
        ):
            return self._written_while_checked(data, size, crc, held)
        parsed = self._checked(data, size)
        crc = crc if parsed.data is data else None  # the checksum taken as it arrived, if stored as assembled
        return parsed, self.commits.store(parsed, held=held, crc=crc)

    def _assemble(self, request: StoreRequest) -> tuple[memoryview | bytes, int, int | None]:
        """The received dataset as a Part 10 instance in this thread's write buffer
        (:func:`service.store.direct_write.assemble`: one copy of the fragments, no ``bytes`` made): ``(view,
        size as received, the record's CRC-32 where the acceptor took the dataset's)``. Where slots are
        written past the page cache it is padded to a whole number of blocks (:func:`trailing_padding`), so
        its slot is written in one direct write. Too large for the buffer: joined, unpadded, as before."""
        command = request.command
        head = part10_head(
            sop_class_uid=command.sop_class_uid,
            sop_instance_uid=command.sop_instance_uid,
            transfer_syntax_uid=request.transfer_syntax_uid,
            implementation_uid=IMPLEMENTATION_CLASS_UID,
            implementation_version=IMPLEMENTATION_VERSION_NAME,
            source_ae=request.association.calling_ae,
        )
        parts: list[bytes | memoryview] = [head, *request.fragments]
        request.fragments.clear()  # the copy is all we need from here on
        view = assemble(parts)
        if view is None:
            joined = b"".join(parts)
            return joined, len(joined), None
        del parts
        size = len(view)  # the instance as received; the scan reads that much, never the padding
        tail = b""
        if self.slots is not None and self.slots.direct and size % 2 == 0:
            tail = trailing_padding(size, implicit=request.transfer_syntax_uid == ImplicitVRLittleEndian)
            view = extend_assembled(view, tail)
        crc = request.dataset_crc
        if crc is not None:  # the record's checksum from the one taken as the dataset arrived
            crc = joined_crc(head, crc, size - len(head), tail)
        return view, size, crc

    def _checked(self, view: memoryview, size: int) -> ParsedInstance:
        """The assembled instance scanned where it lies (:mod:`service.store.element_scan`) and checked;
        data the scan does not answer for are parsed in full by pydicom, unpadded."""
        walked = scan(view, size, DEFER_BYTES)
        if walked is None:
            return self._parse_whole(bytes(view[:size]))
        return parse_instance(
            view, part="C-STORE dataset", images_only=False, with_dataset=False, walked=walked
        )

    def _written_while_checked(
        self, view: memoryview, size: int, crc: int | None, held: bool
    ) -> tuple[ParsedInstance, bool]:
        """An instance stored on the listener's loop (``request.on_loop``): written into a slot
        and ``fdatasync``'d by this thread while another checks and admits it
        (:meth:`GroupCommit.admit`), so the device's ~0.5 ms overlaps the ~0.3 ms of Python the checks
        take. This thread lets go of the GIL in the write at once, and the checks are done by the time the
        sync returns: no thread is waited for, where a helper writing beside the listener (sessions 22-26)
        cost a thread's wake before its write began and another after it ended. The slot of an instance
        that is not stored after all (a duplicate, a refusal, data the scan does not answer for) is
        removed; the latter is then written from its own bytes."""
        assert self.commits.placer is not None
        checks = self._check_beside(view, size, held)
        slotted: Slotted | None = None
        failure: BaseException | None = None
        try:
            slotted = self.commits.placer.write(view, crc)
        except BaseException as exc:  # raised once the checks are done: the claim is released first
            failure = exc
        try:
            admitted = checks.result()
        except BaseException:
            if slotted is not None:
                slotted.discard()
            raise
        parsed = admitted.instance
        if admitted.claim is None or parsed.data is not view:
            if slotted is not None:
                slotted.discard()
            if admitted.claim is None:
                return parsed, False  # a duplicate
            slotted, failure = None, None
            try:  # parsed in full from its own (unpadded) bytes: stored from them
                slotted = self.commits.placer.write(parsed.data)
            except BaseException as exc:
                failure = exc
        if failure is not None or slotted is None:
            self.commits.release(admitted)
            raise failure or RuntimeError("no slot written")
        self.commits.written(admitted, slotted)
        return parsed, True

    def _check_beside(self, view: memoryview, size: int, held: bool) -> Verdict:
        """:meth:`_admitted` on a store thread, while this one writes the slot."""
        assert self._checker is not None
        return self._checker.submit(self._admitted, view, size, held)

    def _admitted(self, view: memoryview, size: int, held: bool) -> Admitted:
        """:meth:`_checked` and :meth:`GroupCommit.admit`, on a store thread."""
        return self.commits.admit(self._checked(view, size), held=held)

    def _parse_whole(self, data: bytes) -> ParsedInstance:
        """An instance the scan does not answer for (too large for the buffer, unusual data), parsed in
        full by pydicom: its checks and messages."""
        return parse_instance(
            data,
            part="C-STORE dataset",
            images_only=False,
            keep_truncated=self.keep_truncated,
            with_dataset=False,
        )
