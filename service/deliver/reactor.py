"""pynetdicom's association reactor, without the race that takes a C-STORE response from its sender.

Why: an association's thread runs a reactor loop that takes incoming DIMSE messages off the queue and
serves them as requests; a ``send_c_store`` (and every other ``send_*``) pauses it first, by clearing
``_reactor_checkpoint`` and waiting until the loop says ``_is_paused``. In pynetdicom 3.0.4 (and its main
branch as of 2026-12) the loop says ``_is_paused = True`` *before* it waits on the checkpoint and only says
``False`` after: when the wait has just returned (the checkpoint was still set) and the sender clears it in
that moment, the sender reads the stale ``True``, sends, and the loop goes on to take the peer's response
off the queue ("Received unexpected C-STORE service message"). The sender then waits a whole DIMSE timeout
and aborts the association; the objects left in the batch are not sent (seen in CI on a busy machine:
78 of 128 objects stored, then 30 s lost; the same race is reported as pynetdicom#875 for C-FIND).

The loop below is pynetdicom 3.0.4's ``Association._run_reactor`` with one check added: after the wait, if
the checkpoint is no longer set, a sender has paused the loop meanwhile and nothing is taken. Installed on
each association our AE makes (:class:`service.deliver.association.ScuAE`), before it starts.
"""

from __future__ import annotations

import logging
import time
import types
from typing import cast

from pynetdicom import evt
from pynetdicom.association import Association

__all__ = ["install"]

LOGGER = logging.getLogger("pynetdicom.association")  # the lines pynetdicom's own loop writes


def install(assoc: Association) -> None:
    """Run ``assoc`` with the loop below instead of pynetdicom's (call before the association starts)."""
    setattr(assoc, "_run_reactor", types.MethodType(_run_reactor, assoc))  # noqa: B010 (mypy: a method)


def _run_reactor(self: Association) -> None:
    """pynetdicom 3.0.4's reactor loop (MIT licence), with the pause re-checked after the wait."""
    self._is_paused = False
    while not self._kill:
        time.sleep(0.001)
        self._is_paused = True
        self._reactor_checkpoint.wait()
        self._is_paused = False
        if not self._reactor_checkpoint.is_set():
            # A sender cleared the checkpoint after the wait returned and may have read the stale
            # ``_is_paused = True``: its response is its own. Go round and pause properly.
            continue

        context_id, msg = self.dimse.get_msg(block=False)
        if msg:
            self._serve_request(msg, cast(int, context_id))

        if self.is_established and self.acse.is_release_requested():
            self.acse.send_release(is_response=True)
            LOGGER.info("Association Released")
            self.is_released = True
            self.is_established = False
            evt.trigger(self, evt.EVT_RELEASED, {})
            self.kill()
            return

        if self.acse.is_aborted():
            log_msg = "Association Aborted"
            if self.acse.is_aborted("a-p-abort"):
                log_msg += " (A-P-ABORT)"
            LOGGER.info(log_msg)
            self.dul.receive_pdu(wait=False)  # EVT_ACSE_RECV fires for subscribers
            self.is_aborted = True
            self.is_established = False
            evt.trigger(self, evt.EVT_ABORTED, {})
            self.kill()
            return

        if not self.dul.is_alive():
            self.kill()
            return

        if self.dul.idle_timer_expired():
            LOGGER.error("Network timeout reached")
            if self.network_timeout_response == "A-RELEASE":
                self._is_paused = True
                self._reactor_checkpoint.wait()
                self.release()
                self._is_paused = False
            else:
                self.abort()
            self.kill()
            return
