"""The C-STORE listener against a pynetdicom SCU: statuses, durability, duplicates, AE checks, assembly.

DCMTK against the listener (the real modality) is in tests/e2e; these tests cover every status path with
a client that can send exactly what each case needs.
"""

from __future__ import annotations

import errno
import os
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from io import BytesIO
from pathlib import Path

import pytest
from pydicom import config, dcmread
from pydicom.dataset import Dataset
from pydicom.uid import (
    UID,
    ComprehensiveSRStorage,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    generate_uid,
)
from pynetdicom import AE
from pynetdicom.dsutils import encode
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]  # made at import
from sqlalchemy import select
from sqlalchemy.orm import Session

from service.clock import utcnow
from service.config import DicomSettings
from service.ingest.acceptor import STORE_ON_LOOP_UP_TO
from service.ingest.scp import DicomListener, storage_transfer_syntaxes
from service.store import direct_write
from service.store.admission import Admitted
from service.store.database import Database
from service.store.db import InstanceRow, JobRow
from service.store.instances import Instances
from service.store.slot_place import Slotted, replay_slots
from service.store.slots import ReadySlot, SlotStore, verify
from service.store.validate import ParsedInstance
from tests.fixtures.listener import started_listener
from tests.service.dicom_factory import chest, head_ct_series, make_dataset


@pytest.fixture
def listener(store: Instances) -> Iterator[DicomListener]:
    lst = started_listener(store)
    yield lst
    lst.stop()


def _ds(data: bytes) -> Dataset:
    return dcmread(BytesIO(data))


def _send(port: int, datasets: list[Dataset], *, calling: str = "MODALITY", called: str = "PACS_TRIAGE"):
    """C-STORE each dataset on one association; returns the statuses (None when not associated)."""
    ae = AE(ae_title=calling)
    for ds in datasets:
        ae.add_requested_context(ds.SOPClassUID, [ds.file_meta.TransferSyntaxUID])
    assoc = ae.associate("127.0.0.1", port, ae_title=called)
    if not assoc.is_established:
        return None
    try:
        return [assoc.send_c_store(ds) for ds in datasets]
    finally:
        assoc.release()


def _rows(store: Instances, listener: DicomListener | None = None) -> list[InstanceRow]:
    """The instance rows, once ``listener`` committed those of every instance it acknowledged (a row
    follows its success status in the next group commit; a stopped listener committed them all)."""
    if listener is not None:
        assert listener.flush(30)
    with Session(store.db.engine) as s:
        return list(s.scalars(select(InstanceRow)))


def _jobs(store: Instances, listener: DicomListener | None = None) -> list[JobRow]:
    if listener is not None:
        assert listener.flush(30)
    with Session(store.db.engine) as s:
        return list(s.scalars(select(JobRow)))


def test_echo(listener: DicomListener) -> None:
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", listener.port, ae_title="PACS_TRIAGE")
    assert assoc.is_established
    assert assoc.send_c_echo().Status == 0x0000
    assoc.release()


def test_store_is_on_disk_before_success_and_its_row_follows(
    store: Instances, listener: DicomListener
) -> None:
    ds = _ds(chest())
    (status,) = _send(listener.port, [ds])
    assert status.Status == 0x0000
    (row,) = _rows(store, listener)
    path = store.instances_dir / row.path
    assert dcmread(path).SOPInstanceUID == ds.SOPInstanceUID
    assert dcmread(path).PixelData == ds.PixelData
    assert not list(store.instances_dir.rglob(".incoming-*"))
    # the association was released and no other carries the study: a radiograph is complete at once
    _wait_for(lambda: _jobs(store, listener)[0].not_before <= utcnow())
    (job,) = _jobs(store, listener)
    assert job.state == "pending"


