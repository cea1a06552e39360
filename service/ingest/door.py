"""Who may hold a connection to the listener: not-yet-associated connections and association slots.

Issue 20 found the door of a pynetdicom listener held shut by 16 connections that each sent six bytes: a
slot was counted from the TCP accept, with no deadline on a half-sent PDU. Here a connection is *pending*
from its accept until its A-ASSOCIATE-RQ has been read and its AE titles checked; only then does it take
one of ``max_associations`` slots (PS3.8 leaves the limit to us: "local limit exceeded", Table 9-21).
Pending connections have their own small cap, overall and per source address; when a new connection would
go over it, the *oldest* pending connection of the address with most pending connections is closed (a
modality's A-ASSOCIATE-RQ follows its connect within milliseconds, so the oldest pending ones are the
silent ones). A flood from one address therefore only pushes out its own connections, and a real sender
still gets in. Pending connections also have a deadline (ARTIM, PS3.8 9.1.4) enforced by the acceptor.
The log names the peer that was closed, never the next sender.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

__all__ = ["Door", "Visitor"]

logger = logging.getLogger(__name__)


@dataclass(eq=False)
class Visitor:
    """One accepted connection: its peer and how to close it at once (an abort, no goodbye)."""

    host: str
    port: int
    close: Callable[[], None]
    since: float = field(default_factory=time.monotonic)
    associated: bool = False

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

    def arrive(self, visitor: Visitor) -> None:
        """A new connection; may close older pending ones to make room (see the module docstring)."""
        same = [v for v in self.pending if v.host == visitor.host]
        if len(same) >= self.max_pending_per_address:
            self._push_out(same[0], f"more than {self.max_pending_per_address} from {visitor.host}")
        if len(self.pending) >= self.max_pending:
            busiest, _ = Counter(v.host for v in self.pending).most_common(1)[0]
            oldest = next(v for v in self.pending if v.host == busiest)
            self._push_out(oldest, f"more than {self.max_pending} connections waiting overall")
        self.pending[visitor] = None

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
