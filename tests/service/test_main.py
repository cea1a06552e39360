"""``pacs-triage`` as users run it: a real uvicorn on 127.0.0.1, killed with SIGKILL mid-job and restarted.

The crash test is the durability promise end to end: an instance acknowledged with 202 and a job that was
running when the process died are both still there after a restart, the job runs again, and the study ends
with exactly one result. ``inference.debug_delay_ms`` (a documented test-only setting) holds the job in
the worker long enough to kill it there.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
import yaml
from pydicom.uid import generate_uid

from service.__main__ import main
from tests.service.conftest import wait_until_ready
from tests.service.dicom_factory import chest, multipart_related

pytestmark = pytest.mark.slow


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["version"]) == 0
    line = capsys.readouterr().out
    assert line.startswith("pacs-triage ")
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out == line


def test_config_show_masks_secrets(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    admin = "admin-token-" + "x" * 24
    for name in [k for k in os.environ if k.startswith("PACS_TRIAGE_")]:
        monkeypatch.delenv(name)
    secret = tmp_path / "webhook_secret"
    secret.write_text("hmac-secret-value\n")
    cfg = tmp_path / "triage.yaml"
    cfg.write_text("inference:\n  max_batch: 4\n")
    # ``--config`` sets PACS_TRIAGE_CONFIG for the process; set here so that it is undone after the test
    # (it leaked into every later test and server of the run, which read this test's YAML file)
    monkeypatch.setenv("PACS_TRIAGE_CONFIG", str(cfg))
    monkeypatch.setenv("PACS_TRIAGE_AUTH__ADMIN_TOKENS", json.dumps([admin]))
    monkeypatch.setenv("PACS_TRIAGE_NOTIFY__WEBHOOK_SECRET_FILE", str(secret))
    monkeypatch.setenv("PACS_TRIAGE_STORE__DATABASE_URL", "postgresql+psycopg://triage:fakepass99@db/triage")
    monkeypatch.setenv(
        "PACS_TRIAGE_NOTIFY__WEBHOOKS", '["https://hooks.example.org/services/T0/B0/hooksecret"]'
    )
    assert main(["config", "show", "--config", str(cfg)]) == 0
    out = capsys.readouterr().out
    for leaked in (admin, "hmac-secret-value", "fakepass99", "hooksecret"):
        assert leaked not in out, leaked
    shown = yaml.safe_load(out)
    assert shown["inference"]["max_batch"] == 4  # the YAML file counts
    assert shown["auth"]["admin_tokens"] == ["**********"]
    assert shown["notify"]["webhook_secret"] == "**********"
    assert shown["store"]["database_url"] == "postgresql+psycopg://triage:**********@db/triage"
    assert shown["notify"]["webhooks"] == ["https://hooks.example.org/**********"]
    assert shown["dicom"]["ae_title"] == "PACS_TRIAGE"


def test_config_show_invalid_settings(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("PACS_TRIAGE_API__PORT", "70000")
    assert main(["config", "show"]) == 1
    assert "api.port" in capsys.readouterr().err


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def serve(tmp_path: Path, models_dir: Path, log: str, **env: str) -> Iterator[tuple[subprocess.Popen, str]]:
    port = _free_port()
    environ = {
        **os.environ,
        "PACS_TRIAGE_MODELS_DIR": str(models_dir),
        "PACS_TRIAGE_DATA_DIR": str(tmp_path / "var"),
        "PACS_TRIAGE_INFERENCE__PROVIDERS": "cpu",
        "PACS_TRIAGE_WORKER__POLL_SECONDS": "0.05",
        "PACS_TRIAGE_DICOM__PORT": "0",
        "PACS_TRIAGE_AUTH__OPEN": "true",
        **env,
    }
    with open(tmp_path / log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "service", "serve", "--host", "127.0.0.1", "--port", str(port)],
            env=environ,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until_ready(base, lambda: None if proc.poll() is None else (tmp_path / log).read_text())
        yield proc, base
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _db(tmp_path: Path) -> sqlite3.Connection:
    return sqlite3.connect(tmp_path / "var" / "pacs-triage.db")


def test_sigkill_mid_job_then_restart(tmp_path: Path, tiny_models_dir: Path) -> None:
    study = generate_uid()
    with serve(tmp_path, tiny_models_dir, "first.log", PACS_TRIAGE_INFERENCE__DEBUG_DELAY_MS="60000") as (
        proc,
        base,
    ):
        r = httpx.post(
            f"{base}/v1/studies",
            content=chest(study_uid=study),
            headers={"Content-Type": "application/dicom"},
        )
        assert r.status_code == 202, r.text
        deadline = time.monotonic() + 10
        while True:  # wait until the worker holds the job
            with _db(tmp_path) as db:
                state = db.execute("SELECT state FROM jobs WHERE study_uid = ?", (study,)).fetchone()
            if state and state[0] == "running":
                break
            assert time.monotonic() < deadline, state
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)

    with serve(tmp_path, tiny_models_dir, "second.log") as (_proc, base):
        deadline = time.monotonic() + 20
        while (r := httpx.get(f"{base}/v1/studies/{study}/result")).status_code != 200:
            assert r.status_code == 202, r.text
            assert time.monotonic() < deadline
            time.sleep(0.1)
        assert r.json()["status"] == "complete"
        # The same server, over real HTTP: a STOW-RS multipart POST answered with the result.
        body, ctype = multipart_related([chest()])
        r2 = httpx.post(
            f"{base}/v1/studies",
            content=body,
            headers={"Content-Type": ctype, "Prefer": "wait=10"},
            timeout=15,
        )
        assert r2.status_code == 200, r2.text
        assert "pacs_triage_inference_batch_size_bucket" in httpx.get(f"{base}/metrics").text
    with _db(tmp_path) as db:
        (n_results,) = db.execute("SELECT COUNT(*) FROM results WHERE study_uid = ?", (study,)).fetchone()
        attempts, state = db.execute(
            "SELECT attempts, state FROM jobs WHERE study_uid = ?", (study,)
        ).fetchone()
    assert n_results == 1
    assert (attempts, state) == (2, "done")
    assert "reset to pending" in (tmp_path / "second.log").read_text()
