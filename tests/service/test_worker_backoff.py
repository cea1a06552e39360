"""Workers that cannot claim a job back off and log the state change once, then recover without a restart.

Issue 15: with the database refusing (disk at 0 bytes free) workers retried every 5 ms at 93 % CPU and
wrote 24.8 MB of tracebacks a minute. Here the jobs table is really taken away from the running service
(renamed by a second SQLite connection), so every claim fails as it would on a broken store.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3

import pytest

from tests.service.conftest import running_app
from tests.service.dicom_factory import chest

pytestmark = pytest.mark.anyio


async def test_claim_failures_back_off_log_once_and_recover(make_settings, caplog) -> None:
    settings = make_settings(worker={"poll_seconds": 0.05, "concurrency": 2})
    caplog.set_level(logging.DEBUG, logger="service.worker")
    async with running_app(settings) as (_app, client):
        db = sqlite3.connect(settings.database_url.removeprefix("sqlite:///"), timeout=30)
        try:
            db.execute("ALTER TABLE jobs RENAME TO jobs_away")
            db.commit()
            await asyncio.sleep(2.0)  # forty 5 ms polls' worth of failing, had there been no back-off
            failing = [
                r for r in caplog.records if r.name == "service.worker" and "claiming jobs" in r.message
            ]
            warnings = [r for r in failing if r.levelno == logging.WARNING]
            assert len(warnings) == 1, [r.message for r in warnings]  # once, when it started failing
            # back-off: 50 ms doubling to a 5 s ceiling gives a handful of attempts in 2 s, not hundreds
            assert len(failing) < 20, len(failing)
            db.execute("ALTER TABLE jobs_away RENAME TO jobs")
            db.commit()
        finally:
            db.close()
        r = await client.post(
            "/v1/studies", content=chest(), headers={"Content-Type": "application/dicom", "Prefer": "wait=30"}
        )
        assert r.status_code == 200, r.text
        for _ in range(200):  # the next claim after the outage logs the recovery
            if any("claiming jobs recovered" in rec.message for rec in caplog.records):
                break
            await asyncio.sleep(0.05)
        assert any("claiming jobs recovered" in rec.message for rec in caplog.records)
