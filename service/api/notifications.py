"""``GET /v1/notifications``: the webhook / escalation / HL7 / FHIR outbox, to see what was told to whom."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

from fastapi import APIRouter, Query
from pydantic import BaseModel

from service.api.deps import StateDep
from service.store.notify import shown_target

__all__ = ["router"]

router = APIRouter(prefix="/v1/notifications", tags=["notifications"])


class Notification(BaseModel):
    id: int
    study_uid: str
    channel: str
    target: str
    state: Literal["pending", "sending", "done", "dead"]
    attempts: int
    created_at: datetime | None
    delivered_at: datetime | None
    last_error: str | None


class NotificationList(BaseModel):
    notifications: list[Notification]


@router.get("", response_model=NotificationList)
async def list_notifications(
    state: StateDep,
    notification_state: Annotated[
        Literal["pending", "sending", "done", "dead"] | None,
        Query(alias="state", description="only this state"),
    ] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 200,
) -> NotificationList:
    """Newest first."""
    rows = await state.notifications.list(notification_state, limit)
    return NotificationList(
        notifications=[
            Notification(
                id=n.id,
                study_uid=n.study_uid,
                channel=n.channel,
                target=shown_target(n.target),  # a webhook URL is a credential
                state=n.state,
                attempts=n.attempts,
                created_at=n.created_at,
                delivered_at=n.delivered_at,
                last_error=n.last_error,
            )
            for n in rows
        ]
    )
