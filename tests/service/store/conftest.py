"""Store fixtures: every store test runs on SQLite (the embedded default) and a real PostgreSQL (e2e)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from service.store.slots import SlotStore
from tests.fixtures.tmpfs import mounted_tmpfs
from tests.service.store.kit import Kit, open_kit


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.e2e)])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'db.sqlite'}"
    url: str = request.getfixturevalue("postgres_url")
    return url


@pytest.fixture
def kit(db_url: str, tmp_path: Path) -> Iterator[Kit]:
    k = open_kit(db_url, tmp_path)
    yield k
    k.close()


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """An 8 MiB tmpfs: a real file system that really fills up (mounting needs root; skipped otherwise)."""
    mnt = tmp_path / "small"
    with mounted_tmpfs(mnt, "8m"):
        yield mnt


@pytest.fixture
def directory(tmp_path: Path) -> Path:
    return tmp_path / "slots"


@pytest.fixture
def slots(directory: Path) -> Iterator[SlotStore]:
    """A slot store on an empty directory, its maker running (service/store/slots.py)."""
    s = SlotStore(directory)
    assert s.open() == ([], 0)
    s.start()
    yield s
    s.close()
