"""Alembic environment: runs on the connection :func:`service.store.migrate.upgrade` hands it.

``render_as_batch`` so that later ALTERs also work on SQLite (Alembic's batch mode copies the table).
"""

from __future__ import annotations

from alembic import context

from service.store.db import Base

connection = context.config.attributes["connection"]
context.configure(
    connection=connection,
    target_metadata=Base.metadata,
    render_as_batch=True,
    compare_type=True,
)
with context.begin_transaction():
    context.run_migrations()
