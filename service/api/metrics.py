"""Prometheus exposition of the service's own registry."""

from __future__ import annotations

from fastapi import APIRouter, Response

from service.api.deps import StateDep

__all__ = ["router"]

router = APIRouter(tags=["metrics"])


@router.get("/metrics")
async def metrics(state: StateDep) -> Response:
    body, content_type = state.metrics.render()
    return Response(content=body, media_type=content_type)