def _wait_for(condition: Callable[[], bool], timeout: float = 30) -> None:
    """The association-end handler runs on the listener's thread once the release is done."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition never held"
        time.sleep(0.01)


def test_a_radiograph_waits_while_its_association_is_open(store: Instances, listener: DicomListener) -> None:
    ds = _ds(chest())
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(ds.SOPClassUID, [ds.file_meta.TransferSyntaxUID])
    assoc = ae.associate("127.0.0.1", listener.port, ae_title="PACS_TRIAGE")
    assert assoc.is_established
    try:
        assert assoc.send_c_store(ds).Status == 0x0000
        (job,) = _jobs(store, listener)
        # the quiet timer: more views may follow on this association
        assert job.state == "pending" and job.not_before > utcnow() + timedelta(seconds=30)
    finally:
        assoc.abort()
    _wait_for(lambda: len(listener.open) == 0)  # the abort was handled; it proves nothing: still the timer
    (job,) = _jobs(store, listener)
    assert job.not_before > utcnow() + timedelta(seconds=30)


def test_a_short_series_is_held_while_its_association_is_open(store: Instances) -> None:
    """The race of issue 20: a loaded receiver pauses longer than the quiet timer in mid-series; a series
    short of its declared count must wait for its association, not fire on the timer."""
    lst = started_listener(store, quiet=0.0)
    try:
        series = [_ds(d) for d in head_ct_series(4)]
        for ds in series:
            ds.ImagesInAcquisition = 4
        ae = AE(ae_title="MODALITY")
        ae.add_requested_context(series[0].SOPClassUID, [series[0].file_meta.TransferSyntaxUID])
        assoc = ae.associate("127.0.0.1", lst.port, ae_title="PACS_TRIAGE")
        assert assoc.is_established
        try:
            assert [assoc.send_c_store(ds).Status for ds in series[:2]] == [0, 0]
            (job,) = _jobs(store, lst)
            assert job.not_before > utcnow() + timedelta(seconds=60)  # held, despite a 0 s quiet time
            assert [assoc.send_c_store(ds).Status for ds in series[2:]] == [0, 0]
            (job,) = _jobs(store, lst)
            assert job.not_before <= utcnow()  # full: complete at once
        finally:
            assoc.release()
    finally:
        lst.stop()


def test_a_short_series_falls_back_to_the_timer_when_its_association_ends(store: Instances) -> None:
    lst = started_listener(store, quiet=60.0)
    try:
        series = [_ds(d) for d in head_ct_series(3)]
        for ds in series:
            ds.ImagesInAcquisition = 5  # two never come
        (*statuses,) = _send(lst.port, series)
        assert [s.Status for s in statuses] == [0, 0, 0]
        _wait_for(lambda: _jobs(store, lst)[0].not_before < utcnow() + timedelta(seconds=120))
        (job,) = _jobs(store, lst)
        assert utcnow() + timedelta(seconds=30) < job.not_before  # the quiet timer, not the hold, not now
    finally:
        lst.stop()


def test_same_instance_twice_is_success_and_stored_once(store: Instances, listener: DicomListener) -> None:
    ds = _ds(chest())
    first = _send(listener.port, [ds])
    second = _send(listener.port, [ds, ds])
    assert [s.Status for s in [*first, *second]] == [0, 0, 0]
    assert len(_rows(store, listener)) == 1
    assert len(list(store.instances_dir.rglob("*.dcm"))) == 1


def test_unknown_calling_ae_is_rejected(store: Instances, caplog: pytest.LogCaptureFixture) -> None:
    lst = started_listener(store, allowed_calling_aets=["CT01"])
    try:
        assert _send(lst.port, [_ds(chest())], calling="INTRUDER") is None
        assert [s.Status for s in _send(lst.port, [_ds(chest())], calling="CT01")] == [0]
    finally:
        lst.stop()
    assert "rejected" in caplog.text and "INTRUDER" in caplog.text
    assert len(_rows(store, lst)) == 1


def test_wrong_called_ae_is_rejected(listener: DicomListener) -> None:
    assert _send(listener.port, [_ds(chest())], called="SOMEONE_ELSE") is None


def test_non_image_objects_get_one_answer_and_ours_none(store: Instances, listener: DicomListener) -> None:
    """An SR-only study gets one job (its result says "not analysed" and why: issue 15); our own objects
    coming back from the PACS never start one; an SR of a study that has a job adds none."""
    sr = make_dataset(sop_class=ComprehensiveSRStorage, modality="SR")
    del sr.PixelData
    sr.file_meta.MediaStorageSOPClassUID = ComprehensiveSRStorage
    ours = _ds(chest())
    ours.Manufacturer = "pacs-triage"  # our own preview coming back from the PACS
    statuses = _send(listener.port, [sr, ours])
    assert [s.Status for s in statuses] == [0, 0]
    assert sorted(r.role for r in _rows(store, listener)) == ["other", "ours"]
    (job,) = _jobs(store, listener)
    assert job.study_uid == sr.StudyInstanceUID
    again = make_dataset(sop_class=ComprehensiveSRStorage, modality="SR", study_uid=sr.StudyInstanceUID)
    del again.PixelData
    again.file_meta.MediaStorageSOPClassUID = ComprehensiveSRStorage
    assert [s.Status for s in _send(listener.port, [again])] == [0]
    assert len(_jobs(store, listener)) == 1


def test_full_series_does_not_wait_for_the_quiet_timer(store: Instances, listener: DicomListener) -> None:
    series = [_ds(b) for b in head_ct_series(4)]
    for ds in series:
        ds.ImagesInAcquisition = 4
    _send(listener.port, series[:3])
    (job,) = _jobs(store, listener)
    assert job.not_before > utcnow() + timedelta(seconds=30)  # 3 of 4: still waiting
    _send(listener.port, series[3:])
    (job,) = _jobs(store, listener)
    assert job.not_before <= utcnow()  # full: complete now


@pytest.mark.parametrize("journal", [False, True], ids=["file", "journal"])
def test_disk_full_is_out_of_resources_and_leaves_nothing(
    store: Instances, monkeypatch: pytest.MonkeyPatch, journal: bool
) -> None:
    listener = started_listener(store, journal=journal)
    sync = "fdatasync" if journal else "fsync"  # the one sync before the answer
    real = getattr(os, sync)  # service.store.files calls os.fsync / os.fdatasync

    def no_space(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, sync, no_space)
    try:
        (status,) = _send(listener.port, [_ds(chest())])
    finally:
        monkeypatch.setattr(os, sync, real)
    assert status.Status == 0xA700
    assert "disk" in str(status.ErrorComment)
    assert _rows(store, listener) == [] and _jobs(store, listener) == []
    assert not [p for p in store.instances_dir.rglob("*") if p.is_file()]
    # space is back: the sender's retry succeeds
    assert [s.Status for s in _send(listener.port, [_ds(chest())])] == [0]
    listener.stop()


def test_a_real_full_disk(tmp_path: Path) -> None:
    """A 1 MiB tmpfs as the instance store: the instance that does not fit gets 0xA700, the others stay."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], check=False).returncode:
        pytest.skip("cannot mount a tmpfs here (not root); the monkeypatched ENOSPC test covers the path")
    store = Instances(
        Database(f"sqlite:///{tmp_path / 'db.sqlite'}", sqlite_synchronous="NORMAL"), mnt / "instances"
    )
    lst = started_listener(store, journal=False)  # the files' own path; slots are on the data disk, not here
    try:
        big = [_ds(chest(rows=256, columns=256, pixels=None)) for _ in range(12)]  # 128 KiB each
        statuses = [s.Status for s in _send(lst.port, big)]
        assert statuses[0] == 0 and statuses[-1] == 0xA700, statuses
        stored = [r.sop_instance_uid for r in _rows(store, lst)]
        assert stored == [ds.SOPInstanceUID for ds, s in zip(big, statuses, strict=True) if s == 0]
        on_disk = sorted(p.stem for p in (mnt / "instances").rglob("*.dcm"))
        assert on_disk == sorted(stored)
        assert not list((mnt / "instances").rglob(".incoming-*"))
    finally:
        lst.stop()
        store.db.close()
        subprocess.run(["umount", str(mnt)], check=False)


