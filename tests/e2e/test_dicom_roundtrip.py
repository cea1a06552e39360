"""Modality → pacs-triage → PACS with the real peers: DCMTK sends, Orthanc receives our SR and preview.

The service runs in-process (its DICOM listener on a loopback port, the shipped demonstration models);
DCMTK ``storescu``/``echoscu`` are the modality; Orthanc is the PACS we deliver to; every object we wrote
is checked with ``dciodvfy``. Synthetic studies come from training's generator, so the expected findings
are known: a chest radiograph with a pneumothorax, a head CT series (upsampled to 120 slices) with a
hemorrhage.
"""

from __future__ import annotations

import asyncio
import csv
import os
import subprocess
import time
from collections.abc import Callable
from datetime import datetime, timedelta
from io import BytesIO
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from service.config import Settings
from tests.peers import free_port
from tests.peers.orthanc import Orthanc
from tests.service.conftest import running_app
from tests.service.results.dciodvfy import run_dciodvfy
from training.data.synthetic import generate_ct, generate_cxr

pytestmark = [pytest.mark.e2e, pytest.mark.anyio]

MODELS = Path(__file__).resolve().parents[2] / "models"
SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.34"  # Comprehensive 3D SR
SC_CLASS = "1.2.840.10008.5.1.4.1.1.7"  # Secondary Capture
PNEUMOTHORAX = "36118008"
HEMORRHAGE = "1386000"


def _need(binary: str) -> None:
    if not Path(binary).exists():
        pytest.fail(f"{binary} is missing: scripts/test installs DCMTK, Orthanc and dicom3tools")


