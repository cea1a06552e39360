"""Drift alarms in the running service: the worker feeds the monitor from each analysed study; the gauge on
/metrics and ``drift`` in ``GET /v1/models/{name}/stats`` stay put for in-distribution studies and move for
shifted ones; the log names the model and features, never the patient."""

from __future__ import annotations

import logging
import re
from collections.abc import Callable

import httpx
import numpy as np
import pytest
from pydicom.uid import generate_uid

from service.config import Settings
from service.inference.domain import summarise_series
from tests.service.conftest import running_app
from tests.service.dicom_factory import SENTINEL_NAME, to_bytes
from tests.service.dicom_factory import make_dataset as dataset

pytestmark = pytest.mark.anyio

DICOM = {"Content-Type": "application/dicom", "Prefer": "wait=10"}
PTX = "cxr-pneumothorax"
SIZE = 10


def radiograph(bright: bool, manufacturer: str) -> bytes:
    """Mostly bright (the tiny classifier says positive) or mostly dark (negative), as in test_lifecycle."""
    pixels = np.full((64, 64), 4000 if bright else 0, dtype=np.uint16)
    pixels[:8, :8] = 0 if bright else 4000
    ds = dataset(study_uid=generate_uid(), pixels=pixels)
    ds.Manufacturer = manufacturer
    ds.PixelSpacing = [0.2, 0.2]
    return to_bytes(ds)


async def send(client: httpx.AsyncClient, n: int, *, bright: bool, manufacturer: str) -> None:
    for _ in range(n):
        r = await client.post("/v1/studies", content=radiograph(bright, manufacturer), headers=DICOM)
        assert r.status_code == 200, r.text


async def gauge(client: httpx.AsyncClient, name: str, **labels: str) -> float | None:
    text = (await client.get("/metrics")).text
    wanted = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    match = re.search(rf"^{name}{{{re.escape(wanted)}}} (\S+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else None


async def test_the_gauge_moves_for_shifted_studies_only(
    make_settings: Callable[..., Settings], caplog: pytest.LogCaptureFixture
) -> None:
    settings = make_settings(drift={"reference_series": SIZE, "window_series": SIZE, "check_every": 1})
    async with running_app(settings) as (_app, client):
        await send(client, SIZE, bright=True, manufacturer="ACME")
        drift = (await client.get(f"/v1/models/{PTX}/stats")).json()["drift"]
        assert drift["reference"]["series"] == SIZE and drift["window"]["series"] == 0
        assert "the card stores no drift reference" in drift["reference"]["source"]
        assert drift["psi"] is None and drift["alarms"] == []
        assert await gauge(client, "pacs_triage_model_drift_psi", model=PTX) is None

        await send(client, SIZE, bright=True, manufacturer="ACME")  # in distribution
        assert await gauge(client, "pacs_triage_model_drift_psi", model=PTX) == 0.0
        assert await gauge(client, "pacs_triage_model_drift_alarm", kind="drift", model=PTX) == 0.0

        with caplog.at_level(logging.INFO):
            await send(client, SIZE, bright=False, manufacturer="OTHER")  # another site's images
        assert (await gauge(client, "pacs_triage_model_drift_psi", model=PTX) or 0) > 0.25
        assert await gauge(client, "pacs_triage_model_drift_alarm", kind="drift", model=PTX) == 1.0
        drift = (await client.get(f"/v1/models/{PTX}/stats")).json()["drift"]
        assert drift["psi"]["manufacturer"] > 0.25 and drift["psi"]["mean_intensity"] > 0.25
        assert drift["psi"]["score:pneumothorax"] > 0.25
        assert drift["psi"]["pixel_spacing"] == 0.0 and drift["psi"]["image_size"] == 0.0
        assert drift["alarms"][0].startswith("input or score drift: ")
    assert f"drift alarm: model {PTX}" in caplog.text
    assert SENTINEL_NAME not in caplog.text


def test_the_summary_reads_the_header_and_undoes_the_normalisation() -> None:
    ds = dataset(rows=32, columns=48)
    ds.Manufacturer = "ACME"
    ds.ImagerPixelSpacing = [0.15, 0.15]
    ds.WindowCenter, ds.WindowWidth = [40, 400], [80, 2000]
    model_input = np.full((2, 1, 8, 8), 2.0, dtype=np.float32)
    summary = summarise_series("m", "1", ds, model_input, 0.5, 0.25, {"x": 0.9})
    assert dict(summary.values) == {
        "manufacturer": "ACME",
        "pixel_spacing": 0.15,
        "window_center": 40.0,
        "window_width": 80.0,
        "image_size": "32x48",
        "mean_intensity": 1.0,
    }
    assert summary.scores == {"x": 0.9}
    bare = dataset()
    del bare.Rows
    values = summarise_series("m", "1", bare, model_input[:0], 0.0, 1.0, {}).values
    assert values["image_size"] is None and values["manufacturer"] is None
    assert values["mean_intensity"] is None
