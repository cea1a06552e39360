"""The notifications loop: sends due webhook / escalation / HL7 / FHIR messages, and queues escalations.

Senders are blocking callables per channel (``SENDERS``), run in a thread; one that raises is retried with
exponential backoff (capped at 10 minutes, :func:`service.store.outbox.record_attempt`) until
``notify.max_attempts``, then dead-lettered and audited.

Logging is per target and per state change (:class:`service.backoff.FailureLog`): a RIS that is down for an
hour while 500 results queue for it gives one WARNING when it starts failing and one INFO when it answers
again, not a line per message per retry (issue 15). A dead-lettered message is its own ERROR line: that
one needs a person. Targets are logged in their shown form (no webhook key, :func:`shown_target`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from service.backoff import FailureLog
from service.config import NotifySettings
from service.deliver.fhir import send_fhir
from service.deliver.hl7 import send_hl7
from service.deliver.loop import drain_loop
from service.deliver.webhook import send_webhook
from service.metrics import Metrics
from service.results.schema import StudyResult
from service.store.notify import NotificationInfo, NotifyStore, shown_target

__all__ = ["SENDERS", "NotificationDelivery", "notification_targets"]

logger = logging.getLogger(__name__)

Sender = Callable[[NotificationInfo, NotifySettings], None]

SENDERS: dict[str, Sender] = {
    "webhook": send_webhook,
    "escalation": send_webhook,
    "hl7": send_hl7,
    "fhir": send_fhir,
}
"""Channel → sender (service.deliver.webhook, .hl7, .fhir)."""


def notification_targets(settings: NotifySettings) -> Callable[[StudyResult], list[tuple[str, str]]]:
    """Which notifications a stored result creates: webhooks for urgent/stat, HL7 and FHIR for every one.

    A webhook is an alert: it goes once per flag. The measured result that supersedes a job's
    measurements-pending one (its worklist entry took the flag earlier, ``worklist_updated`` before
    ``result_stored``) adds the measurements to the records (HL7, FHIR) and alerts nobody a second time.
    """

    def targets(result: StudyResult) -> list[tuple[str, str]]:
        out: list[tuple[str, str]] = []
        stamps = result.timestamps
        flagged_before = (
            stamps.worklist_updated is not None
            and stamps.result_stored is not None
            and stamps.worklist_updated < stamps.result_stored
        )
        if result.priority in ("stat", "urgent") and not flagged_before:
            out += [("webhook", url) for url in settings.webhooks]
        if result.findings:
            out += [("hl7", endpoint) for endpoint in settings.hl7_endpoints]
            if settings.fhir_base_url:
                out.append(("fhir", settings.fhir_base_url))
        return out

    return targets


class NotificationDelivery:
    def __init__(
        self,
        store: NotifyStore,
        settings: NotifySettings,
        *,
        poll_seconds: float = 1.0,
        metrics: Metrics | None = None,
    ) -> None:
        self.metrics = metrics  # attempts by channel and outcome
        self.store = store
        self.settings = settings
        self.poll = poll_seconds
        self.wanted = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._targets: dict[tuple[str, str], FailureLog] = {}

    def start(self) -> None:
        self._task = asyncio.create_task(
            drain_loop(self._step, self.wanted, poll=self.poll, next_due=self.store.next_due, name="notify"),
            name="notify",
        )

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _step(self) -> int:
        cfg = self.settings
        if cfg.escalation_minutes and cfg.escalation_webhooks:
            await self.store.escalate(cfg.escalation_minutes, cfg.escalation_webhooks)
        return await self.send_due()

    async def send_due(self) -> int:
        batch = await self.store.claim()
        await asyncio.gather(*(self._send(n) for n in batch))
        return len(batch)

    async def _send(self, n: NotificationInfo) -> None:
        sender = SENDERS.get(n.channel)
        error: str | None = None
        if sender is None:
            error = f"no sender for channel {n.channel!r}"
        else:
            try:
                await asyncio.to_thread(sender, n, self.settings)
            except Exception as exc:
                error = f"{type(exc).__name__}: {exc}"
        state = await self.store.finish(
            n, error=error, max_attempts=self.settings.max_attempts, backoff=self.settings.backoff_seconds
        )
        if self.metrics is not None:
            outcome = "done" if not error else "dead" if state == "dead" else "retry"
            self.metrics.notifications.labels(channel=n.channel, outcome=outcome).inc()
        target = self._targets.get((n.channel, n.target))
        if target is None:
            target = FailureLog(logger, f"{n.channel} notifications to {shown_target(n.target)}")
            self._targets[(n.channel, n.target)] = target
        if error is None:
            target.succeeded()
        elif state == "dead":
            logger.error("notification %d (%s) dead-lettered: %s", n.id, n.channel, error)
        else:
            target.failed(error)
