"""HTTP API: one router per resource, gathered here (as the full-stack FastAPI template's api/main.py).

Every router but ``health`` goes under ``protected``, whose dependency :func:`service.api.auth.authorize`
asks a reader token for GET and an admin token for anything else; tests/service/api/test_auth.py walks the
OpenAPI document, so a route added outside it fails the suite. Health probes stay open for the
orchestrator, and so do ``/openapi.json`` and ``/docs`` (app routes, not here): they describe the API and
hold nothing secret. The token table is built by this router's lifespan, at start-up.
"""

from fastapi import APIRouter, Depends

from service.api import (
    deliveries,
    dicomweb,
    health,
    lifecycle,
    metrics,
    models,
    notifications,
    retrievals,
    studies,
    web,
    worklist,
)
from service.api.auth import AUTH_RESPONSES, auth_lifespan, authorize

__all__ = ["api_router"]

protected = APIRouter(dependencies=[Depends(authorize)], responses=AUTH_RESPONSES)
protected.include_router(metrics.router)
protected.include_router(models.router)
protected.include_router(studies.router)
protected.include_router(deliveries.router)
protected.include_router(worklist.router)
protected.include_router(lifecycle.router)
protected.include_router(notifications.router)
protected.include_router(web.router)
protected.include_router(dicomweb.router)
protected.include_router(retrievals.router)

api_router = APIRouter(lifespan=auth_lifespan)
api_router.include_router(health.router)
api_router.include_router(protected)
api_router.include_router(web.page_router)  # the page's files: no data, open like /docs