def test_unparseable_dataset_is_cannot_understand(store: Instances, listener: DicomListener) -> None:
    ds = _ds(chest())
    with config.disable_value_validation():  # pydicom refuses to write it otherwise; a sender may not
        ds.StudyInstanceUID = "1.2.03.abc"  # not a UID: it would become a path component
        (status,) = _send(listener.port, [ds])
    assert status.Status == 0xC000
    assert _rows(store, listener) == []


def test_compressed_syntaxes_are_offered_only_when_decodable() -> None:
    syntaxes = storage_transfer_syntaxes()
    assert syntaxes[:2] == [ExplicitVRLittleEndian, "1.2.840.10008.1.2"]
    assert "1.2.840.10008.1.2.4.50" in syntaxes  # JPEG baseline (pylibjpeg-libjpeg)
    assert "1.2.840.10008.1.2.4.90" in syntaxes  # JPEG 2000 lossless (pylibjpeg-openjpeg)


def test_jpeg_file_is_received_as_sent(store: Instances, listener: DicomListener) -> None:
    from tests.pydicom_files import pydicom_testdata

    ds = dcmread(pydicom_testdata("SC_rgb_jpeg_gdcm.dcm"))
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    (status,) = _send(listener.port, [ds])
    assert status.Status == 0
    (row,) = _rows(store, listener)
    assert row.transfer_syntax_uid == ds.file_meta.TransferSyntaxUID
    assert dcmread(store.instances_dir / row.path).PixelData == ds.PixelData


