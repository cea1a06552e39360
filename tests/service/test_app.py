"""The thin slice: one application/dicom POST → stored → job → result JSON."""

from __future__ import annotations

import pytest

from service.config import Settings
from tests.service.conftest import running_app
from tests.service.dicom_factory import SENTINEL_ACCESSION, chest

pytestmark = pytest.mark.anyio


async def test_single_dicom_post_gives_result(settings: Settings) -> None:
    async with running_app(settings) as (_app, client):
        r = await client.post(
            "/v1/studies", content=chest(), headers={"Content-Type": "application/dicom", "Prefer": "wait=10"}
        )
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["status"] == "complete"
        assert {f["model"] for f in body["findings"]} == {"cxr-pneumothorax", "cxr-nodule"}
        assert body["accession_number"] == SENTINEL_ACCESSION
        got = await client.get(f"/v1/studies/{body['study_uid']}/result")
        assert got.status_code == 200
        assert got.json() == body
