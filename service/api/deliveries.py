"""``GET /v1/deliveries`` (the outbox: what was sent where, what is waiting, what was dead-lettered) and
``POST /v1/deliveries/{id}/retry`` (put a dead-lettered object back in the queue once the PACS is fixed)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

from fastapi import APIRouter, Query
from fastapi import Path as FastAPIPath
from pydantic import BaseModel

from service.api.auth import CallerDep
from service.api.deps import StateDep
from service.errors import DeliveryNotFoundError
from service.store.outbox import DeliveryInfo

__all__ = ["router"]

router = APIRouter(prefix="/v1/deliveries", tags=["deliveries"])

DeliveryState = Literal["pending", "sending", "done", "dead"]


class Delivery(BaseModel):
    id: int
    study_uid: str
    sop_instance_uid: str
    kind: str
    destination: str
    state: DeliveryState
    priority: int
    attempts: int
    next_attempt_at: datetime
    delivered_at: datetime | None
    last_error: str | None


class DeliveryList(BaseModel):
    deliveries: list[Delivery]


def _model(d: DeliveryInfo) -> Delivery:
    return Delivery(
        id=d.id,
        study_uid=d.study_uid,
        sop_instance_uid=d.sop_instance_uid,
        kind=d.kind,
        destination=d.destination,
        state=d.state,
        priority=d.priority,
        attempts=d.attempts,
        next_attempt_at=d.next_attempt_at,
        delivered_at=d.delivered_at,
        last_error=d.last_error,
    )


@router.get("", response_model=DeliveryList)
async def list_deliveries(
    state: StateDep,
    delivery_state: Annotated[
        DeliveryState | None, Query(alias="state", description="only this state")
    ] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 200,
) -> DeliveryList:
    """Newest first."""
    return DeliveryList(deliveries=[_model(d) for d in await state.outbox.list(delivery_state, limit)])


@router.post("/{delivery_id}/retry", response_model=Delivery, responses={404: {}})
async def retry_delivery(
    delivery_id: Annotated[int, FastAPIPath(ge=1, le=2**63 - 1)], state: StateDep, caller: CallerDep
) -> Delivery:
    """A dead-lettered delivery goes back to pending with its attempts reset; other states are unchanged.
    Audited (``delivery_requeued``) under the authenticated caller's name."""
    info = await state.outbox.requeue(delivery_id)
    if info is None:
        raise DeliveryNotFoundError(f"no delivery {delivery_id}", part="delivery_id")
    await state.worklist.record(
        info.study_uid, "delivery_requeued", caller.actor, {"delivery_id": info.id, "kind": info.kind}
    )
    state.delivery.send_wanted.set()
    return _model(info)