@pytest.fixture(scope="module")
def studies(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One positive chest radiograph and one positive head CT upsampled to 120 slices: an obvious case of each
    (a large pneumothorax, the largest hemorrhage), which the demonstration models are known to call; a thin
    rim may be missed, as the cards say."""
    root = tmp_path_factory.mktemp("synthetic")
    cxr_labels = generate_cxr(root / "cxr", n_patients=30, seed=11)
    with cxr_labels.open() as fh:
        cxr = next(r for r in csv.DictReader(fh) if r["info_ptx_size"] in ("large", "tension"))
    ct_labels = generate_ct(root / "ct", n_patients=8, seed=5)
    with ct_labels.open() as fh:
        rows = list(csv.DictReader(fh))
    bleeds = [r for r in rows if r["hemorrhage"] == "1"]
    positive = max(bleeds, key=lambda r: float(r["info_hemorrhage_size_mm"] or 0))["series_uid"]
    slices = [root / "ct" / r["file"] for r in rows if r["series_uid"] == positive]
    return {"cxr": root / "cxr" / cxr["file"], "ct": _upsample(slices, 120, root / "ct120")}


def _upsample(files: list[Path], n: int, out: Path) -> Path:
    """A thin-slice series from a thick one: slice k copies the nearest source slice, new UIDs and z.

    ImagesInAcquisition is set, as a CT scanner does, so the series is complete when full.
    """
    out.mkdir()
    source = sorted((dcmread(f) for f in files), key=lambda d: float(d.ImagePositionPatient[2]))
    z0, z1 = float(source[0].ImagePositionPatient[2]), float(source[-1].ImagePositionPatient[2])
    series_uid = generate_uid()
    for k in range(n):
        ds = source[min(len(source) - 1, round(k * (len(source) - 1) / (n - 1)))].copy()
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.SeriesInstanceUID = series_uid
        ds.InstanceNumber = k + 1
        ds.ImagePositionPatient = [*ds.ImagePositionPatient[:2], z0 + (z1 - z0) * k / (n - 1)]
        ds.SliceThickness = abs(z1 - z0) / (n - 1)
        ds.ImagesInAcquisition = n
        ds.save_as(out / f"IM{k + 1:04d}.dcm", enforce_file_format=True)
    return out


def _env() -> dict[str, str]:
    return {**os.environ, "TCP_NODELAY": "1"}


def _storescu(port: int, paths: list[Path], calling: str = "MODALITY") -> subprocess.CompletedProcess[str]:
    _need("/usr/bin/storescu")
    cmd = ["storescu", "-aet", calling, "-aec", "PACS_TRIAGE", "127.0.0.1", str(port), *map(str, paths)]
    return subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=120, check=False)


def _echoscu(port: int, calling: str) -> subprocess.CompletedProcess[str]:
    _need("/usr/bin/echoscu")
    cmd = ["echoscu", "-v", "-aet", calling, "-aec", "PACS_TRIAGE", "127.0.0.1", str(port)]
    return subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=30, check=False)


@pytest.fixture
def triage_settings(tmp_path: Path) -> Callable[..., Settings]:
    def build(destinations: list[str], **groups: dict[str, Any]) -> Settings:
        base: dict[str, Any] = {
            "models_dir": MODELS,
            "data_dir": tmp_path / "var",
            "inference": {"providers": "cpu"},
            "assembly": {"quiet_seconds": 1.0},
            "worker": {"poll_seconds": 0.05},
            "dicom": {"host": "127.0.0.1", "port": 0},
            "auth": {"open": True},
            "delivery": {"destinations": destinations, "backoff_seconds": 0.2, "backoff_max_seconds": 1.0},
        }
        for key, value in groups.items():
            base[key] = {**base.get(key, {}), **value}
        return Settings(**base)

    return build


async def _result(client: httpx.AsyncClient, study_uid: str, timeout: float = 90) -> dict[str, Any]:
    """The study's measured result: a positive head CT's findings come first with their measurements
    pending (``measurements_pending``), then the result with the segmentation supersedes them."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        r = await client.get(f"/v1/studies/{study_uid}/result")
        if r.status_code == 200 and not r.json()["measurements_pending"]:
            return r.json()
        await asyncio.sleep(0.1)
    raise AssertionError(f"no result for the study within {timeout} s")


async def _sr_in(pacs: Orthanc, study_uid: str, timeout: float = 60) -> list[Dataset]:
    """Our objects (Manufacturer pacs-triage) of the study in Orthanc, once the SR and preview are there."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ours: list[Dataset] = []
        for iid in await asyncio.to_thread(pacs.find, "Instance", {"StudyInstanceUID": study_uid}):
            ds = dcmread(BytesIO(await asyncio.to_thread(pacs.instance_file, iid)))
            if ds.get("Manufacturer") == "pacs-triage":
                ours.append(ds)
        if {SR_CLASS, SC_CLASS} <= {str(d.SOPClassUID) for d in ours}:  # and a SEG where a bleed was measured
            return ours
        await asyncio.sleep(0.2)
    raise AssertionError("our SR never reached Orthanc")


def _codes_and_values(ds: Dataset) -> tuple[set[str], list[float]]:
    """Every concept code value and numeric value in an SR content tree."""
    codes: set[str] = set()
    values: list[float] = []

    def walk(items: Any) -> None:
        for item in items:
            for key in ("ConceptCodeSequence", "ConceptNameCodeSequence"):
                for code in item.get(key, []):
                    codes.add(str(code.CodeValue))
            for mv in item.get("MeasuredValueSequence", []):
                values.append(float(mv.NumericValue))
            walk(item.get("ContentSequence", []))

    walk(ds.ContentSequence)
    return codes, values


def _all_valid(outputs: Path) -> int:
    """dciodvfy on every object we wrote; returns how many were checked."""
    files = sorted(outputs.rglob("*.dcm"))
    for path in files:
        errors, report = run_dciodvfy(path)
        assert errors == 0, f"{path.name}:\n{report}"
    return len(files)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def test_cr_and_ct_from_dcmtk_reach_orthanc_as_valid_sr(
    studies: dict[str, Path],
    orthanc_factory: Callable[..., Orthanc],
    triage_settings: Callable[..., Settings],
) -> None:
    pacs = orthanc_factory()
    settings = triage_settings([pacs.peer_text])
    async with running_app(settings) as (app, client):
        port = app.state.triage.listener.port
        echo = await asyncio.to_thread(_echoscu, port, "MODALITY")
        assert echo.returncode == 0, echo.stderr + echo.stdout

        cxr = dcmread(studies["cxr"], stop_before_pixels=True)
        sent = await asyncio.to_thread(_storescu, port, [studies["cxr"]])
        assert sent.returncode == 0, sent.stderr
        ct_files = sorted(studies["ct"].glob("*.dcm"))
        sent = await asyncio.to_thread(_storescu, port, ct_files)
        assert sent.returncode == 0, sent.stderr

        result = await _result(client, cxr.StudyInstanceUID)
        ptx = next(f for f in result["findings"] if f["model"] == "cxr-pneumothorax")
        assert ptx["positive"] and result["priority"] in ("stat", "urgent")

        ct = dcmread(ct_files[0], stop_before_pixels=True)
        ct_result = await _result(client, ct.StudyInstanceUID)
        # complete when full (its declared count), at its last slice: not after the 1 s quiet timer
        assert ct_result["assembly"] == {
            "complete": True,
            "instances_analysed": 120,
            "instances_declared": 120,
        }
        stamps = ct_result["timestamps"]
        complete_after = datetime.fromisoformat(stamps["study_complete"]) - datetime.fromisoformat(
            stamps["last_instance_received"]
        )
        assert complete_after < timedelta(seconds=settings.assembly.quiet_seconds)
        bleed = next(f for f in ct_result["findings"] if f["model"] == "ct-hemorrhage")
        assert bleed["positive"]
        assert ct_result["timestamps"]["study_complete"] <= ct_result["timestamps"]["inference_started"]

        for study, code, finding in ((cxr, PNEUMOTHORAX, ptx), (ct, HEMORRHAGE, bleed)):
            ours = await _sr_in(pacs, study.StudyInstanceUID)
            (sr,) = [d for d in ours if d.Modality == "SR"]
            codes, values = _codes_and_values(sr)
            assert code in codes
            assert any(abs(v - finding["probability"]) < 1e-3 for v in values)
            assert sr.StudyInstanceUID == study.StudyInstanceUID
            assert sr.PatientID == study.PatientID
            assert str(sr.SeriesInstanceUID) not in {study.SeriesInstanceUID}
            (preview,) = [d for d in ours if d.SOPClassUID == SC_CLASS]
            assert preview.BurnedInAnnotation == "YES" and preview.StudyInstanceUID == study.StudyInstanceUID
        # Orthanc holds the objects once it answered the C-STORE; our outbox records "done" just after, so
        # wait for that record rather than read it in the gap between the two.
        deadline = time.monotonic() + 30
        deliveries = (await client.get("/v1/deliveries")).json()["deliveries"]
        while any(d["state"] == "sending" for d in deliveries) and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
            deliveries = (await client.get("/v1/deliveries")).json()["deliveries"]
        segs = sum(bool(s["frames"]) for s in bleed.get("segments", []))  # ct-hemorrhage-seg's DICOM SEG
        assert len(deliveries) == 4 + segs and {d["state"] for d in deliveries} == {"done"}, deliveries
        assert all(d["attempts"] == 1 for d in deliveries)
    assert _all_valid(settings.outputs_dir) == 4 + segs


async def test_unknown_calling_ae_is_rejected(triage_settings: Callable[..., Settings]) -> None:
    settings = triage_settings([], dicom={"allowed_calling_aets": ["CT01"]})
    async with running_app(settings) as (app, _client):
        port = app.state.triage.listener.port
        refused = await asyncio.to_thread(_echoscu, port, "INTRUDER")
        assert refused.returncode != 0
        assert "Rejected" in refused.stdout + refused.stderr
        assert (await asyncio.to_thread(_echoscu, port, "CT01")).returncode == 0


async def test_pacs_down_at_first_gets_the_result_when_it_comes_up(
    studies: dict[str, Path],
    orthanc_factory: Callable[..., Orthanc],
    triage_settings: Callable[..., Settings],
) -> None:
    dicom_port = free_port()
    settings = triage_settings([f"ORTHANC@127.0.0.1:{dicom_port}"], delivery={"max_attempts": 100})
    async with running_app(settings) as (app, client):
        port = app.state.triage.listener.port
        cxr = dcmread(studies["cxr"], stop_before_pixels=True)
        assert (await asyncio.to_thread(_storescu, port, [studies["cxr"]])).returncode == 0
        await _result(client, cxr.StudyInstanceUID)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            pending = (await client.get("/v1/deliveries", params={"state": "pending"})).json()["deliveries"]
            if pending and all(d["attempts"] >= 2 for d in pending):
                break
            await asyncio.sleep(0.1)
        assert pending and all(d["last_error"] for d in pending), pending
        pacs = await asyncio.to_thread(orthanc_factory, dicom_port=dicom_port)
        await _sr_in(pacs, cxr.StudyInstanceUID)  # waits for the SR and the preview
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            done = (await client.get("/v1/deliveries", params={"state": "done"})).json()["deliveries"]
            if len(done) == 2:
                break
            await asyncio.sleep(0.1)
        assert len(done) == 2
    assert len(await asyncio.to_thread(pacs.instances)) == 2  # each object once
