"""``pacs-triage check`` on a good installation and on broken ones: each failure named on its own line.

Real components throughout: tiny ONNX models started in ONNX Runtime, SQLite databases migrated by Alembic,
DCMTK's storescp as the DICOM destination, certificates from the suite's test PKI.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
from collections.abc import Callable
from pathlib import Path

import pytest
from sqlalchemy import create_engine

from service.__main__ import main
from service.store.migrate import upgrade
from tests.peers.dcmtk import StoreSCPFactory
from tests.peers.tls import Pki

Check = Callable[..., tuple[int, list[str]]]


@pytest.fixture
def check(
    tmp_path: Path, tiny_models_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> Check:
    """Run ``pacs-triage check`` with a good base environment plus ``env``; (exit code, output lines)."""
    for name in [k for k in os.environ if k.startswith("PACS_TRIAGE_")]:
        monkeypatch.delenv(name)
    base = {
        "PACS_TRIAGE_MODELS_DIR": str(tiny_models_dir),
        "PACS_TRIAGE_DATA_DIR": str(tmp_path / "var"),
        "PACS_TRIAGE_INFERENCE__PROVIDERS": "cpu",
    }

    def run(*args: str, **env: str) -> tuple[int, list[str]]:
        for name, value in {**base, **env}.items():
            monkeypatch.setenv(name, value)
        code = main(["check", "--timeout", "5", *args])  # a later --timeout wins
        return code, capsys.readouterr().out.splitlines()

    return run


def _failures(lines: list[str]) -> list[str]:
    return [line for line in lines if line.startswith("FAIL ")]


def test_good_installation_passes_every_check(check: Check, storescp_factory: StoreSCPFactory) -> None:
    scp = storescp_factory(aet="PACS")
    code, lines = check(PACS_TRIAGE_DELIVERY__DESTINATIONS=json.dumps([scp.peer_text]))
    assert code == 0, lines
    assert not _failures(lines)
    for needed in ("settings", "routing rules", "data directory", "disk space", "database", "destination"):
        assert any(line.startswith(f"ok   {needed}") for line in lines), (needed, lines)
    assert sum(line.startswith("ok   model ") for line in lines) == 3
    assert lines[-1].endswith(" ok, 0 failed")


def test_migrated_database_is_reported_at_its_revision(check: Check, tmp_path: Path) -> None:
    (tmp_path / "var").mkdir()
    engine = create_engine(f"sqlite:///{tmp_path / 'var' / 'pacs-triage.db'}")
    upgrade(engine)
    engine.dispose()
    code, lines = check()
    assert code == 0, lines
    assert any(line.startswith("ok   database:") and "reachable, schema at" in line for line in lines)


def test_invalid_settings_name_each_setting(check: Check) -> None:
    code, lines = check(PACS_TRIAGE_API__PORT="70000", PACS_TRIAGE_INFERENCE__PROVIDERS="tpu")
    assert code == 1
    failures = _failures(lines)
    assert any(f.startswith("FAIL settings: api.port:") for f in failures), failures
    assert any(f.startswith("FAIL settings: inference.providers:") for f in failures), failures
    assert lines[-1] == "0 ok, 2 failed"


def test_data_dir_not_writable(check: Check, tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    code, lines = check(PACS_TRIAGE_DATA_DIR=str(blocker / "var"))
    assert code == 1
    assert [f for f in _failures(lines) if f.startswith("FAIL data directory:")], lines


def test_disk_above_the_watermark(check: Check) -> None:
    code, lines = check(PACS_TRIAGE_RETENTION__DISK_HIGH_WATERMARK="0.0001")
    assert code == 1
    assert [f for f in _failures(lines) if f.startswith("FAIL disk space:")], lines


def test_database_unreachable(check: Check) -> None:
    code, lines = check(
        PACS_TRIAGE_STORE__DATABASE_URL="postgresql+psycopg://triage:fake-s3cret@127.0.0.1:1/triage"
    )
    assert code == 1
    (failure,) = [f for f in _failures(lines) if f.startswith("FAIL database:")]
    assert "unreachable" in failure and "fake-s3cret" not in "\n".join(lines)


def test_database_from_another_version(check: Check, tmp_path: Path) -> None:
    (tmp_path / "var").mkdir()
    db = tmp_path / "var" / "pacs-triage.db"
    engine = create_engine(f"sqlite:///{db}")
    upgrade(engine)
    engine.dispose()
    with sqlite3.connect(db) as conn:
        conn.execute("UPDATE alembic_version SET version_num = 'f0f0f0f0f0f0'")
    code, lines = check()
    assert code == 1
    (failure,) = [f for f in _failures(lines) if f.startswith("FAIL database:")]
    assert "schema at f0f0f0f0f0f0" in failure


def test_database_without_migrations(check: Check, tmp_path: Path) -> None:
    (tmp_path / "var").mkdir()
    with sqlite3.connect(tmp_path / "var" / "pacs-triage.db") as conn:
        conn.execute("CREATE TABLE studies (id INTEGER PRIMARY KEY)")
    code, lines = check()
    assert code == 1
    assert [f for f in _failures(lines) if "created without migrations" in f], lines


def test_models_that_do_not_load_are_named(check: Check, tiny_models_dir: Path, tmp_path: Path) -> None:
    models = tmp_path / "models"
    shutil.copytree(tiny_models_dir, models)
    broken = sorted(p for p in models.iterdir() if p.is_dir())[0]
    (broken / "model.onnx").write_bytes((broken / "model.onnx").read_bytes()[:-10] + b"0123456789")
    code, lines = check(PACS_TRIAGE_MODELS_DIR=str(models))
    assert code == 1
    (failure,) = _failures(lines)
    assert failure.startswith(f"FAIL model {broken.name}:") and "sha256 mismatch" in failure
    code, lines = check(PACS_TRIAGE_MODELS_DIR=str(tmp_path / "nowhere"))
    assert code == 1 and any(f.startswith("FAIL models:") for f in _failures(lines))


def test_tls_files_unreadable_or_not_pem(check: Check, tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n")
    code, lines = check(
        PACS_TRIAGE_DICOM__TLS_CERT_FILE=str(tmp_path / "missing.pem"),
        PACS_TRIAGE_DICOM__TLS_KEY_FILE=str(garbage),
        PACS_TRIAGE_DELIVERY__TLS_CA_FILE=str(garbage),
    )
    assert code == 1
    failures = _failures(lines)
    (listener,) = [f for f in failures if f.startswith("FAIL dicom TLS files:")]
    assert "missing.pem" in listener and "No such file" in listener
    (delivery,) = [f for f in failures if f.startswith("FAIL delivery TLS files:")]
    assert "not usable" in delivery


def test_tls_files_that_work(check: Check, tls_pki: Pki) -> None:
    code, lines = check(
        PACS_TRIAGE_DICOM__TLS_CERT_FILE=str(tls_pki.server.cert),
        PACS_TRIAGE_DICOM__TLS_KEY_FILE=str(tls_pki.server.key),
        PACS_TRIAGE_DICOM__TLS_CA_FILE=str(tls_pki.ca),
        PACS_TRIAGE_DELIVERY__TLS_CERT_FILE=str(tls_pki.client.cert),
        PACS_TRIAGE_DELIVERY__TLS_KEY_FILE=str(tls_pki.client.key),
    )
    assert code == 0, lines
    assert any(line.startswith("ok   dicom TLS files:") for line in lines)
    assert any(line.startswith("ok   delivery TLS files:") for line in lines)


def test_destination_that_does_not_answer(check: Check) -> None:
    code, lines = check(PACS_TRIAGE_DELIVERY__DESTINATIONS='["PACS@127.0.0.1:1", "not-a-peer"]')
    assert code == 1
    failures = _failures(lines)
    assert any(f.startswith("FAIL destination PACS@127.0.0.1:1: C-ECHO failed:") for f in failures), failures
    assert any(f.startswith("FAIL destination not-a-peer:") for f in failures), failures


def test_remote_model_server_that_does_not_answer(check: Check) -> None:
    """A model served by KServe v2 is checked where the service would run it: its server, within --timeout."""
    code, lines = check(
        "--timeout", "1", PACS_TRIAGE_INFERENCE__REMOTE_MODELS='{"cxr-nodule": "http://127.0.0.1:1"}'
    )
    assert code == 1
    (failure,) = _failures(lines)
    assert failure.startswith("FAIL model cxr-nodule: KServe v2 server http://127.0.0.1:1 not ready"), failure
    assert sum(line.startswith("ok   model ") for line in lines) == 2  # the local ones still start