def test_concurrent_associations_all_stored(store: Instances, listener: DicomListener) -> None:
    """Eight modalities at once, five images each: every instance acknowledged is stored, once."""
    from concurrent.futures import ThreadPoolExecutor

    batches = [[_ds(chest()) for _ in range(5)] for _ in range(8)]
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda b: _send(listener.port, b, calling=f"MOD{id(b) % 1000}"), batches))
    assert all(r is not None and [s.Status for s in r] == [0] * 5 for r in results)
    assert len(_rows(store, listener)) == 40
    assert len(_jobs(store, listener)) == 40


def test_an_acknowledged_study_is_known_before_its_rows_are_committed(
    store: Instances, listen: Callable[..., DicomListener]
) -> None:
    """Between a C-STORE's success and its row's group commit, the listener says the study is being
    stored, so the API answers 202 for it, never 404 (tests/reliability/test_load.py saw 404s)."""
    listener = listen(commit_delay_seconds=600)  # the window held open; flush() at stop cuts it short
    ds = _ds(chest())
    (status,) = _send(listener.port, [ds])
    assert status.Status == 0x0000
    with Session(store.db.engine) as s:
        assert not list(s.scalars(select(InstanceRow)))  # acknowledged, row not committed yet
    assert listener.rows_waiting(str(ds.StudyInstanceUID))
    assert not listener.rows_waiting(generate_uid())
    listener.stop()  # commits what waits
    assert [r.sop_instance_uid for r in _rows(store)] == [ds.SOPInstanceUID]
    assert not listener.rows_waiting(str(ds.StudyInstanceUID))


