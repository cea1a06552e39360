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
    """Idle workers do not read the queue themselves: their gate watcher does (``looking for due jobs``),
    and the claims it wakes them for (``claiming jobs``); each backs off and logs its state changes once."""
    settings = make_settings(worker={"poll_seconds": 0.05, "concurrency": 2})
    caplog.set_level(logging.DEBUG, logger="service.worker")
    activities = ("claiming jobs", "looking for due jobs")

    def lines(words: str) -> list[logging.LogRecord]:
        return [
            r
            for r in caplog.records
            if r.name == "service.worker" and any(a in r.message for a in activities) and words in r.message
        ]

    def named(records: list[logging.LogRecord]) -> set[str]:
        return {a for r in records for a in activities if r.message.startswith(a)}

    async with running_app(settings) as (_app, client):
        db = sqlite3.connect(settings.database_url.removeprefix("sqlite:///"), timeout=30)
        try:
            db.execute("ALTER TABLE jobs RENAME TO jobs_away")
            db.commit()
            await asyncio.sleep(2.0)  # forty 5 ms polls' worth of failing, had there been no back-off
            failing = lines("")
            warnings = [r for r in failing if r.levelno == logging.WARNING]
            failed = named(warnings)
            assert warnings, "no failure was logged"
            assert len(warnings) == len(failed), [r.message for r in warnings]  # once per activity
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
        for _ in range(200):  # the next read after the outage logs the recovery of each activity that failed
            if named(lines("recovered")) == failed:
                break
            await asyncio.sleep(0.05)
        assert named(lines("recovered")) == failed
