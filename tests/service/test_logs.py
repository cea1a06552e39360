"""The job-id log stamp and the assembly gate."""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime, timedelta

import pytest

from service.assemble import ready_after
from service.config import Settings
from service.logs import QUIET, JobIdFilter, JsonFormatter, configure_logging, job_id_var


def test_job_id_filter_reads_context() -> None:
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "m", None, None)
    JobIdFilter().filter(record)
    assert record.__dict__["job_id"] == "-"
    token = job_id_var.set("42")
    try:
        JobIdFilter().filter(record)
        assert record.__dict__["job_id"] == "42"
    finally:
        job_id_var.reset(token)


def test_ready_after() -> None:
    now = datetime(2026, 1, 1, tzinfo=UTC)
    settings = Settings(assembly={"quiet_seconds": 3})
    assert ready_after(settings, "rest", now) == now
    assert ready_after(settings, "dicom", now) == now + timedelta(seconds=3)


def test_json_format_one_object_per_line() -> None:
    """Each record is one line of JSON with fixed keys; a traceback stays inside it, newlines escaped."""
    formatter = JsonFormatter()
    try:
        raise ValueError("boom")
    except ValueError:
        record = logging.LogRecord(
            "service.worker", logging.ERROR, __file__, 1, "job %s failed", ("7",), None
        )
        record.exc_info = sys.exc_info()
    JobIdFilter().filter(record)
    line = formatter.format(record)
    assert "\n" not in line
    entry = json.loads(line)
    assert entry["level"] == "ERROR" and entry["logger"] == "service.worker" and entry["job"] == "-"
    assert entry["message"] == "job 7 failed"
    assert entry["time"].endswith("+00:00")
    assert "ValueError: boom" in entry["exception"]


def test_configure_logging_json(capfd: pytest.CaptureFixture[str]) -> None:
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    quiet = {name: logging.getLogger(name).level for name in QUIET}
    try:
        configure_logging("INFO", "json")
        token = job_id_var.set("12")
        try:
            logging.getLogger("service.test").info("hello %s", "world")
        finally:
            job_id_var.reset(token)
    finally:
        root.handlers[:], level = saved
        root.setLevel(level)
        for name, old in quiet.items():
            logging.getLogger(name).setLevel(old)
    entry = json.loads(capfd.readouterr().err.strip().splitlines()[-1])
    assert (entry["message"], entry["job"], entry["logger"]) == ("hello world", "12", "service.test")