class TestWhereAStoreRuns:
    """With one or two associations open, a store runs on the listener's event loop (no thread hops:
    bench/RESULTS.md, sessions 17 and 27) when it would wait for nothing but its own slot's sync; otherwise
    on the store pool, so that the loop keeps serving every other association meanwhile."""

    @pytest.fixture
    def threads(self, monkeypatch: pytest.MonkeyPatch) -> list[str]:
        seen: list[str] = []
        handle = DicomListener.handle_store

        def recorded(self: DicomListener, request: object) -> tuple[int, str]:
            seen.append(threading.current_thread().name)
            return handle(self, request)  # type: ignore[arg-type]

        monkeypatch.setattr(DicomListener, "handle_store", recorded)
        return seen

    def test_a_lone_association_is_stored_on_the_loop(self, store: Instances, threads: list[str]) -> None:
        listener = started_listener(store)
        try:
            assert _send(listener.port, [_ds(chest()) for _ in range(3)]) is not None
        finally:
            listener.stop()
        assert threads == ["dicom-listener"] * 3
        assert len(_rows(store)) == 3

    @pytest.mark.parametrize("others", [STORE_ON_LOOP_UP_TO - 1, STORE_ON_LOOP_UP_TO])
    def test_beside_other_associations_on_the_loop_while_few(
        self, store: Instances, threads: list[str], others: int
    ) -> None:
        """Up to STORE_ON_LOOP_UP_TO associations open, the loop stores itself; past that, on the pool."""
        listener = started_listener(store)
        idle = AE(ae_title="IDLE")
        idle.add_requested_context(Verification)
        opened = [idle.associate("127.0.0.1", listener.port, ae_title="PACS_TRIAGE") for _ in range(others)]
        try:
            assert all(other.is_established for other in opened)
            assert _send(listener.port, [_ds(chest()) for _ in range(3)]) is not None
        finally:
            for other in opened:
                other.release()
            listener.stop()
        on_loop = others + 1 <= STORE_ON_LOOP_UP_TO
        assert len(threads) == 3
        assert all((name == "dicom-listener") == on_loop for name in threads)
        assert on_loop or all(name.startswith("dicom-store") for name in threads)

    def test_without_the_journal_on_the_pool(self, store: Instances, threads: list[str]) -> None:
        listener = started_listener(store, journal=False)
        try:
            assert _send(listener.port, [_ds(chest())]) is not None
        finally:
            listener.stop()
        assert len(threads) == 1 and threads[0].startswith("dicom-store")

    def test_a_store_that_waits_for_room_leaves_the_loop_free(
        self, store: Instances, threads: list[str]
    ) -> None:
        """One slot is ready and making another takes 2 s (a slow directory fsync): the first instance is
        stored on the loop, the second waits for its slot on the pool, and another association's C-ECHO is
        answered meanwhile (on the loop it would wait behind it)."""

        class OneReady(SlotStore):
            def start(self) -> None:  # no maker thread: one slot, then each write makes its own
                self._ready.extend(SlotStore._make(self, 1))

            def _make(self, count: int) -> list[ReadySlot]:
                time.sleep(2.0)
                return super()._make(count)

        dicom = DicomSettings(host="127.0.0.1", port=0)
        slots = OneReady(store.instances_dir.parent / "slots")
        replay_slots(slots, store, quiet_seconds=60)
        listener = DicomListener(dicom, store, quiet_seconds=60, slots=slots)
        listener.start()
        first_answered, done = threading.Event(), {}

        def sender() -> None:
            ae = AE(ae_title="MODALITY")
            datasets = [_ds(chest()) for _ in range(2)]
            ae.add_requested_context(datasets[0].SOPClassUID, [ExplicitVRLittleEndian])
            assoc = ae.associate("127.0.0.1", listener.port, ae_title="PACS_TRIAGE")
            try:
                done["first"] = assoc.send_c_store(datasets[0]).Status
                first_answered.set()
                done["second"] = assoc.send_c_store(datasets[1]).Status
                done["second at"] = time.monotonic()
            finally:
                assoc.release()

        thread = threading.Thread(target=sender)
        thread.start()
        try:
            assert first_answered.wait(30)
            time.sleep(0.3)  # the second store is waiting for its slot by now (2 s)
            ae = AE(ae_title="ECHO")
            ae.add_requested_context(Verification)
            assoc = ae.associate("127.0.0.1", listener.port, ae_title="PACS_TRIAGE")
            assert assoc.is_established
            assert assoc.send_c_echo().Status == 0
            echoed = time.monotonic()
            assoc.release()
            thread.join(30)
        finally:
            listener.stop()
        assert done["first"] == done["second"] == 0
        assert echoed < done["second at"]
        assert threads[0] == "dicom-listener" and threads[1].startswith("dicom-store")
        # the pool's store used the CRC taken as the dataset arrived: its record still checks out
        placed = list(store.instances_dir.rglob("*.dcm"))
        assert len(placed) == 2 and all(verify(p.read_bytes()) for p in placed)


