"""Throughput with 1, 2 and 4 worker processes on PostgreSQL vs the embedded SQLite process, same studies.

Each configuration gets a fresh data directory and database, the shipped models, and the same N chest
radiographs (synthetic, each a new study), posted over HTTP by 8 concurrent clients as fast as the API takes
them. Throughput is studies per second from the first POST to the last result stored (read from the
database), so it includes storing, claiming, inference and writing results:

- ``sqlite``: ``pacs-triage serve`` (role all: API + workers in one process, SQLite WAL, synchronous=FULL);
- ``postgres xK``: one ``--role api`` process and K ``--role worker`` processes on a real PostgreSQL
  (Debian's, started by the test harness, fsync on), instances on a shared directory.

Usage::

    .venv/bin/python bench/bench_scale.py [--studies 200] [--workers 1 2 4]

Prints the ratios against the SQLite process. On the 2-core CI machine the workers share two cores, so
the numbers say where the next bottleneck is rather than how far it scales on a real cluster.
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pydicom
from pydicom.uid import generate_uid
from sqlalchemy import create_engine, func, select
from sqlalchemy.orm import Session

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from service.store.db import ResultRow  # noqa: E402
from tests.peers.postgres import Postgres  # noqa: E402
from training.data.synthetic import generate_cxr  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _studies(n: int, work: Path) -> list[bytes]:
    labels = generate_cxr(work / "cxr", n_patients=8, seed=21)
    files = [work / "cxr" / line.split(",")[0] for line in labels.read_text().splitlines()[1:]]
    out = []
    for i in range(n):
        ds = pydicom.dcmread(files[i % len(files)])
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = (generate_uid() for _ in range(3))
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        buf = io.BytesIO()
        ds.save_as(buf, enforce_file_format=True)
        out.append(buf.getvalue())
    return out


class Cluster:
    """The processes of one configuration; stopped together."""

    def __init__(self, data: Path, db_url: str | None) -> None:
        self.data, self.db_url = data, db_url
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, role: str) -> str:
        port = _free_port()
        env = {
            **os.environ,
            "PACS_TRIAGE_DATA_DIR": str(self.data),
            "PACS_TRIAGE_MODELS_DIR": str(ROOT / "models"),
            "PACS_TRIAGE_DICOM__ENABLED": "false",
            "PACS_TRIAGE_AUTH__OPEN": "true",
            "PACS_TRIAGE_LOG_LEVEL": "WARNING",
            "PACS_TRIAGE_WORKER__POLL_SECONDS": "0.05",
        }
        if self.db_url:
            env["PACS_TRIAGE_STORE__DATABASE_URL"] = self.db_url
        proc = subprocess.Popen(
            [sys.executable, "-m", "service", "serve", "--role", role, "--port", str(port)], env=env, cwd=ROOT
        )
        self.procs.append(proc)
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"{base}/healthz/ready", timeout=1).status_code == 200:
                    return base
            except httpx.TransportError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{role} process did not become ready")
            time.sleep(0.1)

    def stop(self) -> None:
        for p in self.procs:
            p.send_signal(signal.SIGTERM)
        for p in self.procs:
            p.wait(timeout=60)


def _run(studies: list[bytes], base: str, db_url: str) -> float:
    engine = create_engine(db_url)

    def post(data: bytes) -> None:
        r = httpx.post(
            f"{base}/v1/studies", content=data, headers={"Content-Type": "application/dicom"}, timeout=60
        )
        r.raise_for_status()

    t0 = time.perf_counter()
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(post, studies))
    while True:
        with Session(engine) as s:
            if (s.scalar(select(func.count()).select_from(ResultRow)) or 0) >= len(studies):
                break
        time.sleep(0.05)
    seconds = time.perf_counter() - t0
    engine.dispose()
    return len(studies) / seconds


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--studies", type=int, default=200)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-scale-") as tmp:
        work = Path(tmp)
        studies = _studies(args.studies, work)
        print(f"{args.studies} chest radiographs (each a new study), 8 HTTP clients, shipped models")
        data = work / "sqlite"
        cluster = Cluster(data, None)
        try:
            base = cluster.start("all")
            baseline = _run(studies, base, f"sqlite:///{data / 'pacs-triage.db'}")
        finally:
            cluster.stop()
        print(f"  sqlite, one process (role all)     {baseline:6.1f} studies/s   1.00x")
        with Postgres.start(work / "pg", fsync=True) as pg:
            for k in args.workers:
                url = pg.create_database(f"bench{k}")
                cluster = Cluster(work / f"pg{k}", url)
                try:
                    base = cluster.start("api")
                    for _ in range(k):
                        cluster.start("worker")
                    rate = _run(studies, base, url)
                finally:
                    cluster.stop()
                    shutil.rmtree(work / f"pg{k}", ignore_errors=True)
                print(
                    f"  postgres, api + {k} worker process(es) {rate:6.1f} studies/s   {rate / baseline:.2f}x"
                )


if __name__ == "__main__":
    main()
