"""Fault injection against a real ``pacs-triage serve`` process: what breaks around it must not break it.

- **The PACS goes down mid-delivery and comes back.** Orthanc is killed (SIGKILL) while results are being
  delivered and studies keep arriving; deliveries fail and back off; Orthanc is started again on the same
  storage and ports; every object arrives, once, and every delivery is ``done``.
- **The disk fills up during ingest.** The data directory (instances and the SQLite database) is a small
  tmpfs; a filler file leaves just enough room for part of a 100-slice series. With the default high
  watermark (0.95) and with the watermark off (1.0, so the write itself hits ENOSPC), instances that do
  not fit get 0xA700 (Out of Resources) and an HTTP POST 507; nothing is half-written (no temporary file,
  no row without its file, no file without its row, ``PRAGMA integrity_check`` ok); once the filler is
  deleted, the refused instances are accepted and the study is analysed.
- **A model file is corrupted.** One model's ONNX bytes are changed (the card's sha256 no longer
  matches); another's are replaced with garbage and its card updated to match (so ONNX Runtime itself
  refuses it). The service starts, is ready, lists both under ``errors`` in ``/v1/models`` with a
  reason, keeps serving the healthy model, and studies for the broken ones get "not analysed: ...".
- **The database's disk fills up** (the database on a disk of its own): instances are answered 0xA700 once
  a group commit of rows has failed (SQLITE_FULL / PostgreSQL disk_full), those acknowledged before keep
  their files, and their rows follow once there is room.
- **Inference is slow.** ``inference.debug_delay_ms`` holds every job; routine studies queue up; a stat
  study posted after them is finished before all but the one or two already claimed; ``/healthz/ready``
  answers 503 while more jobs than ``worker.ready_max_backlog`` wait and 200 after, and ``/metrics`` shows
  ``pacs_triage_jobs_waiting``.
"""

from __future__ import annotations

import json
import shutil
import sqlite3
import threading
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from pydicom.uid import generate_uid

from service.inference.card import ModelCard, sha256_file
from tests.fixtures.tmpfs import mounted_tmpfs
from tests.peers.orthanc import Orthanc, OrthancFactory
from tests.reliability.test_crash import (
    Service,
    head_ct_series,
    orthanc_sop_uids,
    report,
    sop_uid,
    storescu_acked,
    tiny_models,
)
from tests.service.dicom_factory import chest, multipart_related
from tests.service.dicom_factory import head_ct_series as head_ct_bytes

pytestmark = [pytest.mark.slow, pytest.mark.e2e]


def _post(base: str, body: bytes, **params: str) -> httpx.Response:
    return httpx.post(
        f"{base}/v1/studies",
        content=body,
        params=params,
        headers={"Content-Type": "application/dicom"},
        timeout=30,
    )


def _wait(what: str, check: Any, timeout: float, interval: float = 0.1) -> Any:
    deadline = time.monotonic() + timeout
    while not (value := check()):
        assert time.monotonic() < deadline, f"{what}: not within {timeout} s"
        time.sleep(interval)
    return value


def _result(base: str, study: str, timeout: float = 60) -> dict[str, Any]:
    def get() -> dict[str, Any] | None:
        r = httpx.get(f"{base}/v1/studies/{study}/result", timeout=10)
        assert r.status_code in (200, 202), r.text
        return r.json() if r.status_code == 200 else None

    return _wait(f"result of {study}", get, timeout)


# ---- the PACS goes down mid-delivery -----------------------------------------------------------------------