def _stored_bytes(store: Instances, listener: DicomListener) -> bytes:
    (row,) = _rows(store, listener)
    return (store.instances_dir / row.path).read_bytes()


@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
def test_an_instance_written_past_the_page_cache_is_padded_to_whole_blocks(
    store: Instances, syntax: UID
) -> None:
    """A Data Set Trailing Padding element (PS3.10 7.2) ends the file on a block boundary, so its slot is
    one direct write; the dataset reads back as sent, with that element last."""
    listener = started_listener(store)
    try:
        assert listener.slots is not None
        if not listener.slots.direct:
            pytest.skip("the temporary directory's file system refuses O_DIRECT")
        ds = _ds(chest())
        ds.file_meta.TransferSyntaxUID = syntax
        ds.set_original_encoding(syntax == ImplicitVRLittleEndian, True)
        (status,) = _send(listener.port, [ds])
        assert status.Status == 0x0000
        data = _stored_bytes(store, listener)
    finally:
        listener.stop()
    assert len(data) % 4096 == 0
    back = dcmread(BytesIO(data))
    assert list(back.keys())[-1] == 0xFFFCFFFC
    assert back.DataSetTrailingPadding == bytes(len(back.DataSetTrailingPadding))
    del back.DataSetTrailingPadding
    assert back == ds and back.file_meta.TransferSyntaxUID == syntax


@pytest.mark.parametrize("why", ["direct writes off", "padded by its sender", "too large to assemble"])
def test_an_instance_is_stored_as_received_when_not_padded(
    store: Instances, monkeypatch: pytest.MonkeyPatch, why: str
) -> None:
    """No padding without direct writes, none added to a dataset that has its own, and an instance too
    large for the write buffer joined as before: the dataset bytes are exactly those sent."""
    if why == "too large to assemble":
        monkeypatch.setattr(direct_write, "KEEP", 4096)  # the chest radiograph no longer fits
    listener = started_listener(store, direct_io=why != "direct writes off")
    ds = _ds(chest())
    if why == "padded by its sender":
        ds.DataSetTrailingPadding = bytes(10)
    try:
        (status,) = _send(listener.port, [ds])
        assert status.Status == 0x0000
        data = _stored_bytes(store, listener)
    finally:
        listener.stop()
    sent = encode(ds, False, True)
    assert sent is not None and data.endswith(sent)
    assert dcmread(BytesIO(data)) == ds


def _large_ct() -> Dataset:
    ds = make_dataset(modality="CT", body_part="HEAD", rows=256, columns=256)
    assert len(ds.PixelData) >= 64 * 1024  # written while checked (receive._WRITTEN_WHILE_CHECKED_FROM)
    return ds


@pytest.fixture
def watched(listener: DicomListener, monkeypatch: pytest.MonkeyPatch) -> dict[str, list]:
    """Which thread wrote each slot (with what checksum) and which checked each instance."""
    placer = listener.commits.placer
    assert placer is not None
    seen: dict[str, list] = {"writes": [], "checks": []}
    real_write, real_admit = placer.write, listener.commits.admit

    def write(data: bytes | memoryview, crc: int | None = None) -> Slotted:
        seen["writes"].append((threading.current_thread().name, crc))
        return real_write(data, crc)

    def admit(p: ParsedInstance, *, held: bool) -> Admitted:
        seen["checks"].append(threading.current_thread().name)
        return real_admit(p, held=held)

    monkeypatch.setattr(placer, "write", write)
    monkeypatch.setattr(listener.commits, "admit", admit)
    return seen


