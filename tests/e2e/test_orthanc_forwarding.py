"""The docker-compose pair without Docker: Orthanc from ``docker/orthanc.json`` and ``orthanc-forward.lua``.

A modality (DCMTK ``storescu``) sends a chest radiograph to Orthanc; the shipped Lua forwards it to
pacs-triage (in-process, shipped demonstration models); our SR and preview come back into the same study
in Orthanc; the Lua does not forward them again, so the study is analysed once.

Orthanc runs from the shipped configuration with only what must differ on a test machine rewritten:

- ``DicomPort`` / ``HttpPort``: free ports instead of 4242 / 8042;
- ``StorageDirectory`` / ``IndexDirectory``: the harness's temporary folders instead of the volume;
- the ``triage`` modality: 127.0.0.1 and our listener's port instead of ``pacs-triage:11112`` (AET kept);
- ``LuaScripts``: the repository's ``docker/orthanc-forward.lua`` instead of its path in the container;
- ``RemoteAccessAllowed``: false. In compose it must be true, because the host's requests reach the
  container through Docker's port publishing, not from loopback; on a test machine Orthanc stays local.

Everything else is as shipped, authentication included: the admin user and password reach Orthanc through
the ``${ORTHANC_ADMIN_USER}`` / ``${ORTHANC_ADMIN_PASSWORD}`` substitution in the JSON, as in compose.
"""

from __future__ import annotations

import asyncio
import csv
import json
import os
import secrets
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from io import BytesIO
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset

from service.config import Settings
from tests.peers import free_port
from tests.peers.orthanc import Orthanc
from tests.service.conftest import running_app
from training.data.synthetic import generate_cxr

pytestmark = [pytest.mark.e2e, pytest.mark.anyio]

ROOT = Path(__file__).resolve().parents[2]
SHIPPED_CONFIG = ROOT / "docker" / "orthanc.json"
SHIPPED_LUA = ROOT / "docker" / "orthanc-forward.lua"
MODELS = ROOT / "models"
SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.34"  # Comprehensive 3D SR
SC_CLASS = "1.2.840.10008.5.1.4.1.1.7"  # Secondary Capture
PNEUMOTHORAX = "36118008"
USER_ENV, PASSWORD_ENV = "ORTHANC_ADMIN_USER", "ORTHANC_ADMIN_PASSWORD"
QUIET_AFTER_DELIVERY_S = 3.0
"""How long the study must stay unchanged after our objects reached Orthanc: a forwarded SR would reach
us within milliseconds, and a re-run would be due after the 1 s assembly quiet time."""


class _AuthenticatedOrthanc(Orthanc):
    """The harness's Orthanc, its REST client logging in with the user the shipped config registers."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.client.auth = httpx.BasicAuth(os.environ[USER_ENV], os.environ[PASSWORD_ENV])


def _local_config(
    shipped: dict[str, Any], *, dicom_port: int, http_port: int, triage_port: int
) -> dict[str, Any]:
    """The shipped config with only the machine-specific keys rewritten (see the module docstring)."""
    config = dict(shipped)
    config["DicomPort"], config["HttpPort"] = dicom_port, http_port
    del config["StorageDirectory"], config["IndexDirectory"]  # the harness's temporary folders
    (triage_aet, _host, _port) = shipped["DicomModalities"]["triage"]
    triage = [triage_aet, "127.0.0.1", triage_port]
    config["DicomModalities"] = {**shipped["DicomModalities"], "triage": triage}
    config["LuaScripts"] = [str(SHIPPED_LUA)]
    config["RemoteAccessAllowed"] = False
    return config


@pytest.fixture
def orthanc_credentials(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[str, str]]:
    """The environment compose gives the Orthanc container; the Orthanc process inherits it."""
    user, password = "triage-admin", secrets.token_urlsafe(16)
    monkeypatch.setenv(USER_ENV, user)
    monkeypatch.setenv(PASSWORD_ENV, password)
    yield user, password


@pytest.fixture(scope="module")
def chest_with_pneumothorax(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("synthetic")
    labels = generate_cxr(root / "cxr", n_patients=30, seed=11)
    with labels.open() as fh:  # an obvious one (a thin rim may be missed, as the card says)
        row = next(r for r in csv.DictReader(fh) if r["info_ptx_size"] in ("large", "tension"))
    return root / "cxr" / row["file"]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def _storescu(port: int, called_aet: str, path: Path) -> subprocess.CompletedProcess[str]:
    """A modality sending to the PACS (TCP_NODELAY: see shared/PEERS.md)."""
    if not Path("/usr/bin/storescu").exists():
        pytest.fail("/usr/bin/storescu is missing: scripts/test installs DCMTK")
    cmd = ["storescu", "-aet", "MODALITY", "-aec", called_aet, "127.0.0.1", str(port), str(path)]
    env = {**os.environ, "TCP_NODELAY": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=60, check=False)


async def _result(client: httpx.AsyncClient, study_uid: str, timeout: float = 90) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        r = await client.get(f"/v1/studies/{study_uid}/result")
        if r.status_code == 200:
            return dict(r.json())
        await asyncio.sleep(0.1)
    raise AssertionError(f"no result for the study within {timeout} s (did the Lua forward it?)")


async def _study_in_orthanc(pacs: Orthanc, study_uid: str) -> list[Dataset]:
    ids = await asyncio.to_thread(pacs.find, "Instance", {"StudyInstanceUID": study_uid})
    return [dcmread(BytesIO(await asyncio.to_thread(pacs.instance_file, iid))) for iid in ids]


async def _ours_in_orthanc(pacs: Orthanc, study_uid: str, timeout: float = 60) -> list[Dataset]:
    """Our objects (Manufacturer pacs-triage) in the study, once both the SR and the preview are there."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ours = [d for d in await _study_in_orthanc(pacs, study_uid) if d.get("Manufacturer") == "pacs-triage"]
        if sorted(d.SOPClassUID for d in ours) == sorted((SR_CLASS, SC_CLASS)):
            return ours
        await asyncio.sleep(0.2)
    raise AssertionError(f"our SR and preview never reached Orthanc:\n{pacs.log_path.read_text()[-3000:]}")


