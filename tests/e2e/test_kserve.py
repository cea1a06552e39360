"""Remote inference against a real KServe v2 server: MLServer serving the shipped chest models.

The same synthetic chest radiographs go through the service twice, once with every model local and once
with ``inference.remote_models`` sending cxr-pneumothorax and cxr-nodule to MLServer (JSON tensors; it
runs the same ONNX files on ONNX Runtime's CPU provider). The findings must be the same: positive and
negative alike, probabilities to 1e-5, the same boxes. ``/v1/models`` and each result must say where the
models ran. Two more tests hold the client to the real server's behaviour: a model whose metadata does not
fit its card is refused at start-up with the reason, and a server that went away is an
:class:`InferenceError` after the retries, not a hang.
"""

from __future__ import annotations

import asyncio
import csv
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from pydicom import dcmread

from service.config import Settings
from service.errors import InferenceError
from service.inference.kserve.client import KServeV2Backend
from service.inference.registry import ModelRegistry
from tests.peers.mlserver import MLServerFactory
from tests.service.conftest import running_app
from training.data.synthetic import generate_cxr

pytestmark = [pytest.mark.e2e, pytest.mark.anyio]

MODELS = Path(__file__).resolve().parents[2] / "models"
CXR = "cxr-pneumothorax"
NODULE = "cxr-nodule"
REMOTE = (CXR, NODULE)
DICOM = {"Content-Type": "application/dicom"}


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def mlservers(tmp_path: Path) -> Iterator[MLServerFactory]:
    """``mlservers({name: onnx_path})`` -> a running MLServer, stopped and reaped at teardown."""
    factory = MLServerFactory(tmp_path / "mlserver")
    try:
        yield factory
    finally:
        factory.stop_all()


