"""Bring the database schema to the current revision with Alembic, at start-up, for both backends.

Several processes may start at once against one PostgreSQL (the scale-out roles): the upgrade runs under
a transaction-level advisory lock, so one migrates and the others find the schema current. A database
created before migrations existed (tables but no ``alembic_version``) is refused with a clear message
rather than half-upgraded.
"""

from __future__ import annotations

import logging
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, inspect, text

from service.errors import SchemaError

__all__ = ["alembic_config", "upgrade"]

logger = logging.getLogger(__name__)

MIGRATIONS = Path(__file__).with_name("migrations")
_LOCK_KEY = 0x70616373  # "pacs": the advisory lock all pacs-triage processes migrate under


def alembic_config() -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    return cfg


def upgrade(engine: Engine) -> None:
    """Apply every migration not yet applied (no-op when current)."""
    cfg = alembic_config()
    head = ScriptDirectory.from_config(cfg).get_current_head()
    with engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _LOCK_KEY})
        current = MigrationContext.configure(conn).get_current_revision()
        if current == head:
            return
        if current is None and inspect(conn).has_table("studies"):
            raise SchemaError(
                "the database was created by a pacs-triage without migrations; move it aside (it holds "
                "only job state: instances stay on disk) and start again"
            )
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "head")
        logger.info("database schema upgraded from %s to %s", current or "empty", head)
