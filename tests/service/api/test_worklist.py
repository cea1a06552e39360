"""The worklist: urgent first, never downgraded, starvation guard, acknowledgement, audit."""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from typing import Any

import httpx
import pytest
from pydicom.uid import generate_uid
from sqlalchemy import update
from sqlalchemy.orm import Session

from service.config import Settings
from service.results.schema import Code, Finding
from service.store.db import StudyRow, utcnow
from service.worklist.policy import apply_overrides, effective_priority, raise_only
from tests.service.conftest import running_app
from tests.service.dicom_factory import chest, multipart_related

pytestmark = pytest.mark.anyio


async def _post(client: httpx.AsyncClient, *parts: bytes) -> dict[str, Any]:
    body, ctype = multipart_related(list(parts))
    r = await client.post("/v1/studies", content=body, headers={"Content-Type": ctype, "Prefer": "wait=20"})
    assert r.status_code == 200, r.text
    return r.json()


def test_policy_never_downgrades() -> None:
    assert raise_only(None, "routine").event == "flagged"
    assert raise_only(2, "stat") == raise_only(2, "stat").__class__(0, "raised")
    lower = raise_only(0, "routine")
    assert lower.priority == 0 and lower.event == "rerun_lower"
    assert raise_only(1, "urgent").event == "unchanged"


def test_starvation_guard_promotes_only_long_waiting_routine() -> None:
    now = utcnow()
    assert effective_priority(2, now - timedelta(minutes=121), now, 120) == (1, True)
    assert effective_priority(2, now - timedelta(minutes=119), now, 120) == (2, False)
    assert effective_priority(0, now - timedelta(days=3), now, 120) == (0, False)
    assert effective_priority(None, now - timedelta(days=3), now, 0) == (2, False)  # guard off


def test_site_overrides_change_a_findings_urgency() -> None:
    f = Finding(
        model="m",
        model_version="1",
        model_sha256="0" * 64,
        label="nodule",
        code=Code(scheme="SCT", value="1", meaning="x"),
        probability=0.9,
        threshold=0.5,
        positive=True,
        urgent=False,
        urgency="routine",
        series_uid="1.2",
    )
    (over,) = apply_overrides([f], {"m/nodule": "urgent"})
    assert over.urgency == "urgent" and over.urgent
    assert apply_overrides([f], {"other/nodule": "stat"}) == [f]


async def test_worklist_orders_acknowledges_and_audits(make_settings: Callable[..., Settings]) -> None:
    # tiny models: the chest classifier is positive on chest() and its card urgency is stat (see
    # tests/fixtures/tiny_models.py); an override makes the detector's finding urgent as well.
    settings = make_settings(worklist={"max_wait_minutes": 60})
    async with running_app(settings) as (app, client):
        flagged = await _post(client, chest())
        assert flagged["timestamps"]["worklist_updated"] == flagged["timestamps"]["result_stored"]
        routine_uid = generate_uid()
        await client.post(
            "/v1/studies",
            content=b"x",
            headers={"Content-Type": "application/dicom"},
        )  # a refused body changes nothing on the worklist
        body, ctype = multipart_related([chest(study_uid=routine_uid, pixels=None, value=0.0)])
        r = await client.post(
            "/v1/studies", content=body, headers={"Content-Type": ctype, "Prefer": "wait=20"}
        )
        assert r.status_code == 200
        assert (flagged["priority"], r.json()["priority"]) == ("stat", "routine")  # tiny models' answers
        entries = (await client.get("/v1/worklist")).json()["entries"]
        assert [e["study_uid"] for e in entries][0] == flagged["study_uid"] or flagged[
            "priority"
        ] == "routine"
        by_uid = {e["study_uid"]: e for e in entries}
        top = by_uid[flagged["study_uid"]]
        assert top["ai_priority"] == flagged["priority"]
        assert top["time_to_flag_seconds"] is not None and top["time_to_flag_seconds"] >= 0
        assert top["result_id"] == flagged["result_id"]

        # a routine study that waited past the cap is promoted, and sorts before younger routine ones
        with Session(app.state.triage.store.engine) as s, s.begin():
            s.execute(
                update(StudyRow)
                .where(StudyRow.study_uid == routine_uid)
                .values(first_received=utcnow() - timedelta(minutes=61))
            )
        promoted = next(
            e for e in (await client.get("/v1/worklist")).json()["entries"] if e["study_uid"] == routine_uid
        )
        assert promoted["ai_priority"] == "routine"
        assert promoted["priority"] == "urgent" and promoted["promoted"]

        ack = await client.post(
            f"/v1/studies/{flagged['study_uid']}/acknowledge", json={"by": "dr.jones", "note": "seen"}
        )
        assert ack.status_code == 200 and ack.json()["acknowledged_by"] == "dr.jones"
        open_uids = {e["study_uid"] for e in (await client.get("/v1/worklist")).json()["entries"]}
        assert flagged["study_uid"] not in open_uids
        acked = (await client.get("/v1/worklist", params={"status": "acknowledged"})).json()["entries"]
        assert [e["study_uid"] for e in acked] == [flagged["study_uid"]]
        events = (await client.get(f"/v1/studies/{flagged['study_uid']}/audit")).json()["events"]
        assert [e["event"] for e in events] == ["flagged", "acknowledged"]
        # auth.open: no identity exists, so the typed name is the actor (with tokens it is only a note:
        # tests/service/api/test_auth_identity.py)
        assert events[1]["actor"] == "dr.jones" and events[1]["detail"] == {"note": "seen"}

        missing = await client.post(f"/v1/studies/{generate_uid()}/acknowledge", json={"by": "x"})
        assert missing.status_code == 404
        bad = await client.post("/v1/studies/not-a-uid/acknowledge", json={"by": "x"})
        assert bad.status_code == 422
        too_long = {"by": "x" * 129}
        assert (await client.post(f"/v1/studies/{routine_uid}/acknowledge", json=too_long)).status_code == 422
        metrics = (await client.get("/metrics")).text
        assert "pacs_triage_time_to_flag_seconds_count" in metrics


async def test_a_lower_rerun_keeps_the_priority_and_is_recorded(
    make_settings: Callable[..., Settings],
) -> None:
    """A study flagged stat, then a re-run (late images) that asks only for routine: it stays stat."""
    settings = make_settings()
    study = generate_uid()
    negative = {"pixels": None, "value": 0.0}  # the tiny models' routine answer (see the test above)
    async with running_app(settings) as (app, client):
        first = await _post(client, chest(study_uid=study, **negative))
        assert first["priority"] == "routine"
        # as if an earlier result had flagged it stat (an older model version, say)
        with Session(app.state.triage.store.engine) as s, s.begin():
            s.execute(update(StudyRow).where(StudyRow.study_uid == study).values(ai_priority=0))
        second = await _post(client, chest(study_uid=study, **negative))
        assert second["supersedes"] == first["result_id"] and second["priority"] == "routine"
        (entry,) = [
            e
            for e in (await client.get("/v1/worklist", params={"status": "all"})).json()["entries"]
            if e["study_uid"] == study
        ]
        assert entry["ai_priority"] == "stat" and entry["priority"] == "stat"
        assert entry["last_result_priority"] == "routine"
        events = [e["event"] for e in (await client.get(f"/v1/studies/{study}/audit")).json()["events"]]
        assert events == ["flagged", "rerun_lower"]
