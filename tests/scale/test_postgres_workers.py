"""Scale-out on a real PostgreSQL: an API process and worker processes that meet only in the database.

`pacs-triage serve --role api` stores studies; two `--role worker` processes claim jobs with FOR UPDATE SKIP
LOCKED and leases. No job is lost or run twice; a worker killed mid-job loses its job to the other once the
lease expires, and still exactly one result per study is written.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
from sqlalchemy import create_engine, func, select
from sqlalchemy.orm import Session

from service.store.db import JobRow, ResultRow
from tests.peers import free_port
from tests.service.conftest import wait_until_ready
from tests.service.dicom_factory import chest, multipart_related

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.fixtures.tiny_models import write_tiny_models

    path = tmp_path_factory.mktemp("models")
    write_tiny_models(path)
    return path


@pytest.fixture
def start(tmp_path: Path, tiny_models: Path, postgres_url: str) -> Iterator[Callable[..., tuple]]:
    """start(role, name, **env) → (process, base URL); every process is stopped at the end."""
    procs: list[subprocess.Popen[bytes]] = []

    def run(role: str, name: str, **extra: str) -> tuple[subprocess.Popen[bytes], str]:
        port = free_port()
        env = {
            **os.environ,
            "PACS_TRIAGE_STORE__DATABASE_URL": postgres_url,
            "PACS_TRIAGE_DATA_DIR": str(tmp_path / "shared"),  # the shared filesystem path
            "PACS_TRIAGE_MODELS_DIR": str(tiny_models),
            "PACS_TRIAGE_INFERENCE__PROVIDERS": "cpu",
            "PACS_TRIAGE_WORKER__POLL_SECONDS": "0.05",
            "PACS_TRIAGE_WORKER__LEASE_SECONDS": "1.5",
            "PACS_TRIAGE_DICOM__ENABLED": "false",
            "PACS_TRIAGE_AUTH__OPEN": "true",
            **extra,
        }
        with (tmp_path / f"{name}.log").open("wb") as log:  # the child keeps its own descriptor
            proc = subprocess.Popen(
                [sys.executable, "-m", "service", "serve", "--role", role, "--port", str(port)],
                env=env,
                cwd=ROOT,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        procs.append(proc)
        base = f"http://127.0.0.1:{port}"
        wait_until_ready(
            base, lambda: None if proc.poll() is None else (tmp_path / f"{name}.log").read_text()[-3000:]
        )
        return proc, base

    yield run
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextmanager
def _db(url: str) -> Iterator[Session]:
    engine = create_engine(url)
    try:
        with Session(engine) as s:
            yield s
    finally:
        engine.dispose()


def _post_studies(base: str, n: int) -> list[str]:
    def one(_: int) -> str:
        body, ctype = multipart_related([chest()])
        r = httpx.post(f"{base}/v1/studies", content=body, headers={"Content-Type": ctype}, timeout=30)
        assert r.status_code == 202, r.text
        return str(r.json()["studies"][0])

    with ThreadPoolExecutor(8) as pool:
        return list(pool.map(one, range(n)))


def _wait_all_done(url: str, n: int, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with _db(url) as s:
            done = s.scalar(select(func.count()).select_from(ResultRow))
            open_jobs = s.scalar(select(func.count()).where(JobRow.state.in_(("pending", "running"))))
        if (done or 0) >= n and open_jobs == 0:
            return
        time.sleep(0.2)
    raise AssertionError(f"{done} of {n} results after {timeout} s ({open_jobs} jobs open)")


def test_two_workers_share_200_studies_none_lost_none_twice(
    start: Callable[..., tuple], postgres_url: str
) -> None:
    _api, base = start("api", "api")
    # a longer lease than the kill test's: a loaded CI machine must not make a live worker lose a job
    start("worker", "worker-1", PACS_TRIAGE_WORKER__LEASE_SECONDS="10")
    start("worker", "worker-2", PACS_TRIAGE_WORKER__LEASE_SECONDS="10")
    studies = _post_studies(base, 200)
    _wait_all_done(postgres_url, 200)
    with _db(postgres_url) as s:
        per_study = dict(
            s.execute(select(ResultRow.study_uid, func.count()).group_by(ResultRow.study_uid)).all()
        )
        jobs = s.scalars(select(JobRow)).all()
    assert sorted(per_study) == sorted(studies) and set(per_study.values()) == {1}
    assert {j.state for j in jobs} == {"done"} and len(jobs) == 200
    assert all(j.attempts == 1 for j in jobs)  # nothing ran twice
    by_worker = {j.worker_id for j in jobs}
    assert len(by_worker) == 2, by_worker  # both workers took a share
    r = httpx.get(f"{base}/v1/studies/{studies[0]}/result", timeout=10)
    assert r.status_code == 200 and r.json()["study_uid"] == studies[0]


def test_a_killed_workers_job_finishes_on_the_other(start: Callable[..., tuple], postgres_url: str) -> None:
    _api, base = start("api", "api")
    slow, _ = start("worker", "slow", PACS_TRIAGE_INFERENCE__DEBUG_DELAY_MS="60000")
    (study,) = _post_studies(base, 1)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # wait until the slow worker holds the job
        with _db(postgres_url) as s:
            job = s.scalars(select(JobRow)).first()
        if job is not None and job.state == "running":
            break
        time.sleep(0.05)
    assert job is not None and job.state == "running" and job.worker_id is not None
    assert job.worker_id.split(":")[1] == str(slow.pid)
    slow.send_signal(signal.SIGKILL)
    slow.wait()
    t_killed = time.monotonic()
    start("worker", "rescuer")
    _wait_all_done(postgres_url, 1, timeout=60)
    with _db(postgres_url) as s:
        (job,) = s.scalars(select(JobRow)).all()
        results = s.scalars(select(ResultRow)).all()
    assert job.state == "done" and job.attempts == 2 and job.worker_id is not None
    assert job.worker_id.split(":")[1] != str(slow.pid)
    assert [r.study_uid for r in results] == [study]
    assert time.monotonic() - t_killed < 30
