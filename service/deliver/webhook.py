"""Webhooks: a signed JSON POST per urgent flag (and per escalation), so a pager, chat bot or RIS hears of it.

The signature follows the common pattern (GitHub, Stripe): ``X-PACS-Triage-Signature: sha256=<hex>``, an
HMAC-SHA256 with the shared secret over ``"<timestamp>.<body>"``, with the timestamp in
``X-PACS-Triage-Timestamp`` so a receiver can refuse replays. ``X-PACS-Triage-Delivery`` is the
notification id: a retried POST carries the same id, so receivers can drop duplicates.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from typing import Any

import httpx

from service.clock import utcnow
from service.config import NotifySettings
from service.store.notify import NotificationInfo, shown_target

__all__ = ["payload", "send_webhook", "sign"]

EVENTS = {"webhook": "urgent_finding", "escalation": "escalation"}


def payload(n: NotificationInfo) -> dict[str, Any]:
    """The JSON body: what was flagged and where to read it; never patient names or IDs."""
    r = n.result
    return {
        "event": EVENTS.get(n.channel, n.channel),
        "notification_id": n.id,
        "study_uid": n.study_uid,
        "accession_number": n.accession_number,
        "priority": r.priority if r else None,
        "result_id": r.result_id if r else None,
        "result_url": f"/v1/studies/{n.study_uid}/result",
        "findings": [
            {"model": f.model, "label": f.label, "probability": round(f.probability, 4), "urgency": f.urgency}
            for f in (r.findings if r else [])
            if f.positive
        ],
        "sent_at": utcnow().isoformat(),
    }


def sign(secret: str, timestamp: str, body: bytes) -> str:
    mac = hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256)
    return "sha256=" + mac.hexdigest()


def send_webhook(n: NotificationInfo, settings: NotifySettings) -> None:
    """POST the payload; any answer but 2xx (or a network error) raises, so the outbox retries."""
    body = json.dumps(payload(n), sort_keys=True).encode()
    timestamp = str(int(time.time()))
    headers = {
        "Content-Type": "application/json",
        "User-Agent": "pacs-triage",
        "X-PACS-Triage-Event": EVENTS.get(n.channel, n.channel),
        "X-PACS-Triage-Delivery": str(n.id),
        "X-PACS-Triage-Timestamp": timestamp,
    }
    if settings.webhook_secret is not None:
        headers["X-PACS-Triage-Signature"] = sign(settings.webhook_secret.get_secret_value(), timestamp, body)
    response = httpx.post(n.target, content=body, headers=headers, timeout=settings.timeout_seconds)
    if not response.is_success:
        # Not the URL: it may carry the receiver's key, and this text is logged and kept as last_error.
        raise RuntimeError(f"{shown_target(n.target)} answered HTTP {response.status_code}")