def _leftover_slots(listener: DicomListener) -> list[Path]:
    assert listener.slots is not None
    return [p for p in listener.slots.directory.glob("slot-*.dcm") if p.stat().st_size]


def test_a_lone_associations_instance_is_written_by_the_listener_while_a_store_thread_checks_it(
    store: Instances, listener: DicomListener, watched: dict[str, list]
) -> None:
    """A lone association's instance of 64 KiB or more is written into its slot and synced by the
    listener's own thread, its record's checksum composed from the one the acceptor took as the dataset
    arrived, while a store thread checks and admits it; a duplicate's slot is removed, not placed."""
    ds = _large_ct()
    assert [s.Status for s in _send(listener.port, [ds]) + _send(listener.port, [ds, ds])] == [0, 0, 0]
    assert len(_rows(store, listener)) == 1
    (stored,) = store.instances_dir.rglob("*.dcm")
    back = dcmread(stored)
    assert back.PixelData == ds.PixelData and back.SOPInstanceUID == ds.SOPInstanceUID
    assert verify(stored.read_bytes())  # the record (placed files keep it) matches what was written
    assert _leftover_slots(listener) == []  # only empty slots made ahead remain
    assert [name for name, _ in watched["writes"]] == ["dicom-listener"] * 3
    assert all(crc is not None for _, crc in watched["writes"])  # taken as the datasets arrived
    assert len(watched["checks"]) == 3 and all(n.startswith("dicom-store") for n in watched["checks"])


def test_an_instance_refused_by_its_checks_leaves_no_slot_behind(
    store: Instances, listener: DicomListener, watched: dict[str, list]
) -> None:
    """Its slot was written while it was checked: a refusal (here its UID names an instance of another
    study, 0xA900) removes it, and the claim is let go (the first study's instance is stored once)."""
    first = _large_ct()
    other = _large_ct()
    other.SOPInstanceUID = first.SOPInstanceUID
    other.file_meta.MediaStorageSOPInstanceUID = first.SOPInstanceUID
    assert [s.Status for s in _send(listener.port, [first])] == [0]
    (status,) = _send(listener.port, [other])
    assert status.Status == 0xA900 and len(watched["writes"]) == 2
    assert len(_rows(store, listener)) == 1 and _leftover_slots(listener) == []


def test_an_instance_the_scan_declines_is_stored_from_its_own_bytes(
    store: Instances, listener: DicomListener, watched: dict[str, list]
) -> None:
    """Data the attribute scan does not answer for (here a Data Set Trailing Padding of the sender's own)
    are parsed in full and stored unpadded, exactly as sent; the padded slot written meanwhile is
    removed."""
    ds = _large_ct()
    ds.DataSetTrailingPadding = bytes(10)
    (status,) = _send(listener.port, [ds])
    assert status.Status == 0x0000
    data = _stored_bytes(store, listener)
    sent = encode(ds, False, True)
    assert sent is not None and data.endswith(sent) and len(watched["writes"]) == 2
    assert _leftover_slots(listener) == []


def test_a_write_that_fails_beside_the_checks_is_out_of_resources_and_can_be_retried(
    store: Instances, listener: DicomListener, watched: dict[str, list], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The listener's own slot write fails (the disk full at its sync): 0xA700 once the checks are done,
    nothing left, and the instance's claim let go, so the sender's retry is stored."""
    real = os.fdatasync

    def no_space(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    ds = _large_ct()
    monkeypatch.setattr(os, "fdatasync", no_space)
    try:
        (status,) = _send(listener.port, [ds])
    finally:
        monkeypatch.setattr(os, "fdatasync", real)
    assert status.Status == 0xA700 and _leftover_slots(listener) == []
    assert _rows(store, listener) == []
    assert [s.Status for s in _send(listener.port, [ds])] == [0]
    assert len(_rows(store, listener)) == 1