def test_pacs_killed_mid_delivery_then_back(tmp_path: Path, orthanc_factory: OrthancFactory) -> None:
    pacs = orthanc_factory()
    svc = Service(
        tmp_path,
        tiny_models(tmp_path),
        PACS_TRIAGE_DELIVERY__DESTINATIONS=json.dumps([pacs.peer_text]),
        PACS_TRIAGE_DELIVERY__MAX_ATTEMPTS="100",
    )
    stop = threading.Event()
    posted: list[str] = []
    statuses: list[int] = []

    def keep_posting() -> None:  # studies keep arriving through the outage
        while not stop.is_set():
            study = generate_uid()
            statuses.append(_post(svc.base, chest(study_uid=study)).status_code)
            posted.append(study)
            stop.wait(0.15)

    with svc.start():
        poster = threading.Thread(target=keep_posting, daemon=True)
        poster.start()
        _wait("first deliveries done", lambda: len(orthanc_sop_uids(pacs)) >= 6, 60)
        pacs.stop(graceful=False)  # the PACS crashes in the middle of the traffic
        t_down = time.monotonic()

        def failing() -> bool:
            rows = svc.query("SELECT COUNT(*) FROM deliveries WHERE attempts >= 2 AND last_error IS NOT NULL")
            return rows[0][0] >= 4

        _wait("deliveries failing and retried", failing, 60)
        time.sleep(max(0.0, 4.0 - (time.monotonic() - t_down)))  # down for a while: several backoffs
        outage = time.monotonic() - t_down
        back = Orthanc.start(pacs.root, aet=pacs.aet, dicom_port=pacs.dicom_port, http_port=pacs.http_port)
        orthanc_factory.servers.append(back)
        time.sleep(1.0)  # a little traffic after the PACS is back, too
        stop.set()
        poster.join(30)

        def all_done() -> bool:
            ((open_,),) = svc.query(
                "SELECT (SELECT COUNT(*) FROM deliveries WHERE state != 'done')"
                " + (SELECT COUNT(*) FROM results WHERE rendered_at IS NULL)"
                " + (SELECT COUNT(*) FROM jobs WHERE state IN ('pending', 'running'))"
            )
            return open_ == 0

        _wait("every delivery done", all_done, 90, 0.2)
        outputs = svc.query(
            "SELECT o.sop_instance_uid, d.state, d.attempts, d.last_error FROM outputs o "
            "JOIN deliveries d ON d.sop_instance_uid = o.sop_instance_uid"
        )
        ((n_results,),) = svc.query("SELECT COUNT(*) FROM results")

    assert set(statuses) == {202}, statuses
    assert n_results == len(posted)
    assert len(outputs) == 2 * len(posted)  # SR + preview per result, one delivery each
    assert {state for _, state, _, _ in outputs} == {"done"}
    in_pacs = orthanc_sop_uids(back)
    assert set(in_pacs) == {uid for uid, _, _, _ in outputs}, "every object in the PACS, nothing else"
    assert set(in_pacs.values()) == {1}
    retried = [a for _, _, a, _ in outputs if a > 1]
    assert retried, "some deliveries failed while the PACS was down"
    report(
        "PACS down mid-delivery",
        {
            "studies": len(posted),
            "objects_delivered": len(outputs),
            "objects_in_orthanc": sum(in_pacs.values()),
            "objects_that_needed_retries": len(retried),
            "max_attempts": max(retried),
            "outage_seconds": round(outage, 1),
        },
    )


# ---- the disk fills up -------------------------------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 24 MiB tmpfs (a real file system that really fills up); needs root, as test_scp's does."""
    mnt = tmp_path / "small"
    with mounted_tmpfs(mnt, "24m", "tests/service/store/test_disk.py covers the logic"):
        yield mnt


@pytest.fixture
def tiny_disk(tmp_path: Path) -> Iterator[Path]:
    """A 2 MiB tmpfs for the database alone."""
    mnt = tmp_path / "tiny"
    with mounted_tmpfs(mnt, "2m"):
        yield mnt


def _fill(disk: Path, leave_bytes: int) -> Path:
    """A filler file taking all but ``leave_bytes`` of the file system's free space."""
    filler = disk / "filler.bin"
    free = shutil.disk_usage(disk).free
    with filler.open("wb") as fh:
        fh.truncate(0)
        chunk = b"\0" * (1 << 20)
        todo = free - leave_bytes
        while todo > 0:
            fh.write(chunk[: min(len(chunk), todo)])
            todo -= len(chunk)
    return filler


