"""Results back to the PACS: render each new result's SR and preview, then C-STORE them from the outbox.

Two loops on the event loop, each waking on the notifier and otherwise polling:

- **render**: results with no objects yet → :func:`service.deliver.render.render_objects` in a thread →
  recorded with one delivery per destination (:class:`service.store.outbox.Outbox`);
- **send**: due deliveries, most urgent first, grouped by destination into one association each
  (:func:`service.deliver.scu.send`); success is final, failure retries with exponential backoff until
  ``delivery.max_attempts``, then the delivery is dead-lettered (``GET /v1/deliveries?state=dead``). A
  destination's failures are logged when its state changes (:class:`service.backoff.FailureLog`), each
  object's attempts at DEBUG, a dead letter at ERROR.
"""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict
from typing import Any

from service.backoff import FailureLog
from service.config import Settings
from service.deliver.association import Peer
from service.deliver.loop import drain_loop
from service.deliver.render import RenderRequest, render_objects
from service.deliver.scu import send
from service.dicom.tls import TlsClient
from service.errors import DicomPeerError
from service.results.preview import referenced_instances
from service.results.schema import StudyResult
from service.store.outbox import DeliveryInfo, Outbox

__all__ = ["DicomDelivery"]

logger = logging.getLogger(__name__)


class DicomDelivery:
    """The render and send loops; :meth:`start` / :meth:`stop` from the app lifespan."""

    def __init__(self, outbox: Outbox, settings: Settings, *, metrics: Any = None) -> None:
        self.outbox = outbox
        self.settings = settings
        self.metrics = metrics
        self.render_wanted = asyncio.Event()
        self.send_wanted = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        s = settings.delivery
        self.destinations = [str(Peer.parse(d)) for d in s.destinations]
        self._failures: dict[str, FailureLog] = {}  # by destination
        self.calling_ae = s.calling_ae or settings.dicom.ae_title
        self.tls = TlsClient(s.tls_ca_file, s.tls_cert_file, s.tls_key_file) if s.tls else None
        if self.tls is not None:
            self.tls.context()  # a missing or mismatched file fails the start, not every delivery

    def start(self) -> None:
        poll = self.settings.worker.poll_seconds * 4
        self._tasks = [
            asyncio.create_task(
                drain_loop(self.render_pending, self.render_wanted, poll=poll, name="render"), name="render"
            ),
            asyncio.create_task(
                drain_loop(
                    self.send_due, self.send_wanted, poll=poll, next_due=self.outbox.next_due, name="send"
                ),
                name="send",
            ),
        ]

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []

    # ---- render ------------------------------------------------------------------------------------

    async def render_pending(self) -> int:
        pending = await self.outbox.pending_renders()
        for p in pending:
            await self.render(p.result)
        return len(pending)

    async def render(self, result: StudyResult) -> None:
        s = self.settings.delivery
        outputs = []
        if self.destinations and (s.send_sr or s.send_preview or s.send_kos or s.send_gsps or s.send_seg):
            sources = await self.outbox.source_paths(referenced_instances(result))
            req = RenderRequest(
                result=result,
                sources=sources,
                predecessor=await self.outbox.latest_sr(result.study_uid),
                send_sr=s.send_sr,
                send_preview=s.send_preview,
                send_kos=s.send_kos,
                send_seg=s.send_seg,
                send_gsps=s.send_gsps,
            )
            try:
                outputs = await asyncio.to_thread(render_objects, req, self.outbox.outputs_dir)
            except Exception:  # a result we cannot render must not block the ones behind it
                logger.exception("rendering the DICOM objects of result %s failed", result.result_id)
        await self.outbox.record(result, outputs, self.destinations if outputs else [])
        if outputs:
            logger.info("result %s: %d object(s) queued for delivery", result.result_id, len(outputs))
            self.send_wanted.set()

    # ---- send --------------------------------------------------------------------------------------

    async def send_due(self) -> int:
        batch = await self.outbox.claim()
        by_dest: dict[str, list[DeliveryInfo]] = defaultdict(list)
        for d in batch:  # claim() orders by priority; dict order keeps the most urgent destination first
            by_dest[d.destination].append(d)
        for dest, items in by_dest.items():
            await self._send(dest, items)
        return len(batch)

    async def _send(self, dest: str, items: list[DeliveryInfo]) -> None:
        errors: list[str | None]
        kind: str | None = None  # for the destination's failure log: one WARNING per kind of outage
        try:
            outcomes = await asyncio.to_thread(
                send, Peer.parse(dest), [d.path for d in items], calling_ae=self.calling_ae, tls=self.tls
            )
            errors = [None if o.ok else (o.error or f"status 0x{o.status:04X}") for o in outcomes]
        except DicomPeerError as exc:
            errors, kind = [str(exc)] * len(items), exc.reason
        except Exception as exc:  # an unreadable output file or a bug: recorded on each item, retried
            logger.exception("sending to %s failed", dest)
            errors = [f"{type(exc).__name__}: {exc}"] * len(items)
        s = self.settings.delivery
        for d, err in zip(items, errors, strict=True):
            state = await self.outbox.finish(
                d.id,
                error=err,
                max_attempts=s.max_attempts,
                backoff=s.backoff_seconds,
                backoff_max=s.backoff_max_seconds,
            )
            outcome = {"done": "done", "dead": "dead"}.get(state, "retry")
            if self.metrics is not None:
                self.metrics.deliveries.labels(destination=dest, outcome=outcome).inc()
            if state == "dead":
                logger.error("delivery %d of a %s to %s dead-lettered: %s", d.id, d.kind, dest, err)
            elif err:
                logger.debug("delivery %d to %s failed (attempt %d): %s", d.id, dest, d.attempts + 1, err)
        # The destination's state, logged when it changes (one WARNING when it starts failing, one INFO when
        # it recovers), not once per object and attempt: a PACS down for an hour with a backlog wrote a line
        # for every object at every retry.
        failures = self._failures.setdefault(dest, FailureLog(logger, f"delivery to {dest}"))
        first_error = next((e for e in errors if e), None)
        if first_error is None:
            failures.succeeded()
        else:
            failures.failed(first_error, kind=kind)
