"""Listener processes (``dicom.processes`` above one; two here unless a test says otherwise): real senders
against the service's process and its children, the store's answers (rows, duplicates, conflicts, full
studies) made in the service, slots gathered at the next start, a child that dies started again."""

from __future__ import annotations

import functools
import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from io import BytesIO
from pathlib import Path
from typing import cast

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pynetdicom import AE
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from service.ingest.processes import ListenerProcesses, restart_delay
from service.ingest.scp import DicomListener
from service.store.db import InstanceRow
from service.store.instances import Instances
from service.store.slot_place import replay_slots
from service.store.slots import FRONT_PREFIX, SlotStore
from tests.fixtures.listener import started_listener
from tests.peers.dcmtk import require_dcmtk, storescu
from tests.peers.tls import Pki
from tests.service.dicom_factory import chest, head_ct_series


@pytest.fixture
def listener(store: Instances) -> Iterator[DicomListener]:
    lst = started_listener(store, processes=2)
    yield lst
    lst.stop()


def _children(listener: DicomListener) -> list[int]:
    assert listener._processes is not None
    return [p.proc.pid for p in listener._processes._processes]


def _serving(listener: DicomListener) -> list[int]:
    """Which process serves each open association: -1 for the service's own listener (the tracker's key
    is the association), ``k`` for listener process ``k`` (its key: ``(k, association id there)``)."""
    return sorted(
        cast(tuple[int, int], key)[0] if isinstance(key, tuple) else -1 for key in listener.open._by_assoc
    )


def _ready(listener: DicomListener) -> ListenerProcesses:
    """The listener processes, once each has started (connections go to the service's own meanwhile)."""
    processes = listener._processes
    assert processes is not None
    _wait_for(lambda: all(p.alive and p.served for p in processes._processes))
    return processes


def _datasets(blobs: list[bytes]) -> list[Dataset]:
    return [dcmread(BytesIO(b)) for b in blobs]


def _associate(port: int, datasets: list[Dataset], calling: str = "MODALITY"):
    ae = AE(ae_title=calling)
    for ds in datasets:
        ae.add_requested_context(ds.SOPClassUID, [ds.file_meta.TransferSyntaxUID])
    assoc = ae.associate("127.0.0.1", port, ae_title="PACS_TRIAGE")
    assert assoc.is_established
    return assoc


def _send(port: int, datasets: list[Dataset]) -> list[int]:
    assoc = _associate(port, datasets)
    try:
        return [int(assoc.send_c_store(ds).Status) for ds in datasets]
    finally:
        assoc.release()


def _rows(store: Instances) -> int:
    with Session(store.db.engine) as s:
        return int(s.scalar(select(func.count()).select_from(InstanceRow)) or 0)


def _wait_for(condition: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)


