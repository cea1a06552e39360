"""Load: 20 DICOM associations and 50 HTTP clients at once against one ``pacs-triage serve`` process.

Every client is closed-loop, as a modality or a RIS is: it sends a study, waits for its result, sends the
next. DICOM clients are DCMTK ``storescu`` processes sending a 10-slice head CT series each round (with
ImagesInAcquisition, so complete when full; ct-hemorrhage); HTTP clients POST one chest radiograph with
``Prefer: wait=30`` (cxr-pneumothorax and cxr-nodule). Models are the tiny test graphs: the load is on
ingest, the store, the queue and the micro-batcher, not on ONNX compute.

Asserted: every C-STORE answered Success and every storescu run exited 0; no HTTP answer was 5xx (nor
anything but 200/202); every study got a result, ``complete``; the server's resident memory (VmRSS) grew by
less than 10 % between the end of the warm-up and the end of the load. Reported: studies and instances per
second, p50/p95 time to result from the result JSON (``result_stored - first_instance_received``, the
``pacs_triage_time_to_result_seconds`` definition) per source, and RSS.

Short form: 30 s of load after a 10 s warm-up. Long form (``--long`` / ``PACS_TRIAGE_LONG_TESTS=1``): 5
minutes after a 30 s warm-up. ``PACS_TRIAGE_LOAD_SECONDS`` sets another duration.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections import Counter
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydicom.uid import generate_uid

from tests.reliability.test_crash import (
    Service,
    head_ct_series,
    long_form,
    report,
    storescu_acked,
    tiny_models,
)
from tests.service.dicom_factory import chest

pytestmark = [pytest.mark.slow, pytest.mark.e2e]

DICOM_CLIENTS = 20
HTTP_CLIENTS = 50
CT_SLICES = 10
RSS_GROWTH_LIMIT = 0.10


def _seconds(result: dict[str, Any], start: str, end: str) -> float:
    ts = result["timestamps"]
    return (datetime.fromisoformat(ts[end]) - datetime.fromisoformat(ts[start])).total_seconds()


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


class Tally:
    """What the clients saw; appended to from threads and the event loop (list.append is atomic)."""

    def __init__(self) -> None:
        self.http_status: Counter[int] = Counter()
        self.dicom_failures: list[str] = []
        self.results: dict[str, tuple[str, dict[str, Any]]] = {}  # study → (source, result JSON)
        self.instances = 0
        self.errors: list[str] = []


def _wait_result(base: str, study: str, timeout: float = 120) -> tuple[int, dict[str, Any]]:
    deadline = time.monotonic() + timeout
    with httpx.Client(base_url=base, timeout=30) as client:
        while True:
            r = client.get(f"/v1/studies/{study}/result")
            if r.status_code != 202 or time.monotonic() > deadline:
                return r.status_code, r.json()
            time.sleep(0.2)


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (/proc/<pid>/stat fields 14 and 15, in clock ticks)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _dicom_client(i: int, svc: Service, root: Path, stop: threading.Event, tally: Tally) -> None:
    """One modality: a new head CT series per round, sent by storescu, then its result awaited."""
    n = 0
    try:
        while not stop.is_set():
            study = generate_uid()
            files = head_ct_series(root / f"mod{i}" / f"{n}", CT_SLICES, size=64, study_uid=study)
            n += 1
            run = storescu_acked(svc.dicom_port, files, calling=f"MOD{i:02d}", timeout=120)
            tally.instances += len(run.acked)
            if run.returncode != 0 or len(run.acked) != len(files):
                tally.dicom_failures.append(f"MOD{i:02d}: rc {run.returncode}, {run.other_statuses[:3]}")
                tally.dicom_failures.append(run.output[-1500:])
                continue
            status, body = _wait_result(svc.base, study)
            tally.http_status[status] += 1
            if status == 200:
                tally.results[study] = ("dicom", body)
    except Exception as exc:  # reported by the test
        tally.errors.append(f"MOD{i:02d}: {type(exc).__name__}: {exc}")


async def _http_client(client: httpx.AsyncClient, stop: threading.Event, tally: Tally) -> None:
    """One RIS-like client: POST a chest radiograph, wait for its result (Prefer: wait), repeat."""
    while not stop.is_set():
        study = generate_uid()
        body = await asyncio.to_thread(chest, study_uid=study)
        try:
            r = await client.post(
                "/v1/studies",
                content=body,
                headers={"Content-Type": "application/dicom", "Prefer": "wait=30"},
            )
            tally.http_status[r.status_code] += 1
            tally.instances += 1
            while r.status_code == 202:
                await asyncio.sleep(0.05)
                r = await client.get(f"/v1/studies/{study}/result")
                tally.http_status[r.status_code] += 1
            if r.status_code == 200:
                tally.results[study] = ("rest", r.json())
        except httpx.HTTPError as exc:
            tally.errors.append(f"HTTP: {type(exc).__name__}: {exc}")


async def _http_load(base: str, stop: threading.Event, tally: Tally) -> None:
    limits = httpx.Limits(max_connections=HTTP_CLIENTS, max_keepalive_connections=HTTP_CLIENTS)
    async with httpx.AsyncClient(base_url=base, timeout=90, limits=limits) as client:
        await asyncio.gather(*(_http_client(client, stop, tally) for _ in range(HTTP_CLIENTS)))


def test_20_associations_and_50_http_clients(tmp_path: Path, pytestconfig: pytest.Config) -> None:
    long = long_form(pytestconfig)
    warmup, duration = (30.0, 300.0) if long else (10.0, 30.0)
    duration = float(os.environ.get("PACS_TRIAGE_LOAD_SECONDS") or duration)
    svc = Service(
        tmp_path,
        tiny_models(tmp_path),
        PACS_TRIAGE_ASSEMBLY__QUIET_SECONDS="2",
        PACS_TRIAGE_DICOM__MAX_ASSOCIATIONS=str(DICOM_CLIENTS + 8),
        PACS_TRIAGE_LOG_LEVEL="WARNING",
    )
    tally = Tally()
    stop = threading.Event()
    rss: list[tuple[float, int]] = []
    with svc.start():
        rss_start = svc.rss_kib()
        cpu_start = _cpu_seconds(svc.pid)
        threads = [
            threading.Thread(target=_dicom_client, args=(i, svc, tmp_path / "send", stop, tally), daemon=True)
            for i in range(DICOM_CLIENTS)
        ]
        t0 = time.monotonic()
        for t in threads:
            t.start()

        def sample_rss() -> None:
            while not stop.is_set():
                rss.append((time.monotonic() - t0, svc.rss_kib()))
                stop.wait(1.0)

        sampler = threading.Thread(target=sample_rss, daemon=True)
        sampler.start()
        timer = threading.Timer(warmup + duration, stop.set)
        timer.start()
        asyncio.run(_http_load(svc.base, stop, tally))  # returns once stop is set and every client is done
        for t in threads:
            t.join(timeout=180)
        elapsed = time.monotonic() - t0
        rss_end = svc.rss_kib()
        server_cpu = _cpu_seconds(svc.pid) - cpu_start
        sampler.join()
        server_alive = svc.proc is not None and svc.proc.poll() is None
        log = svc.log()

    assert server_alive, log[-3000:]
    assert not tally.errors, tally.errors[:5]
    assert not tally.dicom_failures, tally.dicom_failures[:4]
    assert set(tally.http_status) <= {200, 202}, tally.http_status
    statuses = Counter(body["status"] for _, body in tally.results.values())
    assert set(statuses) == {"complete"}, statuses
    warm = [kib for t, kib in rss if t >= warmup]
    rss_warm = warm[0] if warm else rss_end
    growth = (rss_end - rss_warm) / rss_warm
    by_source: dict[str, list[float]] = {"dicom": [], "rest": []}
    for source, body in tally.results.values():
        by_source[source].append(_seconds(body, "first_instance_received", "result_stored"))
    everything = by_source["dicom"] + by_source["rest"]
    figures = {
        "seconds": round(elapsed, 1),
        "warmup_seconds": warmup,
        "dicom_associations": DICOM_CLIENTS,
        "http_clients": HTTP_CLIENTS,
        "studies": len(tally.results),
        "studies_dicom": len(by_source["dicom"]),
        "studies_rest": len(by_source["rest"]),
        "instances": tally.instances,
        "instances_per_second": round(tally.instances / elapsed, 1),
        "studies_per_second": round(len(tally.results) / elapsed, 1),
        "http_statuses": dict(tally.http_status),
        "server_cpu_cores_used": round(server_cpu / elapsed, 2),
        "rss_mib_start": round(rss_start / 1024, 1),
        "rss_mib_after_warmup": round(rss_warm / 1024, 1),
        "rss_mib_end": round(rss_end / 1024, 1),
        "rss_mib_max": round(max(k for _, k in rss) / 1024, 1) if rss else None,
        "rss_growth_after_warmup_pct": round(100 * growth, 1),
        "rss_mib_every_10s": [round(k / 1024) for t, k in rss if int(t) % 10 == 0][::1],
        "p50_time_to_result_s": round(_pct(everything, 0.50), 3),
        "p95_time_to_result_s": round(_pct(everything, 0.95), 3),
        "p95_time_to_result_dicom_s": round(_pct(by_source["dicom"], 0.95), 3),
        "p95_time_to_result_rest_s": round(_pct(by_source["rest"], 0.95), 3),
        "server_errors_logged": log.count(" ERROR "),
    }
    report("load", figures)
    assert growth < RSS_GROWTH_LIMIT, figures
    assert " ERROR " not in log, log[log.index(" ERROR ") - 200 :][:3000]
