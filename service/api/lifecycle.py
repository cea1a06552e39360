"""A model's life in service: ``POST /v1/studies/{uid}/feedback`` (a reader's verdict on a finding),
``GET /v1/models/{name}/stats`` and ``GET /v1/models/{name}/shadow`` (shadow mode against its primary).

Feedback is a reader action, like acknowledging (:data:`service.api.auth.READER_ACTIONS`): the radiologist
at the workstation is the one who knows whether the flag was right. The actor is always the authenticated
caller; with ``auth.open`` (loopback, no identity) a typed ``by`` stands in, as for acknowledgements.
Verdicts, flag rates and PPV per model version come from :class:`service.store.feedback.FeedbackStore`.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Query
from pydantic import BaseModel, Field

from service.api.auth import CallerDep
from service.api.deps import StateDep, StudyUID
from service.errors import (
    FindingNotFoundError,
    FindingNotInResultError,
    InvalidUIDError,
    StudyNotFoundError,
    UnknownModelError,
)
from service.inference.card import NAME_PATTERN
from service.store.feedback import FeedbackStore, Verdict
from service.store.files import is_safe_uid
from service.store.shadow import ShadowStore

__all__ = ["router"]

router = APIRouter(tags=["model lifecycle"])


class FeedbackIn(BaseModel):
    model: str = Field(pattern=NAME_PATTERN, description="the finding's model, as in the result")
    label: str = Field(min_length=1, max_length=128, description="the finding's label, as in the result")
    verdict: Verdict = Field(description="the reader's call on the finding")
    note: str | None = Field(None, max_length=1000)
    by: str | None = Field(
        None, min_length=1, max_length=128, description="a typed name, used only when the API is open"
    )


class FeedbackOut(BaseModel):
    at: datetime
    study_uid: str
    result_id: str
    model: str
    model_version: str
    label: str
    verdict: Verdict
    actor: str
    positive: bool = Field(description="whether the finding was positive when the verdict was given")
    probability: float


@router.post(
    "/v1/studies/{study_uid}/feedback", response_model=FeedbackOut, status_code=201, responses={404: {}}
)
async def feedback(study_uid: StudyUID, body: FeedbackIn, state: StateDep, caller: CallerDep) -> FeedbackOut:
    """Agree, disagree or unsure on one finding of the study's newest result; audited as ``feedback``."""
    if not is_safe_uid(study_uid):
        raise InvalidUIDError("the study UID in the path is not a valid UID", part="study_uid")
    actor = (body.by or caller.actor) if caller.via == "open" else caller.actor
    store = FeedbackStore(state.db)
    try:
        item = await store.record(study_uid, actor, body.model, body.label, body.verdict, body.note)
    except FindingNotInResultError as exc:
        raise FindingNotFoundError(str(exc)) from exc
    if item is None:
        raise StudyNotFoundError("no instance of this study has been received", part="study_uid")
    state.metrics.feedback.labels(model=item.model, version=item.model_version, verdict=item.verdict).inc()
    return FeedbackOut(
        at=item.at,
        study_uid=item.study_uid,
        result_id=item.result_id,
        model=item.model,
        model_version=item.model_version,
        label=item.label,
        verdict=item.verdict,
        actor=item.actor,
        positive=item.positive,
        probability=item.probability,
    )


@router.get("/v1/models/{name}/stats", responses={404: {}})
async def model_stats(
    name: str,
    state: StateDep,
    limit: Annotated[int, Query(ge=1, le=100_000, description="newest results looked at")] = 10_000,
) -> dict[str, Any]:
    """Per model version: studies analysed, flag rate, PPV from feedback, time to flag, score histogram;
    and ``drift``: this process's drift and silence alarms for the model (service/lifecycle/drift.py),
    null before it has analysed a series of the model."""
    stats = await FeedbackStore(state.db).stats(name, limit)
    if not stats and name not in state.registry.models:
        raise UnknownModelError(f"model {name!r} is not loaded and has no stored results")
    drift = state.drift.report(name) if state.drift is not None else None
    return {"model": name, "results_limit": limit, "versions": [s.as_dict() for s in stats], "drift": drift}


@router.get("/v1/models/{name}/shadow", responses={404: {}})
async def shadow(
    name: str,
    state: StateDep,
    limit: Annotated[int, Query(ge=1, le=100_000, description="newest results looked at")] = 10_000,
) -> dict[str, Any]:
    """A model in shadow mode (card ``shadow_of``) against the model it shadows: agreement and its 2 x 2
    table, flag rates over the same studies, score correlation. Its findings are never shown elsewhere."""
    loaded = state.registry.models.get(name)
    primary = loaded.card.shadow_of if loaded is not None else None
    comparison = await ShadowStore(state.db).compare(name, primary, limit)
    if loaded is None and not comparison.studies:
        raise UnknownModelError(f"model {name!r} is not loaded and has no stored shadow findings")
    if loaded is not None and primary is None and not comparison.studies:
        raise UnknownModelError(f"model {name!r} is not in shadow mode (its card has no shadow_of)")
    return {"results_limit": limit, **comparison.as_dict()}
