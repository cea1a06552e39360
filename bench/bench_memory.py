"""Peak memory of the whole service while it receives and analyses large CT series (issue 13, item 5).

Why: a 1,000-slice head CT read whole held every file's bytes and pydicom's decoded array of each (~1.2 MiB
per 512 x 512 slice): one study peaked at 1.4 GiB, and ``store.max_instances_per_study`` allows ten times
that. The goal is a peak RSS of at most 600 MB for the whole service (all threads, models loaded) for a
1,000-slice series of 512 x 512 slices, sent by DCMTK ``storescu`` over DICOM and analysed by the shipped
hemorrhage model. ``--via rest`` POSTs each series instead, as one ``multipart/related`` request to
``/v1/studies`` (streamed from the files: the client holds one slice at a time), and ``--uploads K`` sends
K such series (K studies) at once: three concurrent 450 MiB uploads once peaked at 2.87 GiB.

What it prints, per server tree: the resident set before sending (models loaded, warm), the peak
(``VmHWM`` of ``/proc/PID/status``, the kernel's high-water mark) when the last C-STORE is answered and
once the result is stored, and the peak per slice above the idle level. Several trees can be measured in
one run (``--server before=/tmp/before --server after=.``), each the tree's own code with its own
``PYTHONPATH``, on the same files.

Usage::

    .venv/bin/python bench/bench_memory.py [--slices 1000] [--via dicom|rest] [--uploads K]
        [--server NAME=TREE ...]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
from ingest_rig import ct_slice, free_port, wait_port  # the ingest bench's start-up checks and slices
from pydicom.uid import generate_uid

ROOT = Path(__file__).resolve().parents[1]


_BOUNDARY = "bench-memory-boundary"


def _multipart(paths: list[Path]) -> tuple[int, Iterator[bytes]]:
    """(length, body) of one multipart/related request carrying ``paths``, read one file at a time."""
    head = f"--{_BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\n".encode()
    tail = f"--{_BOUNDARY}--\r\n".encode()
    length = sum(len(head) + p.stat().st_size + 2 for p in paths) + len(tail)

    def body() -> Iterator[bytes]:
        for p in paths:
            yield head + p.read_bytes() + b"\r\n"
        yield tail

    return length, body()


def _post(base: str, paths: list[Path]) -> int:
    length, body = _multipart(paths)
    r = httpx.post(
        f"{base}/v1/studies",
        content=body,
        headers={
            "Content-Type": f'multipart/related; type="application/dicom"; boundary={_BOUNDARY}',
            "Content-Length": str(length),
        },
        timeout=600,
    )
    if r.status_code >= 300:
        raise SystemExit(f"POST answered {r.status_code}: {r.text[:500]}")
    return r.status_code


def head_ct(out: Path, n: int) -> tuple[str, list[Path]]:
    """``n`` uncompressed 512 x 512 head CT slices of one series (soft tissue around 40 HU, noise), routed
    to the shipped ct-hemorrhage model; ImagesInAcquisition says ``n`` so the series completes at once."""
    out.mkdir(parents=True)
    rng = np.random.default_rng(0)
    study, series = generate_uid(), generate_uid()
    y, x = np.mgrid[-1:1:512j, -1:1:512j]
    head = (x**2 + y**2) < 0.8
    paths = []
    for i in range(n):
        hu = np.where(head, 40 + rng.normal(0, 8, (512, 512)), -1000)
        ds = ct_slice(study, series, i + 1, n, "Bench^Memory")
        ds.BodyPartExamined, ds.StudyDescription = "HEAD", "CT HEAD WITHOUT CONTRAST"
        ds.ImagePositionPatient = [-125.0, -125.0, float(i) * 0.5]
        ds.PixelSpacing, ds.SliceThickness = [0.5, 0.5], 0.5
        ds.PixelData = np.clip(hu + 1024, 0, 4095).astype(np.uint16).tobytes()
        path = out / f"IM{i:05d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return study, paths


def _status_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def measure(
    tree: Path, series: list[tuple[str, list[Path]]], work: Path, via: str
) -> tuple[float, float, float, float, str]:
    """(idle MiB, peak MiB while receiving, peak MiB overall, seconds from the last instance stored to the
    last result, the results' statuses)."""
    http, dicom = free_port(), free_port()
    env = dict(
        os.environ,
        PYTHONPATH=str(tree),
        PACS_TRIAGE_DATA_DIR=str(work / "data"),
        PACS_TRIAGE_MODELS_DIR=str(ROOT / "models"),
        PACS_TRIAGE_DICOM__PORT=str(dicom),
        PACS_TRIAGE_LOG_LEVEL="WARNING",
        PACS_TRIAGE_AUTH__OPEN="true",
        PACS_TRIAGE_INFERENCE__PROVIDERS="cpu",
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "service", "serve", "--port", str(http)], env=env, cwd=tree
    )
    try:
        wait_port(dicom, proc, timeout=120)
        wait_port(http, proc, timeout=120)
        with httpx.Client(base_url=f"http://127.0.0.1:{http}", timeout=30) as client:
            while client.get("/healthz/ready").status_code != 200:
                time.sleep(0.2)
            idle = _status_kib(proc.pid, "VmRSS") / 1024
            start = time.perf_counter()
            with concurrent.futures.ThreadPoolExecutor(len(series)) as pool:
                if via == "rest":
                    base = f"http://127.0.0.1:{http}"
                    list(pool.map(lambda s: _post(base, s[1]), series))
                else:
                    list(pool.map(lambda s: _storescu(dicom, work / s[0], s[1]), series))
            sent = time.perf_counter()
            received = _status_kib(proc.pid, "VmHWM") / 1024  # the peak while receiving
            statuses = []
            for study, _ in series:
                while True:
                    r = client.get(f"/v1/studies/{study}/result")
                    if r.status_code == 200:
                        break
                    if time.perf_counter() - sent > 600:
                        raise SystemExit("no result within 600 s")
                    time.sleep(0.2)
                statuses.append(str(r.json().get("status")))
            waited = time.perf_counter() - sent
            peak = _status_kib(proc.pid, "VmHWM") / 1024
            status = ",".join(sorted(set(statuses)))
            return idle, received, peak, waited, f"{status} (sending took {sent - start:.1f} s,"
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def _storescu(port: int, batch: Path, paths: list[Path]) -> None:
    batch.mkdir(parents=True)
    for p in paths:  # one directory argument: storescu's command line stays short
        os.link(p, batch / p.name)
    subprocess.run(
        ["storescu", "-aec", "PACS_TRIAGE", "+sd", "127.0.0.1", str(port), str(batch)],
        check=True,
        stdout=subprocess.DEVNULL,
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--slices", type=int, default=1000)
    parser.add_argument("--via", choices=["dicom", "rest"], default="dicom")
    parser.add_argument("--uploads", type=int, default=1, help="series (studies) sent at once")
    parser.add_argument("--server", action="append", type=lambda s: s.split("=", 1), default=None)
    args = parser.parse_args()
    servers = args.server or [["this", str(ROOT)]]
    if shutil.which("storescu") is None:
        raise SystemExit("storescu (DCMTK) is needed: scripts/install-peers")
    print(f"machine: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at start")
    with tempfile.TemporaryDirectory() as tmp:
        series = [head_ct(Path(tmp) / f"series{i}", args.slices) for i in range(args.uploads)]
        size = sum(p.stat().st_size for _, paths in series for p in paths) / 2**20
        print(
            f"{args.uploads} x {args.slices} slices of 512 x 512, {size:.0f} MiB, one series per study"
            f" (ImagesInAcquisition set), sent {'over DICOM' if args.via == 'dicom' else 'by POST'}"
        )
        slices = args.slices * args.uploads
        for label, tree in servers:
            work = Path(tmp) / f"run-{label}"
            work.mkdir()
            idle, received, peak, waited, status = measure(Path(tree).resolve(), series, work, args.via)
            print(
                f"[{label}] idle {idle:.0f} MiB, peak while receiving {received:.0f} MiB, "
                f"peak {peak:.0f} MiB (goal <= 600 MB = 572 MiB), "
                f"{(peak - idle) * 1024 / slices:.0f} KiB per slice above idle; "
                f"result {status} the result {waited:.1f} s more)"
            )
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
