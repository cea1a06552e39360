"""HTTP API: one router per resource, gathered here (as the full-stack FastAPI template's api/main.py)."""

from fastapi import APIRouter

from service.api import deliveries, health, metrics, models, studies

__all__ = ["api_router"]

api_router = APIRouter()
api_router.include_router(health.router)
api_router.include_router(metrics.router)
api_router.include_router(models.router)
api_router.include_router(studies.router)
api_router.include_router(deliveries.router)
