"""Liveness and readiness (Kubernetes-style probes)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from service.errors import NotReadyError

__all__ = ["router"]

router = APIRouter(prefix="/healthz", tags=["health"])


@router.get("/live")
async def live() -> dict[str, str]:
    """The process answers; says nothing about models."""
    return {"status": "live"}


@router.get("/ready", responses={503: {"description": "starting, warming up or over its backlog"}})
async def ready(request: Request) -> JSONResponse:
    """200 once the store is open and (in a process that infers) every model session is warm; else 503.

    Back-pressure: the body says how many jobs wait for a worker; with ``worker.ready_max_backlog`` set, a
    longer queue answers 503 so a load balancer sends new studies to another replica meanwhile.
    """
    state = getattr(request.app.state, "triage", None)
    if state is None:
        raise NotReadyError("the service is starting", part="store")
    if state.settings.runs_workers and not state.engine.ready:
        raise NotReadyError("models are still loading and warming up", part="engine")
    backlog = await state.jobs.backlog()
    state.metrics.jobs_waiting.set(backlog)
    limit = state.settings.worker.ready_max_backlog
    if limit and backlog > limit:
        raise NotReadyError(
            f"{backlog} jobs are waiting for a worker (more than {limit})",
            part="backlog",
            extra={"backlog": backlog},
        )
    models = state.engine.model_names if state.settings.runs_workers else []
    return JSONResponse(
        {"status": "ready", "role": state.settings.role, "models": models, "backlog": backlog}
    )
