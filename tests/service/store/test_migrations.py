"""Migrations: the Alembic head equals the models (no forgotten revision), on SQLite and PostgreSQL."""

from __future__ import annotations

from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import create_engine

from service.errors import SchemaError
from service.store.database import Database
from service.store.db import Base
from service.store.migrate import upgrade


def _diff(url: str) -> list[object]:
    db = Database(url)  # runs the migrations
    try:
        with db.engine.connect() as conn:
            return list(compare_metadata(MigrationContext.configure(conn), Base.metadata))
    finally:
        db.close()


def test_sqlite_head_matches_the_models(tmp_path: Path) -> None:
    assert _diff(f"sqlite:///{tmp_path / 'db.sqlite'}") == []


@pytest.mark.e2e
def test_postgres_head_matches_the_models(postgres_url: str) -> None:
    assert _diff(postgres_url) == []


def test_upgrade_is_idempotent_and_refuses_a_pre_migration_database(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    Database(url).close()
    Database(url).close()  # a second start finds the schema current
    old = create_engine(f"sqlite:///{tmp_path / 'old.sqlite'}")
    Base.metadata.create_all(old)  # how the store was created before migrations existed
    with pytest.raises(SchemaError, match="move it aside"):
        upgrade(old)
    old.dispose()
