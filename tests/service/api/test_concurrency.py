"""32 simultaneous POSTs: every one gets its own correct result, and the engine formed real batches."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from pydicom.uid import generate_uid

from tests.fixtures.tiny_models import expected_probability
from tests.service.conftest import running_app
from tests.service.dicom_factory import make_dataset, to_bytes

pytestmark = pytest.mark.anyio


async def test_32_concurrent_posts(make_settings) -> None:
    settings = make_settings(worker={"concurrency": 16}, inference={"max_wait_ms": 20.0, "max_batch": 16})
    # Each study has its own brightness, so a result mixed up between studies would show.
    levels = np.linspace(0.05, 0.95, 32)
    studies = [generate_uid() for _ in levels]
    bodies = []
    for study, level in zip(studies, levels, strict=True):
        pixels = np.full((64, 64), 0, dtype=np.uint16)
        pixels[0, 0] = 1000  # the dicom/percentile window spans 0..1000 so the image maps to `level`
        pixels[1:, :] = int(level * 1000)
        ds = make_dataset(study_uid=study, pixels=pixels)
        ds.WindowCenter, ds.WindowWidth = 500.5, 1001  # PS3.3 C.11.2.1.2.1: maps 0..1000 onto [0, 1]
        bodies.append(to_bytes(ds))
    async with running_app(settings) as (app, client):
        responses = await asyncio.gather(
            *(
                client.post(
                    "/v1/studies",
                    content=b,
                    headers={"Content-Type": "application/dicom", "Prefer": "wait=30"},
                )
                for b in bodies
            )
        )
        metrics = app.state.triage.metrics
    for study, level, r in zip(studies, levels, responses, strict=True):
        assert r.status_code == 200, r.text
        result = r.json()
        assert result["study_uid"] == study
        pneumo = next(f for f in result["findings"] if f["model"] == "cxr-pneumothorax")
        want = float(expected_probability(np.full((1, 1, 64, 64), level, dtype=np.float32)).ravel()[0])
        assert pneumo["probability"] == pytest.approx(want, abs=0.02)
    reg = metrics.registry
    for model in ("cxr-pneumothorax", "cxr-nodule"):
        runs = reg.get_sample_value("pacs_triage_inference_batch_size_count", {"model": model})
        singles = reg.get_sample_value(
            "pacs_triage_inference_batch_size_bucket", {"model": model, "le": "1.0"}
        )
        images = reg.get_sample_value("pacs_triage_inference_batch_size_sum", {"model": model})
        assert images >= 32  # warm-up run included
        assert runs > singles, f"{model}: no batch larger than 1 in {runs} runs"