@pytest.mark.parametrize("journal", ["true", "false"], ids=["slots", "files"])
@pytest.mark.parametrize("watermark", ["0.95", "1.0"], ids=["high-watermark", "real-ENOSPC"])
def test_disk_full_during_ingest_then_space_returns(
    tmp_path: Path, small_disk: Path, watermark: str, journal: str
) -> None:
    """With slots (``dicom.journal``) and without: what the disk cannot hold is refused, what was
    acknowledged is placed (a slot's rename needs no room), and empty slots made ahead take none. (The
    segment journal this replaced took an instance's size twice until its file was placed, and a 64 MiB
    zero-fill that ran until ENOSPC on this 24 MiB disk once took the room the files needed.)"""
    series = head_ct_series(tmp_path / "send", 100, size=128)  # ~33 KiB each, 3.3 MiB in all
    svc = Service(
        tmp_path,
        tiny_models(tmp_path),
        data_dir=small_disk / "var",
        PACS_TRIAGE_RETENTION__DISK_HIGH_WATERMARK=watermark,
        PACS_TRIAGE_ASSEMBLY__QUIET_SECONDS="3600",  # complete only when all 100 are in
        PACS_TRIAGE_DICOM__JOURNAL=journal,
    )
    with svc.start():
        usage = shutil.disk_usage(small_disk)
        # Room for roughly half the series: above the watermark (its 5 % headroom) or up to ENOSPC.
        headroom = int(usage.total * (1 - float(watermark))) if float(watermark) < 1 else 0
        filler = _fill(small_disk, headroom + 1_700_000)
        first = storescu_acked(svc.dicom_port, series, extra_args=["-nh"])
        refused = [s for s in first.other_statuses if "OutOfResources" in s]
        other = [s for s in first.other_statuses if "OutOfResources" not in s]
        # Larger than any instance the listener had to refuse: with ENOSPC the room left is whatever no
        # CT slice fitted in (under one slice, ~33 KiB), where a 64 x 64 chest film (~8 KiB) may fit, and
        # then storing it is right (a CI run got 202 here). This one (512 KiB) cannot.
        http_full = _post(svc.base, chest(rows=512, columns=512, pixels=np.zeros((512, 512), np.uint16)))
        live = httpx.get(f"{svc.base}/healthz/live", timeout=10).status_code

        # Nothing half-written, in the database or on disk (slots are placed after the answer).
        svc.files_on_disk({sop_uid(p) for p in first.acked}, timeout=30)
        rows = dict(svc.query("SELECT sop_instance_uid, path FROM instances"))
        instances_dir = svc.data_dir / "instances"
        on_disk = {p.stem: p for p in instances_dir.rglob("*.dcm")}
        leftovers = list(instances_dir.rglob(".incoming-*"))
        ((integrity,),) = svc.query("PRAGMA integrity_check")

        filler.unlink()  # the operator makes room
        second = storescu_acked(svc.dicom_port, [p for p in series if p not in set(first.acked)])
        result = _result(svc.base, _study_of(series[0]), timeout=120)
        http_after = _post(svc.base, chest())
        ((n_rows,),) = svc.query("SELECT COUNT(*) FROM instances WHERE study_uid = ?", _study_of(series[0]))
        log = svc.log()

    assert first.acked and refused, first.output[-3000:]
    assert not other, other[:5]
    assert len(first.acked) + len(refused) == len(series)
    assert http_full.status_code == 507, http_full.text
    assert http_full.headers["content-type"].startswith("application/problem+json")
    assert live == 200
    # Every acknowledged instance is on disk and no refused one; rows follow the answers in group commits
    # (a commit the full disk refused is retried once there is room, so rows may lag the files here).
    assert set(on_disk) == {sop_uid(p) for p in first.acked}, (
        "an acknowledged file missing, or a refused one kept"
    )
    assert set(rows) <= set(on_disk), "a row without its file"
    assert {rows[u] for u in rows} == {on_disk[u].relative_to(instances_dir).as_posix() for u in rows}
    assert not leftovers, leftovers
    assert integrity == "ok"
    assert second.returncode == 0 and len(second.acked) == len(series) - len(first.acked), second.output[
        -2000:
    ]
    assert n_rows == len(series)
    assert result["status"] == "complete" and result["findings"][0]["model"] == "ct-hemorrhage"
    assert http_after.status_code == 202, http_after.text
    assert "Traceback" not in log, log[log.index("Traceback") - 500 :][:4000]
    report(
        f"disk full (watermark {watermark}, journal {journal})",
        {
            "instances_sent": len(series),
            "acknowledged_before_full": len(first.acked),
            "refused_0xA700": len(refused),
            "http_while_full": http_full.status_code,
            "accepted_after_space_returned": len(second.acked),
        },
    )


