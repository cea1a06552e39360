"""Prometheus exposition of the service's own registry (:class:`service.metrics.Metrics`)."""

from __future__ import annotations

from fastapi import APIRouter, Response

from service.api.deps import StateDep

__all__ = ["router"]

router = APIRouter(tags=["metrics"])


@router.get(
    "/metrics",
    response_class=Response,
    responses={200: {"content": {"text/plain": {}}, "description": "Prometheus text exposition"}},
)
async def metrics(state: StateDep) -> Response:
    # Gauges read at scrape time: the job queue from the shared store, the models from this process.
    state.metrics.jobs_waiting.set(await state.jobs.backlog())
    state.metrics.set_oldest_due(await state.jobs.next_due())
    started = {name: state.engine.providers_for(name) for name in state.engine.model_names}
    state.metrics.set_models(state.registry, started)
    if state.drift is not None:
        state.metrics.set_drift(state.drift)
    body, content_type = state.metrics.render()
    return Response(content=body, media_type=content_type)