@pytest.fixture(scope="module")
def chest_studies(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """A radiograph with a pneumothorax, one with a nodule and one with neither (the same seed as the
    DICOM round trip, so the demonstration models are known to call them)."""
    root = tmp_path_factory.mktemp("kserve-cxr")
    labels = generate_cxr(root / "cxr", n_patients=30, seed=11)
    with labels.open() as fh:
        rows = list(csv.DictReader(fh))
    picks = [  # obvious cases: a large pneumothorax, the largest nodule, a film with neither
        next(r for r in rows if r["info_ptx_size"] in ("large", "tension")),
        max(
            (r for r in rows if r["nodule"] == "1" and r["pneumothorax"] == "0"),
            key=lambda r: max(float(v) for v in r["info_nodule_radii"].split()),
        ),
        next(r for r in rows if r["pneumothorax"] == "0" and r["nodule"] == "0"),
    ]
    return [root / "cxr" / r["file"] for r in picks]


def _settings(data_dir: Path, **inference: Any) -> Settings:
    return Settings(
        models_dir=MODELS,
        data_dir=data_dir,
        inference={"providers": "cpu", **inference},
        assembly={"quiet_seconds": 0.1},
        worker={"poll_seconds": 0.05},
        store={"sqlite_synchronous": "NORMAL"},
        auth={"open": True},
        dicom={"enabled": False},
    )


async def _analyse(client: httpx.AsyncClient, files: list[Path], timeout: float = 60) -> list[dict[str, Any]]:
    """POST each study, then wait for every result; results in the order of ``files``."""
    uids = []
    for path in files:
        r = await client.post("/v1/studies", content=path.read_bytes(), headers=DICOM)
        assert r.status_code in (200, 202), r.text
        uids.append(str(dcmread(path, stop_before_pixels=True).StudyInstanceUID))
    results = []
    deadline = time.monotonic() + timeout
    for uid in uids:
        while True:
            r = await client.get(f"/v1/studies/{uid}/result")
            if r.status_code == 200 and r.json()["status"] != "pending":
                results.append(r.json())
                break
            assert time.monotonic() < deadline, f"no result for a study within {timeout} s"
            await asyncio.sleep(0.05)
    return results


def _by_label(result: dict[str, Any]) -> dict[tuple[str, str], dict[str, Any]]:
    return {(f["model"], f["label"]): f for f in result["findings"]}


async def test_remote_findings_equal_local_findings(
    chest_studies: list[Path], mlservers: MLServerFactory, tmp_path: Path
) -> None:
    server = await asyncio.to_thread(mlservers, {n: MODELS / n / "model.onnx" for n in REMOTE})
    provider = f"KServeV2:{server.base_url}"

    async with running_app(_settings(tmp_path / "local")) as (_app, client):
        local = await _analyse(client, chest_studies)

    remote_settings = _settings(tmp_path / "remote", remote_models=dict.fromkeys(REMOTE, server.base_url))
    async with running_app(remote_settings) as (app, client):
        local_names = sorted(app.state.triage.engine.local.model_names)
        assert local_names == ["ct-hemorrhage", "ct-hemorrhage-seg"]  # the chest models not loaded here
        listing = (await client.get("/v1/models")).json()
        providers = {m["name"]: (m["status"], m["providers"]) for m in listing["models"]}
        assert providers == {
            CXR: ("loaded", [provider]),
            NODULE: ("loaded", [provider]),
            "ct-hemorrhage": ("loaded", ["CPUExecutionProvider"]),
            "ct-hemorrhage-seg": ("loaded", ["CPUExecutionProvider"]),
        }
        assert listing["errors"] == []
        remote = await _analyse(client, chest_studies)

    positives = set()
    for here, there in zip(local, remote, strict=True):
        assert here["status"] == there["status"] == "complete"
        assert here["priority"] == there["priority"]
        assert here["not_analysed"] == there["not_analysed"] == []
        assert {m["name"]: m["provider"] for m in there["models"]} == dict.fromkeys(REMOTE, provider)
        assert {m["name"]: m["provider"] for m in here["models"]} == dict.fromkeys(
            REMOTE, "CPUExecutionProvider"
        )
        mine, theirs = _by_label(here), _by_label(there)
        assert mine.keys() == theirs.keys() == {(CXR, "pneumothorax"), (NODULE, "nodule")}
        for key, a in mine.items():
            b = theirs[key]
            assert abs(a["probability"] - b["probability"]) <= 1e-5, key
            assert (a["positive"], a["urgent"], a["key_instance_uid"]) == (
                b["positive"],
                b["urgent"],
                b["key_instance_uid"],
            )
            assert len(a["detections"]) == len(b["detections"]), key
            for da, db in zip(a["detections"], b["detections"], strict=True):
                np.testing.assert_allclose(
                    [da[k] for k in ("x0", "y0", "x1", "y1", "score")],
                    [db[k] for k in ("x0", "y0", "x1", "y1", "score")],
                    atol=1e-4,
                )
                assert (da["sop_instance_uid"], da["frame"]) == (db["sop_instance_uid"], db["frame"])
            if a["positive"]:
                positives.add(key)
    # the comparison covered both answers and both models' positives, boxes included
    assert positives == {(CXR, "pneumothorax"), (NODULE, "nodule")}
    assert any(f["detections"] for r in local for f in r["findings"])
    assert any(not f["positive"] for r in local for f in r["findings"])


async def test_a_model_that_does_not_fit_its_card_is_refused_at_start(
    mlservers: MLServerFactory,
) -> None:
    # the nodule detector served under the pneumothorax classifier's name: a deployment mistake
    server = await asyncio.to_thread(mlservers, {CXR: MODELS / NODULE / "model.onnx"})
    registry = ModelRegistry.from_directory(MODELS)
    backend = KServeV2Backend(server.base_url, registry, [CXR], start_timeout=10)
    await backend.start()
    try:
        assert backend.ready and backend.model_names == []
        reason = registry.errors[CXR]
        assert "model metadata does not match the card" in reason, reason
        assert "input 'image' has shape [-1, 1, 256, 256] on the server, card [-1, 1, 128, 128]" in reason
        # the detector's outputs as the server lists them (the domain gate's 'embedding' among them)
        listed = "['embedding', 'heatmap', 'size']"
        assert f"output 'probability' missing on the server (it has {listed})" in reason
    finally:
        await backend.stop()


async def test_a_server_that_went_away_is_an_inference_error(mlservers: MLServerFactory) -> None:
    server = await asyncio.to_thread(mlservers, {CXR: MODELS / CXR / "model.onnx"})
    registry = ModelRegistry.from_directory(MODELS)
    backend = KServeV2Backend(server.base_url, registry, [CXR], retries=2, start_timeout=10)
    await backend.start()
    try:
        images = np.zeros((2, 1, 128, 128), dtype=np.float32)
        assert (await backend.run(CXR, images))["probability"].shape == (2, 1)
        await asyncio.to_thread(server.stop)
        t0 = time.monotonic()
        with pytest.raises(InferenceError, match=r"failed after 3 attempt\(s\): ConnectError") as info:
            await backend.run(CXR, images)
        assert server.base_url in info.value.detail
        assert time.monotonic() - t0 < 5
    finally:
        await backend.stop()