def test_database_disk_full_is_out_of_resources(tmp_path: Path, tiny_disk: Path) -> None:
    """The database on its own small disk fills up while the instance disk has room."""
    series = head_ct_series(tmp_path / "send", 300, size=64)
    svc = Service(
        tmp_path,
        tiny_models(tmp_path),
        PACS_TRIAGE_STORE__DATABASE_URL=f"sqlite:///{tiny_disk / 'pacs-triage.db'}",
        PACS_TRIAGE_ASSEMBLY__QUIET_SECONDS="3600",
    )
    db = f"file:{tiny_disk / 'pacs-triage.db'}?mode=ro"

    def rows() -> set[str]:
        with sqlite3.connect(db, uri=True) as conn:
            return {r[0] for r in conn.execute("SELECT sop_instance_uid FROM instances")}

    with svc.start():
        # Room for some rows, not 300: with the WAL reused from its start on a short disk (service/store/
        # database.py, _restart_wal) 150 KB held every row; before, the WAL alone outgrew it.
        filler = _fill(tiny_disk, 40_000)
        run = storescu_acked(svc.dicom_port, series, extra_args=["-nh"])
        full = rows()
        on_disk = svc.files_on_disk({sop_uid(p) for p in run.acked}, timeout=30)  # slots: placed after
        # Room again: the rows of instances acknowledged before the commits failed follow.
        filler.unlink()
        deadline = time.monotonic() + 60
        while rows() != on_disk:
            assert time.monotonic() < deadline, "acknowledged instances never got their rows"
            time.sleep(0.1)
    statuses = {s.split(": ", 1)[1] for s in run.other_statuses}
    assert run.other_statuses, "the database never filled up"
    assert statuses == {"Refused: OutOfResources"}, statuses
    assert on_disk == {sop_uid(p) for p in run.acked}, "an acknowledged file missing, or a refused one kept"
    assert full <= on_disk, "a row without its file"


def _study_of(path: Path) -> str:
    from pydicom import dcmread

    return str(dcmread(path, stop_before_pixels=True).StudyInstanceUID)


# ---- a model file is corrupted -----------------------------------------------------------------------------