@pytest.mark.parametrize("processes", [2, 3])
def test_four_senders_over_the_processes_store_once_each(
    store: Instances, tmp_path: Path, processes: int
) -> None:
    """Four DCMTK senders at once, two of them sending the same instances (claims across processes):
    every instance stored once, every answer a success, every slot placed, the rows committed."""
    require_dcmtk()
    listener = started_listener(store, processes=processes)
    _ready(listener)
    series = head_ct_series(12)
    other = head_ct_series(12)
    folders = []
    for i, blobs in enumerate([series, series, other, other[:6]]):
        folder = tmp_path / f"sender{i}"
        folder.mkdir()
        for j, data in enumerate(blobs):
            (folder / f"{j:03d}.dcm").write_bytes(data)
        folders.append(folder)
    codes: list[int] = []
    threads = [
        threading.Thread(
            target=lambda f=f: codes.append(storescu(listener.port, [f], aet="PACS_TRIAGE").returncode)
        )
        for f in folders
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert codes == [0, 0, 0, 0]
    assert listener.flush(30)
    listener.stop()
    assert _rows(store) == 24
    placed = list(store.instances_dir.rglob("*.dcm"))
    assert len(placed) == 24
    slots = store.instances_dir.parent / "slots"
    assert [p for p in slots.glob(f"{FRONT_PREFIX}*/slot-*.dcm") if p.stat().st_size] == []


def test_connections_are_spread_over_the_processes(store: Instances) -> None:
    """Six associations held open land two on each of three processes, the service's own first (the
    kernel's SO_REUSEPORT hash would not spread them evenly)."""
    listener = started_listener(store, processes=3)
    _ready(listener)
    ds = _datasets([chest()])
    assocs = []
    for n in range(1, 7):
        assocs.append(_associate(listener.port, ds))
        _wait_for(functools.partial(lambda n: len(listener.open) == n, n))
    try:
        assert _serving(listener) == [-1, -1, 0, 0, 1, 1]
    finally:
        for a in assocs:
            a.release()
    _wait_for(lambda: len(listener.open) == 0)
    listener.stop()


def test_the_service_answers_conflicts_and_full_studies(tmp_path: Path) -> None:
    """0xA900 for a UID another study holds and 0xA700 for a study at its cap: decided in the service's
    process, answered by the listener process that received the instance."""
    from service.store.database import Database

    db = Database(f"sqlite:///{tmp_path / 'db.sqlite'}", sqlite_synchronous="NORMAL")
    store = Instances(db, tmp_path / "instances", max_instances_per_study=2)
    listener = started_listener(store, processes=2)
    try:
        first = _datasets(head_ct_series(3))
        assert _send(listener.port, first) == [0x0000, 0x0000, 0xA700]
        moved = _datasets(head_ct_series(1))[0]
        moved.SOPInstanceUID = first[0].SOPInstanceUID  # another study's instance UID
        assert listener.flush(30)
        assert _send(listener.port, [moved]) == [0xA900]
        assert _send(listener.port, first[:2]) == [0x0000, 0x0000]  # duplicates: successes
        assert listener.flush(30)
        assert _rows(store) == 2
    finally:
        listener.stop()
        db.close()


def test_an_open_association_holds_its_study_until_released(
    store: Instances, listener: DicomListener
) -> None:
    """The open-associations evidence the assembly gate reads is the service's, fed by the processes."""
    datasets = _datasets(head_ct_series(3))
    study = str(datasets[0].StudyInstanceUID)
    assoc = _associate(listener.port, datasets)
    try:
        assert [int(assoc.send_c_store(ds).Status) for ds in datasets] == [0, 0, 0]
        assert listener.flush(30)
        assert listener.open.is_open(study)
        assert listener.rows_waiting(study) is False
    finally:
        assoc.release()
    _wait_for(lambda: not listener.open.is_open(study))
    assert listener.flush(30)
    assert _rows(store) == 3


def test_a_process_that_dies_is_started_again(store: Instances, listener: DicomListener) -> None:
    """SIGKILL one listener process with an association open: its association is ended (aborted) in the
    service, a new process takes its place, and senders are served as before."""
    processes = _ready(listener)
    ds = _datasets([chest()])
    here = [_associate(listener.port, ds) for _ in range(2)]  # the service's own listener takes two
    _wait_for(lambda: len(listener.open) == 2)
    held = _associate(listener.port, ds)  # the third goes to the listener process
    _wait_for(lambda: len(listener.open) == 3)
    assert _serving(listener) == [-1, -1, 0]
    os.kill(_children(listener)[0], signal.SIGKILL)
    _wait_for(lambda: len(listener.open) == 2)
    held.abort()
    for a in here:
        a.release()
    _ready(listener)
    assert processes._processes[0].proc.returncode is None
    assert _send(listener.port, _datasets(head_ct_series(4))) == [0] * 4
    assert _send(listener.port, _datasets(head_ct_series(4))) == [0] * 4
    assert listener.flush(30)
    assert _rows(store) == 8


def test_stop_ends_every_process(store: Instances) -> None:
    listener = started_listener(store, processes=2)
    pids = _children(listener)
    assert _send(listener.port, _datasets(head_ct_series(2))) == [0, 0]
    listener.stop()
    assert _rows(store) == 2
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_slots_left_by_listener_processes_are_gathered_and_placed_at_start(store: Instances) -> None:
    """A complete slot in ``front-<k>`` (acknowledged, its service killed before the placement) is placed
    and indexed by the next start's replay; an empty one is removed; a torn one never becomes a row."""
    root = store.instances_dir.parent / "slots"
    front = root / f"{FRONT_PREFIX}1"
    blobs = head_ct_series(2)
    written = SlotStore(front)
    written.open()
    written.write(blobs[0])
    torn = written.write(blobs[1])
    torn.write_bytes(torn.read_bytes()[:-100])  # cut short: its record's length no longer matches
    written.close()
    (front / "slot-000000000009.dcm").touch()  # an empty one, made ahead and never used
    slots = SlotStore(root)
    replayed = replay_slots(slots, store, quiet_seconds=60)
    slots.close()
    assert (replayed.instances, replayed.torn) == (1, 1)
    assert _rows(store) == 1
    assert list(front.glob("slot-*.dcm")) == []


def test_rows_a_listener_process_acknowledged_are_held_from_its_answer(store: Instances) -> None:
    """A sender answered by a listener process may ask the API at once: until the rows are committed, the
    study is held (no 404, no earlier result as final), though the slot's report is still on its way."""
    listener = started_listener(store, processes=2, journal_place_delay_seconds=3.0)
    try:
        _ready(listener)
        blobs = _datasets(head_ct_series(2))
        study = str(blobs[0].StudyInstanceUID)
        here = [_associate(listener.port, blobs) for _ in range(2)]  # the service's own: then the process
        _wait_for(lambda: len(listener.open) == 2)
        there = _associate(listener.port, blobs)
        try:
            assert [int(there.send_c_store(ds).Status) for ds in blobs] == [0, 0]
            assert listener.rows_waiting(study)
        finally:
            there.release()
            for a in here:
                a.release()
        assert listener.flush(30)
        assert not listener.rows_waiting(study)
        assert _rows(store) == 2
    finally:
        listener.stop()


def test_tls_in_a_listener_process(store: Instances, tls_pki: Pki, tmp_path: Path) -> None:
    """DCMTK ``storescu`` over TLS, its connection handed to a listener process: the handshake is made
    there, with the same certificates and client-certificate rule."""
    require_dcmtk()
    listener = started_listener(
        store,
        processes=2,
        tls_cert_file=tls_pki.server.cert,
        tls_key_file=tls_pki.server.key,
        tls_ca_file=tls_pki.ca,
        tls_require_client_cert=True,
    )
    try:
        processes = _ready(listener)
        path = tmp_path / "chest.dcm"
        path.write_bytes(chest())
        tls = ["+tls", tls_pki.client.key, tls_pki.client.cert, "+cf", tls_pki.ca]
        port = listener.port
        with socket.create_connection(("127.0.0.1", port)), socket.create_connection(("127.0.0.1", port)):
            _wait_for(lambda: processes._local_load == 2)  # the service's own listener holds both
            sent = storescu(listener.port, [path], aet="PACS_TRIAGE", extra_args=[str(a) for a in tls])
            assert sent.returncode == 0, sent.stdout + sent.stderr
            _wait_for(lambda: processes._processes[0].load == 0)
            anonymous = ["+tla", "+cf", str(tls_pki.ca)]  # TLS without a client certificate
            assert storescu(listener.port, [path], aet="PACS_TRIAGE", extra_args=anonymous).returncode != 0
        assert processes._processes[0].handed == 2
        assert listener.flush(30)
        assert _rows(store) == 1
    finally:
        listener.stop()


def test_a_process_restarted_leaves_the_slots_its_predecessor_reported(store: Instances) -> None:
    """A listener process killed after its answers, while the service still holds its slots for placement
    (delayed here): the process started in its place opens the same slot directory, leaves the complete
    slots alone, and the service places and indexes every acknowledged instance."""
    listener = started_listener(store, processes=2, journal_place_delay_seconds=8.0)
    try:
        processes = _ready(listener)
        ds = _datasets([chest()])
        here = [_associate(listener.port, ds) for _ in range(2)]  # the service's own listener takes two
        _wait_for(lambda: len(listener.open) == 2)
        blobs = _datasets(head_ct_series(5))
        assert _send(listener.port, blobs) == [0] * 5  # through the listener process
        front = store.instances_dir.parent / "slots" / f"{FRONT_PREFIX}0"
        assert len([p for p in front.glob("slot-*.dcm") if p.stat().st_size]) == 5  # not placed yet
        (killed,) = _children(listener)
        os.kill(killed, signal.SIGKILL)
        _wait_for(lambda: processes._processes[0].proc.pid != killed)
        _ready(listener)  # its successor opened front-0, with the five slots still to place in it
        assert len([p for p in front.glob("slot-*.dcm") if p.stat().st_size]) == 5
        for a in here:
            a.release()
        assert listener.flush(30)
        assert _rows(store) == 5
        assert [p for p in front.glob("slot-*.dcm") if p.stat().st_size] == []
        placed = {dcmread(p).SOPInstanceUID for p in store.instances_dir.rglob("*.dcm")}
        assert placed == {ds.SOPInstanceUID for ds in blobs}
    finally:
        listener.stop()


def _killed_and_restarted(listener: DicomListener) -> int:
    """SIGKILL the (one) listener process; its successor's pid, once it is ready (started at once)."""
    (first,) = _children(listener)
    os.kill(first, signal.SIGKILL)
    _wait_for(lambda: _children(listener) != [first])
    _ready(listener)
    (successor,) = _children(listener)
    return successor


def test_the_restart_delay_grows_with_each_quick_death_in_a_row() -> None:
    assert [restart_delay(n) for n in range(10)] == [0, 0, 1, 2, 4, 8, 16, 32, 60, 60]


def test_a_process_that_keeps_dying_is_started_again_later(
    store: Instances, listener: DicomListener, caplog: pytest.LogCaptureFixture
) -> None:
    """SIGKILL a listener process soon after its start, twice: the first time it is started again at
    once, the second only after a second (and the log says why); the third process serves."""
    caplog.set_level(logging.ERROR, logger="service.ingest.processes")
    processes = _ready(listener)
    second = _killed_and_restarted(listener)
    killed = time.monotonic()
    os.kill(second, signal.SIGKILL)
    _wait_for(lambda: _children(listener) != [second])
    assert time.monotonic() - killed >= 1.0
    assert "starting it again in 1 s (2 deaths in a row, each within 60 s of its start)" in caplog.text
    _ready(listener)
    here = [_associate(listener.port, _datasets([chest()])) for _ in range(2)]  # the service's own: two
    _wait_for(lambda: len(listener.open) == 2)
    assert _send(listener.port, _datasets(head_ct_series(2))) == [0, 0]  # through the third process
    for a in here:
        a.release()
    assert processes._processes[0].handed == 1


def test_a_stop_while_a_restart_waits_starts_nothing(store: Instances) -> None:
    """The service stopping while a listener process waits out its restart delay: no process is started."""
    listener = started_listener(store, processes=2)
    try:
        processes = _ready(listener)
        second = _killed_and_restarted(listener)
        os.kill(second, signal.SIGKILL)
        _wait_for(lambda: not processes._processes[0].alive)
    finally:
        listener.stop()
    assert [p.proc.pid for p in processes._processes] == [second]  # the dead one: none took its place
    assert processes._processes[0].proc.poll() is not None
