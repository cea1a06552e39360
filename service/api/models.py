"""``GET /v1/models``: what is loaded, on which provider, and what failed to load and why."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from service.api.deps import StateDep

__all__ = ["router"]

router = APIRouter(prefix="/v1/models", tags=["models"])


@router.get("")
async def list_models(state: StateDep) -> dict[str, Any]:
    models = []
    for name, loaded in sorted(state.registry.models.items()):
        card = loaded.card
        models.append(
            {
                "name": name,
                "version": card.version,
                "task": card.task,
                "sha256": card.sha256,
                "providers": state.engine.providers_for(name) if name in state.engine.model_names else [],
                "status": "loaded" if name in state.engine.model_names else "not started",
                "intended_use": card.intended_use,
                "labels": [
                    {
                        "name": lb.name,
                        "code": lb.code.model_dump(),
                        "threshold": lb.threshold,
                        "urgency": lb.urgency,
                    }
                    for lb in card.labels
                ],
                "eligibility": card.eligibility.model_dump(),
            }
        )
    errors = [{"name": n, "status": "error", "error": e} for n, e in sorted(state.registry.errors.items())]
    return {"models": models, "errors": errors}
