"""Reader feedback per finding (audited; it moves the PPV in the per-version stats) and shadow mode."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import UID, generate_uid

from service.config import Settings
from service.deliver.fhir import build_bundle
from service.results.schema import StudyResult
from service.results.sr import build_sr
from tests.fixtures.tiny_models import write_tiny_model
from tests.service.conftest import running_app
from tests.service.dicom_factory import SENTINEL_NAME, to_bytes
from tests.service.dicom_factory import make_dataset as dataset

pytestmark = pytest.mark.anyio

DICOM = {"Content-Type": "application/dicom", "Prefer": "wait=10"}
PTX = "cxr-pneumothorax"


def radiograph_ds(study_uid: str, bright: bool) -> Dataset:
    """Mostly bright (the tiny classifier says positive, p ~ 0.87) or mostly dark (negative, p ~ 0.13)."""
    pixels = np.full((64, 64), 4000 if bright else 0, dtype=np.uint16)
    pixels[:8, :8] = 0 if bright else 4000  # so the percentile window spans both ends
    return dataset(study_uid=study_uid, pixels=pixels)


def radiograph(study_uid: str, bright: bool) -> bytes:
    return to_bytes(radiograph_ds(study_uid, bright))


async def test_feedback_is_audited_and_moves_the_ppv(
    settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    positive, negative = generate_uid(), generate_uid()
    async with running_app(settings) as (_app, client):
        for study, bright in ((positive, True), (negative, False)):
            r = await client.post("/v1/studies", content=radiograph(study, bright), headers=DICOM)
            assert r.status_code == 200, r.text
        (ptx,) = [f for f in r.json()["findings"] if f["model"] == PTX]
        assert not ptx["positive"]

        stats = (await client.get(f"/v1/models/{PTX}/stats")).json()
        (version,) = stats["versions"]
        assert (version["studies_analysed"], version["studies_flagged"], version["flag_rate"]) == (2, 1, 0.5)
        assert version["ppv"] is None and version["ppv_n"] == 0
        assert version["time_to_flag_seconds"]["n"] == 1 and version["time_to_flag_seconds"]["median"] >= 0
        assert sum(version["score_histogram"]["counts"]["pneumothorax"]) == 2

        body: dict[str, str | None] = {
            "model": PTX,
            "label": "pneumothorax",
            "verdict": "agree",
            "note": SENTINEL_NAME,
            "by": "dr.a",
        }
        r = await client.post(f"/v1/studies/{positive}/feedback", json=body)
        assert r.status_code == 201, r.text
        given = r.json()
        assert (given["verdict"], given["actor"], given["positive"]) == ("agree", "dr.a", True)
        version = (await client.get(f"/v1/models/{PTX}/stats")).json()["versions"][0]
        assert (version["ppv"], version["ppv_n"], version["feedback"]["agree"]) == (1.0, 1, 1)

        # a second reader disagrees: the latest verdict on the finding counts
        body |= {"verdict": "disagree", "by": "dr.b", "note": None}
        assert (await client.post(f"/v1/studies/{positive}/feedback", json=body)).status_code == 201
        body |= {"verdict": "unsure"}
        assert (await client.post(f"/v1/studies/{negative}/feedback", json=body)).status_code == 201
        version = (await client.get(f"/v1/models/{PTX}/stats")).json()["versions"][0]
        assert (version["ppv"], version["ppv_n"]) == (0.0, 1)
        assert version["feedback"] == {"agree": 0, "disagree": 1, "unsure": 1}

        audit = (await client.get(f"/v1/studies/{positive}/audit")).json()["events"]
        events = [e for e in audit if e["event"] == "feedback"]
        assert [(e["actor"], e["detail"]["verdict"]) for e in events] == [
            ("dr.a", "agree"),
            ("dr.b", "disagree"),
        ]
        assert events[0]["detail"]["note"] == SENTINEL_NAME and events[0]["detail"]["model"] == PTX
        metrics = (await client.get("/metrics")).text
        assert (
            f'pacs_triage_feedback_total{{model="{PTX}",verdict="agree",version="0.0.1-test"}} 1.0' in metrics
        )

        missing = await client.post(f"/v1/studies/{positive}/feedback", json=body | {"label": "nodule"})
        assert missing.status_code == 404 and missing.json()["type"].endswith("finding-not-found")
        unknown = await client.post(f"/v1/studies/{generate_uid()}/feedback", json=body)
        assert unknown.status_code == 404 and unknown.json()["type"].endswith("study-not-found")
        bad = await client.post(f"/v1/studies/{positive}/feedback", json=body | {"verdict": "maybe"})
        assert bad.status_code == 422
        nothing = await client.get("/v1/models/no-such-model/stats")
        assert nothing.status_code == 404 and nothing.json()["type"].endswith("unknown-model")
    assert SENTINEL_NAME not in caplog.text  # the note is stored, never logged


async def test_shadow_findings_are_stored_and_compared_but_never_shown(
    make_settings: Any, tiny_models_dir: Path, tmp_path: Path
) -> None:
    models = tmp_path / "models"
    shutil.copytree(tiny_models_dir, models)
    folder = write_tiny_model(models, "cxr-pneumothorax-next", "classification", scale=6.0, bias=-3.0)
    card = json.loads((folder / "card.json").read_text())
    card |= {"card_version": 2, "shadow_of": PTX, "version": "2.0.0-shadow"}
    (folder / "card.json").write_text(json.dumps(card))
    settings: Settings = make_settings(models_dir=models)
    sources = {
        uid: radiograph_ds(uid, bright) for uid, bright in ((generate_uid(), True), (generate_uid(), False))
    }
    async with running_app(settings) as (_app, client):
        results = {}
        for study, ds in sources.items():
            r = await client.post("/v1/studies", content=to_bytes(ds), headers=DICOM)
            assert r.status_code == 200, r.text
            results[study] = StudyResult.model_validate(r.json())
        worklist = (await client.get("/v1/worklist?status=all")).json()["entries"]
        comparison = (await client.get("/v1/models/cxr-pneumothorax-next/shadow")).json()
        not_shadow = await client.get(f"/v1/models/{PTX}/shadow")
        unknown = await client.get("/v1/models/nothing-here/shadow")

    for result in results.values():
        assert "cxr-pneumothorax-next" not in {f.model for f in result.findings}
        assert "cxr-pneumothorax-next" not in {m.name for m in result.models}
        (shadow,) = result.shadow_findings
        assert (shadow.model, shadow.model_version) == ("cxr-pneumothorax-next", "2.0.0-shadow")
        (used,) = result.shadow_models
        assert used.name == "cxr-pneumothorax-next" and used.input_instances
        assert result.status == "complete"  # the shadow's presence changes nothing of the result
        ds = sources[UID(result.study_uid)]
        sr = build_sr(result, [ds], sop_instance_uid=generate_uid(), series_instance_uid=generate_uid())
        assert "pneumothorax-next" not in str(sr) and "2.0.0-shadow" not in str(sr)
        assert "pneumothorax-next" not in build_bundle(result, ds).model_dump_json()
    for entry in worklist:
        assert all(f["model"] != "cxr-pneumothorax-next" for f in entry["positive_findings"])
    assert comparison["primary"] == PTX and comparison["shadow_versions"] == ["2.0.0-shadow"]
    assert (comparison["studies"], comparison["pairs"], comparison["agreement"]) == (2, 2, 1.0)
    assert comparison["table"] == {
        "both_positive": 1,
        "shadow_only": 0,
        "primary_only": 0,
        "both_negative": 1,
    }
    assert (comparison["flag_rate_shadow"], comparison["flag_rate_primary"]) == (0.5, 0.5)
    assert comparison["score_correlation"] == pytest.approx(1.0)
    assert 0 < comparison["mean_abs_score_difference"] < 0.2
    assert not_shadow.status_code == 404 and "not in shadow mode" in not_shadow.json()["detail"]
    assert unknown.status_code == 404
