"""The job-id log stamp and the assembly gate."""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta

from service.assemble import ready_after
from service.config import Settings
from service.logs import JobIdFilter, job_id_var


def test_job_id_filter_reads_context() -> None:
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "m", None, None)
    JobIdFilter().filter(record)
    assert record.job_id == "-"
    token = job_id_var.set("42")
    try:
        JobIdFilter().filter(record)
        assert record.job_id == "42"
    finally:
        job_id_var.reset(token)


def test_ready_after() -> None:
    now = datetime(2026, 1, 1, tzinfo=UTC)
    settings = Settings(assembly={"quiet_seconds": 3})
    assert ready_after(settings, "rest", now) == now
    assert ready_after(settings, "dicom", now) == now + timedelta(seconds=3)
