"""Logging set-up: a job-id stamp from a ContextVar and no PHI.

The rule is in what we log, not in a scrubber: modules log job ids, stages, models, UIDs and timings, never
patient names, IDs, birth dates, accession numbers or whole datasets (a test sends a sentinel PatientName
and checks the captured log). :class:`JobIdFilter` reads :data:`job_id_var`, which the worker sets for the
duration of a job, so every line a job causes carries ``job=<id>`` without passing ids around (the
pattern pynetdicom's ``PASS_CONTEXTVARS`` docstring describes).

Two output formats (setting ``log_format``): ``text``, one readable line per record, and ``json``, one JSON
object per line (:class:`JsonFormatter`) for log shippers (Loki, Elasticsearch, Splunk) that would otherwise
have to parse the text and break on multi-line tracebacks.
"""

from __future__ import annotations

import json
import logging
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Literal

__all__ = ["JobIdFilter", "JsonFormatter", "LogFormat", "configure_logging", "job_id_var"]

job_id_var: ContextVar[str] = ContextVar("pacs_triage_job_id", default="-")

FORMAT = "%(asctime)s %(levelname)s %(name)s [job=%(job_id)s] %(message)s"

LogFormat = Literal["text", "json"]


class JobIdFilter(logging.Filter):
    """Adds ``record.job_id`` from the context (``-`` outside a job)."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.job_id = job_id_var.get()
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per record: ``time`` (RFC 3339, UTC), ``level``, ``logger``, ``job``, ``message``,
    and ``exception`` (the formatted traceback) when there is one. Keys are fixed, so a shipper can map
    them once; the message is the same text the ``text`` format shows (no PHI either way)."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "job": getattr(record, "job_id", "-"),
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            entry["exception"] = record.exc_text
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return json.dumps(entry, ensure_ascii=False)


def configure_logging(level: str = "INFO", fmt: LogFormat = "text") -> None:
    """Set up root logging once, at process start (``pacs-triage serve``); tests keep pytest's."""
    handler = logging.StreamHandler()
    handler.addFilter(JobIdFilter())
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(FORMAT))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for name, floor in QUIET.items():  # libraries we do not control stay at their floor, even at DEBUG
        logging.getLogger(name).setLevel(max(floor, logging.getLevelName(level)))


QUIET: dict[str, int] = {
    # pynetdicom's DEBUG/INFO dumps whole PDUs and datasets (patient data) and one line per association
    "pynetdicom": logging.WARNING,
    # one INFO line per HTTP request (webhooks, FHIR, KServe): noise, and URLs may carry query strings
    "httpx": logging.WARNING,
    "httpcore": logging.WARNING,
    # dicomweb-client (DICOMweb pulls) logs study UIDs at INFO and whole query URLs at DEBUG
    "dicomweb_client": logging.WARNING,
}
"""Third-party loggers and the lowest level they may log at."""
