"""When is a study complete? The gate a job waits behind before the worker may claim it.

DICOM has no "end of study" message, so a study received over C-STORE is complete once no new instance
has arrived for ``assembly.quiet_seconds`` (the quiet timer of mercure's router): every instance pushes
the job's ``not_before`` forward. An HTTP POST is different: the request itself delimits what the client
sent, so the study is ready when the request ends, and ``Prefer: wait`` does not pay the quiet timer.

Late instances (after a result was written) open a new job; its result supersedes the earlier one
(:meth:`service.store.repository.Store.ingest`).
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Literal

from service.config import Settings
from service.store.db import utcnow

__all__ = ["Source", "ready_after"]

Source = Literal["rest", "dicom"]


def ready_after(settings: Settings, source: Source, now: datetime | None = None) -> datetime:
    """The earliest time the study may be analysed, given where its newest instance came from."""
    now = now or utcnow()
    if source == "rest":
        return now
    return now + timedelta(seconds=settings.assembly.quiet_seconds)
