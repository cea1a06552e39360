"""What left the service for remote inference, collected per study (issue 18: audit which backend saw what).

A remote backend (:mod:`service.inference.kserve.client`) calls :func:`record` for every request it
sends with a study's data, *before* sending it: data that reached a server counts even if the request
then failed.
The study's analysis (:func:`service.analyse.analyse_study`) opens :func:`collecting` around its models;
the requests land in its :class:`~service.results.schema.StudyResult` (``remote_requests``) and, in the
result's own transaction, one audit event each (``remote_inference``, :mod:`service.store.worklist`).

A ContextVar rather than an argument, because the engine surface (``run(model, images, priority)``) is
shared with the local engine and the micro-batcher, whose timing must not change for this; asyncio copies
the context into each task, so requests sent from the per-model tasks of one study reach its one list.
Requests outside any study (start-up warm-ups, all-zero images) are not recorded.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

from service.results.schema import RemoteRequest

__all__ = ["collecting", "record"]

_collector: ContextVar[list[RemoteRequest] | None] = ContextVar("pacs_triage_remote_requests", default=None)


def record(request: RemoteRequest) -> None:
    """Note one request sent with the current study's data (a no-op outside :func:`collecting`)."""
    requests = _collector.get()
    if requests is not None:
        requests.append(request)


@contextmanager
def collecting() -> Iterator[list[RemoteRequest]]:
    """Collect the remote requests sent inside the block (and the tasks it starts) into the list."""
    requests: list[RemoteRequest] = []
    token = _collector.set(requests)
    try:
        yield requests
    finally:
        _collector.reset(token)