def _codes(items: Any) -> set[str]:
    """Every concept code value in an SR content tree."""
    found: set[str] = set()
    for item in items:
        for key in ("ConceptCodeSequence", "ConceptNameCodeSequence"):
            found.update(str(code.CodeValue) for code in item.get(key, []))
        found |= _codes(item.get("ContentSequence", []))
    return found


@pytest.fixture
async def triage(tmp_path: Path) -> AsyncIterator[tuple[Any, httpx.AsyncClient, int, Settings]]:
    """pacs-triage started first: Orthanc's "triage" modality needs our listener's port.

    Its destination is Orthanc's DICOM port, chosen now and given to Orthanc when it starts.
    """
    orthanc_dicom_port = free_port()
    shipped = json.loads(SHIPPED_CONFIG.read_text())
    settings = Settings(
        models_dir=MODELS,
        data_dir=tmp_path / "var",
        inference={"providers": "cpu"},
        assembly={"quiet_seconds": 1.0},
        worker={"poll_seconds": 0.05},
        # As in docker-compose.yml: only Orthanc may send to us.
        dicom={"host": "127.0.0.1", "port": 0, "allowed_calling_aets": [shipped["DicomAet"]]},
        auth={"open": True},
        delivery={
            "destinations": [f"{shipped['DicomAet']}@127.0.0.1:{orthanc_dicom_port}"],
            "backoff_seconds": 0.2,
            "backoff_max_seconds": 1.0,
        },
    )
    async with running_app(settings) as (app, client):
        yield app, client, orthanc_dicom_port, settings


async def test_orthanc_forwards_a_study_and_gets_one_result_back(
    tmp_path: Path,
    chest_with_pneumothorax: Path,
    orthanc_credentials: tuple[str, str],
    triage: tuple[Any, httpx.AsyncClient, int, Settings],
) -> None:
    app, client, orthanc_dicom_port, settings = triage
    shipped = json.loads(SHIPPED_CONFIG.read_text())
    http_port = free_port()
    config = _local_config(
        shipped,
        dicom_port=orthanc_dicom_port,
        http_port=http_port,
        triage_port=app.state.triage.listener.port,
    )
    pacs = await asyncio.to_thread(
        _AuthenticatedOrthanc.start,
        tmp_path / "orthanc",
        aet=shipped["DicomAet"],
        dicom_port=orthanc_dicom_port,
        http_port=http_port,
        extra_config=config,
    )
    try:
        # The shipped config turns authentication on, with the user from the environment.
        async with httpx.AsyncClient(base_url=pacs.http_url) as anonymous:
            assert (await anonymous.get("/system")).status_code == 401

        cxr = dcmread(chest_with_pneumothorax, stop_before_pixels=True)
        sent = await asyncio.to_thread(_storescu, pacs.dicom_port, pacs.aet, chest_with_pneumothorax)
        assert sent.returncode == 0, sent.stderr + sent.stdout

        result = await _result(client, cxr.StudyInstanceUID)
        ptx = next(f for f in result["findings"] if f["model"] == "cxr-pneumothorax")
        assert ptx["positive"]

        ours = await _ours_in_orthanc(pacs, cxr.StudyInstanceUID)
        (sr,) = [d for d in ours if d.SOPClassUID == SR_CLASS]
        assert PNEUMOTHORAX in _codes(sr.ContentSequence)
        assert {d.StudyInstanceUID for d in ours} == {cxr.StudyInstanceUID}

        await asyncio.sleep(QUIET_AFTER_DELIVERY_S)
        final = (await client.get(f"/v1/studies/{cxr.StudyInstanceUID}/result")).json()
        assert final["result_id"] == result["result_id"] and final["supersedes"] is None
        in_orthanc = await _study_in_orthanc(pacs, cxr.StudyInstanceUID)
        assert sorted(d.SOPClassUID for d in in_orthanc) == sorted(
            (str(cxr.SOPClassUID), SR_CLASS, SC_CLASS)
        ), "Orthanc should hold the image, our SR and our preview, once each"
        # The Lua did not send our objects back at all: we hold the radiograph only.
        received = sorted((settings.instances_dir / cxr.StudyInstanceUID).rglob("*.dcm"))
        assert [p.stem for p in received] == [cxr.SOPInstanceUID]
    finally:
        await asyncio.to_thread(pacs.stop, graceful=False)
