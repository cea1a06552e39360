"""The service's one clock: timezone-aware UTC.

Every hop time, lease and gate is compared across processes (several workers on one PostgreSQL), so all
of them are aware datetimes in UTC; a naive local time would shift by the zone offset. Kept in a module of
its own so that importing a clock never imports the store (it used to live in ``store/db.py``).
"""

from __future__ import annotations

from datetime import UTC, datetime

__all__ = ["utcnow"]


def utcnow() -> datetime:
    """Now, timezone-aware, in UTC."""
    return datetime.now(UTC)