def test_corrupted_model_files_are_refused_the_others_keep_working(tmp_path: Path) -> None:
    models = tiny_models(tmp_path)
    # ct-hemorrhage: bytes changed after export, the card no longer matches.
    onnx = models / "ct-hemorrhage" / "model.onnx"
    data = bytearray(onnx.read_bytes())
    data[len(data) // 2 : len(data) // 2 + 16] = b"\xff" * 16
    onnx.write_bytes(bytes(data))
    # cxr-nodule: not an ONNX graph at all, with a card that matches it (refused before ORT opens it).
    nodule = models / "cxr-nodule" / "model.onnx"
    nodule.write_bytes(b"this is not a protobuf " * 40)
    card_path = models / "cxr-nodule" / "card.json"
    card = ModelCard.read(card_path)
    card.model_copy(update={"sha256": sha256_file(nodule), "size_bytes": nodule.stat().st_size}).write(
        card_path
    )

    with Service(tmp_path, models).start() as svc:
        listed = httpx.get(f"{svc.base}/v1/models", timeout=10).json()
        ready = httpx.get(f"{svc.base}/healthz/ready", timeout=10)
        cr_study, ct_study = generate_uid(), generate_uid()
        assert _post(svc.base, chest(study_uid=cr_study)).status_code == 202
        for body in head_ct_bytes(5, study_uid=ct_study):
            assert _post(svc.base, body).status_code == 202
        cr = _result(svc.base, cr_study)
        ct = _result(svc.base, ct_study)
        log = svc.log()

    errors = {e["name"]: e["error"] for e in listed["errors"]}
    assert [m["name"] for m in listed["models"]] == ["cxr-pneumothorax"]
    assert set(errors) == {"ct-hemorrhage", "cxr-nodule"}
    assert "sha256 mismatch" in errors["ct-hemorrhage"]
    assert errors["cxr-nodule"].startswith("model.onnx: unexpected protobuf wire type")
    assert ready.status_code == 200
    assert cr["status"] == "partial"
    assert [f["model"] for f in cr["findings"]] == ["cxr-pneumothorax"]
    (nodule_why,) = [n["reason"] for n in cr["not_analysed"] if n["model"] == "cxr-nodule"]
    assert nodule_why.startswith("not analysed: model cxr-nodule is not loaded (model.onnx: unexpected")
    assert ct["status"] == "not_analysed" and not ct["findings"]
    (ct_why,) = [n["reason"] for n in ct["not_analysed"]]
    assert ct_why.startswith("not analysed: model ct-hemorrhage is not loaded (sha256 mismatch")
    assert "model ct-hemorrhage not available: sha256 mismatch" in log
    report("corrupted models", {"errors": errors, "ct_reason": ct_why, "cr_status": cr["status"]})


# ---- inference is slow -------------------------------------------------------------------------------------


def test_slow_inference_stat_overtakes_the_backlog(tmp_path: Path) -> None:
    routine = [generate_uid() for _ in range(10)]
    stat = generate_uid()
    svc = Service(
        tmp_path,
        tiny_models(tmp_path),
        PACS_TRIAGE_INFERENCE__DEBUG_DELAY_MS="500",
        PACS_TRIAGE_WORKER__CONCURRENCY="1",
        PACS_TRIAGE_WORKER__READY_MAX_BACKLOG="5",
    )
    with svc.start():
        # One request for the ten routine studies: the backlog exists at once, whatever the machine's load
        # (ten requests in a row on a loaded machine let the worker drain them as they came).
        body, ctype = multipart_related([chest(study_uid=study) for study in routine])
        r = httpx.post(f"{svc.base}/v1/studies", content=body, headers={"Content-Type": ctype}, timeout=30)
        assert r.status_code == 202, r.text
        ((backlog,),) = svc.query("SELECT COUNT(*) FROM jobs WHERE state = 'pending'")
        ready_backlog = httpx.get(f"{svc.base}/healthz/ready", timeout=10)
        metrics = httpx.get(f"{svc.base}/metrics", timeout=10).text
        assert _post(svc.base, chest(study_uid=stat), priority="stat").status_code == 202
        results = {s: _result(svc.base, s, timeout=60) for s in [stat, *routine]}
        ready_after = httpx.get(f"{svc.base}/healthz/ready", timeout=10).status_code

    stamp = {
        s: {k: datetime.fromisoformat(v) for k, v in r["timestamps"].items() if v} for s, r in results.items()
    }
    arrived = stamp[stat]["first_instance_received"]
    # Routine jobs not yet claimed when the stat study arrived: every one of them must finish after it.
    queued = [s for s in routine if stamp[s]["inference_started"] > arrived]
    overtook = [s for s in queued if stamp[s]["result_stored"] < stamp[stat]["result_stored"]]
    assert backlog >= 8, backlog  # the queue grew: the worker holds one job at a time
    assert len(queued) >= 6, f"only {len(queued)} routine jobs were still queued when the stat one came"
    assert not overtook, f"{len(overtook)} queued routine studies finished before the stat one"
    # back-pressure: with more than 5 jobs waiting the replica says it is not ready, and is ready again after
    assert ready_backlog.status_code == 503 and ready_backlog.json()["backlog"] >= 6
    assert ready_after == 200
    assert "pacs_triage_jobs_waiting" in metrics
    report(
        "slow inference",
        {
            "routine_pending_when_stat_arrived": backlog,
            "routine_still_queued_when_stat_arrived": len(queued),
            "queued_routine_finished_before_stat": len(overtook),
            "healthz_ready_with_backlog": ready_backlog.status_code,
            "healthz_ready_after": ready_after,
            "jobs_backlog_in_metrics": "pacs_triage_jobs" in metrics,
        },
    )
