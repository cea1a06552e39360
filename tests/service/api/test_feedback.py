"""Reader feedback per finding, audited, and per-model-version stats where feedback changes the PPV."""

from __future__ import annotations

import numpy as np
import pytest
from pydicom.uid import generate_uid

from service.config import Settings
from tests.service.conftest import running_app
from tests.service.dicom_factory import SENTINEL_NAME, to_bytes
from tests.service.dicom_factory import make_dataset as dataset

pytestmark = pytest.mark.anyio

DICOM = {"Content-Type": "application/dicom", "Prefer": "wait=10"}
PTX = "cxr-pneumothorax"


def radiograph(study_uid: str, bright: bool) -> bytes:
    """Mostly bright (the tiny classifier says positive, p ~ 0.87) or mostly dark (negative, p ~ 0.13)."""
    pixels = np.full((64, 64), 4000 if bright else 0, dtype=np.uint16)
    pixels[:8, :8] = 0 if bright else 4000  # so the percentile window spans both ends
    return to_bytes(dataset(study_uid=study_uid, pixels=pixels))


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

        body = {
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
