"""Prometheus exposition of the service's own registry."""

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
    state.metrics.jobs_waiting.set(await state.jobs.backlog())  # a gauge read from the shared store
    body, content_type = state.metrics.render()
    return Response(content=body, media_type=content_type)
