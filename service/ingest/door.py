"""Who may hold a connection to the listener: not-yet-associated connections and association slots.

Issue 20 found the door of a pynetdicom listener held shut by 16 connections that each sent six bytes: a
slot was counted from the TCP accept, with no deadline on a half-sent PDU. Here a connection is *pending*
from its accept until its A-ASSOCIATE-RQ has been read and its AE titles checked; only then does it take
one of ``max_associations`` slots (PS3.8 leaves the limit to us: "local limit exceeded", Table 9-21).
Pending connections have their own small cap, overall and per source address; when a new connection would
go over it, the *oldest* pending connection of the address with most pending connections is closed (a
modality's A-ASSOCIATE-RQ follows its connect within milliseconds, so the oldest pending ones are the
silent ones), if it has sent nothing for :data:`SILENT_GRACE_S`. A flood from one address therefore only
pushes out its own connections, and a real sender still gets in. Pending connections also have a deadline
(ARTIM, PS3.8 9.1.4) enforced by the acceptor.
The log names the peer that was closed, never the next sender.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

__all__ = ["HARD_FACTOR", "SILENT_GRACE_S", "Door", "Visitor", "spoke_check"]

logger = logging.getLogger(__name__)

HARD_FACTOR = 4
"""Pending connections that all talk may exceed ``max_pending`` up to this factor; then new ones are
refused."""

SILENT_GRACE_S = 0.5
"""A pending connection is pushed out for its silence only once it has been silent this long. A modality
sends its A-ASSOCIATE-RQ right after connecting, but in a burst (twenty ``storescu`` from one address in the
CI load test, on a loaded machine) the next connection can be accepted before an earlier sender has written
its request: one was closed "after 0.0 s", a transfer lost. Meanwhile the caps may be exceeded, up to the
hard ceiling (:data:`HARD_FACTOR`)."""


@dataclass(eq=False)
class Visitor:
    """One accepted connection: its peer and how to close it at once (an abort, no goodbye)."""

    host: str
    port: int
    close: Callable[[], None]
    since: float = field(default_factory=time.monotonic)
    associated: bool = False
    spoke: Callable[[], bool] = lambda: False
    """Whether the peer has sent any byte yet (read, or waiting in the kernel)."""

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"


class Door:
    """Counts pending connections and association slots; every method runs on the listener's event loop."""

    def __init__(self, *, max_associations: int, max_pending: int, max_pending_per_address: int) -> None:
        self.max_associations = max_associations
        self.max_pending = max_pending
        self.max_pending_per_address = max_pending_per_address
        self.pending: dict[Visitor, None] = {}  # insertion order: oldest first
        self.associated: set[Visitor] = set()

    def arrive(self, visitor: Visitor) -> bool:
        """A new connection; may close older silent pending ones to make room (see the module docstring).

        Only a connection that has sent nothing for :data:`SILENT_GRACE_S` is pushed out: a burst of real
        senders (twenty modalities behind one router, a loaded receiver that has not read their requests
        yet) have their A-ASSOCIATE-RQ on the wire, or will within the grace. When none is silent the caps
        are exceeded, up to a hard ceiling of
        ``HARD_FACTOR`` times ``max_pending``; past it the new connection is refused (False: close it).
        """
        quiet_since = time.monotonic() - SILENT_GRACE_S  # pending since before this, and silent: pushed out
        same = [v for v in self.pending if v.host == visitor.host]
        if len(same) >= self.max_pending_per_address:
            silent = next((v for v in same if v.since <= quiet_since and not v.spoke()), None)
            if silent is not None:
                self._push_out(silent, f"more than {self.max_pending_per_address} from {visitor.host}")
        if len(self.pending) >= self.max_pending:
            busiest, _ = Counter(v.host for v in self.pending).most_common(1)[0]
            silent = next(
                (v for v in self.pending if v.host == busiest and v.since <= quiet_since and not v.spoke()),
                None,
            )
            if silent is not None:
                self._push_out(silent, f"more than {self.max_pending} connections waiting overall")
        if len(self.pending) >= HARD_FACTOR * self.max_pending:
            logger.warning(
                "refused the connection from %s: %d connections wait for association, all of them talking",
                visitor,
                len(self.pending),
            )
            return False
        self.pending[visitor] = None
        return True

    def associate(self, visitor: Visitor) -> bool:
        """Take an association slot for a pending connection whose request passed its checks; False: full."""
        self.pending.pop(visitor, None)
        if len(self.associated) >= self.max_associations:
            return False
        visitor.associated = True
        self.associated.add(visitor)
        return True

    def leave(self, visitor: Visitor) -> None:
        """The connection is closed (any way): its pending place or slot is free at once."""
        self.pending.pop(visitor, None)
        self.associated.discard(visitor)

    @property
    def in_use(self) -> int:
        return len(self.associated)

    def _push_out(self, visitor: Visitor, why: str) -> None:
        self.pending.pop(visitor, None)
        logger.warning(
            "closed the connection from %s: no A-ASSOCIATE-RQ after %.1f s and %s",
            visitor,
            time.monotonic() - visitor.since,
            why,
        )
        visitor.close()


def spoke_check(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> Callable[[], bool]:
    """Has the peer sent anything: bytes read already, or bytes waiting in the kernel that a loop busy with
    a burst of connections has not read yet (a modality sends its A-ASSOCIATE-RQ right after connecting)."""
    sock = writer.get_extra_info("socket")

    def spoke() -> bool:
        if getattr(reader, "heard", False):
            return True
        if sock is None:
            return False
        try:
            with socket.socket(fileno=os.dup(sock.fileno())) as peek:
                return bool(peek.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT))
        except OSError:  # nothing waiting (EAGAIN), or the socket is gone
            return False

    return spoke
