"""``GET /v1/models``: what is loaded, on which provider, and what failed to load and why.

Each model shows its card's description, intended use and documentation fields (card v2: license,
authors, references, limitations, out-of-scope use, subgroup results, regulatory status), so the people
reading a flag can see what the model is and what it was not made for.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from service.api.deps import StateDep
from service.inference.card import ModelCard

__all__ = ["documentation", "router"]

DOCUMENTATION_FIELDS = (
    "license",
    "authors",
    "references",
    "limitations",
    "out_of_scope_use",
    "subgroup_results",
    "regulatory_status",
)
"""The card's optional documentation fields (card v2), shown as given; absent ones are left out."""


def documentation(card: ModelCard) -> dict[str, Any]:
    """The documentation fields the card fills (license, authors, limitations, ...)."""
    return {name: getattr(card, name) for name in DOCUMENTATION_FIELDS if getattr(card, name)}


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
                "card_version": card.card_version,
                "description": card.description,
                "intended_use": card.intended_use,
                "activation": card.activation,
                "shadow_of": card.shadow_of,
                "input": {"shape": card.input.shape, "channels": card.preprocessing.channels},
                "documentation": documentation(card),
                "labels": [
                    {
                        "name": lb.name,
                        "code": lb.code.model_dump(),
                        "threshold": lb.threshold,
                        "threshold_rule": lb.threshold_rule,  # says so when a site override applies
                        "urgency": lb.urgency,
                    }
                    for lb in card.labels
                ],
                "eligibility": card.eligibility.model_dump(),
            }
        )
    errors = [{"name": n, "status": "error", "error": e} for n, e in sorted(state.registry.errors.items())]
    return {"models": models, "errors": errors}
