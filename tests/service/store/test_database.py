"""The database's writer: writes queued together share one transaction (group commit), and a failing one
fails alone."""

from __future__ import annotations

import asyncio
import shutil
import sqlite3
import threading
from pathlib import Path

import pytest
from sqlalchemy import bindparam, func, insert, select, update
from sqlalchemy.orm import Session

from service.clock import utcnow
from service.config import Settings
from service.store.database import Database
from service.store.db import StudyRow
from tests.service.store.kit import Kit

pytestmark = pytest.mark.anyio


def _write(s: Session, n: int, *, fail: bool = False) -> Session:
    """One study row; returns the session (which transaction it ran in: kept alive, so that two are never
    told apart by an ``id`` the first one's freeing gave back)."""
    now = utcnow()
    s.connection().execute(
        insert(StudyRow),
        {"study_uid": f"1.2.999.{n}", "first_received": now, "last_received": now, "instance_count": 0},
    )
    if fail:
        raise ValueError(f"write {n} refused")
    return s


def _count(s: Session) -> int:
    query = select(func.count()).select_from(StudyRow).where(StudyRow.study_uid.like("1.2.999.%"))
    return int(s.scalar(query) or 0)


async def _behind_a_busy_writer(kit: Kit, writes: list[tuple[int, bool]]) -> list[object]:
    """The writes queued while the writer thread is held by another transaction, then let go."""
    release = threading.Event()
    busy = asyncio.ensure_future(kit.db.run(lambda s: release.wait(10)))
    await asyncio.sleep(0.05)  # the writer is inside that transaction now
    queued = [asyncio.ensure_future(kit.db.run_grouped(_write, n, fail=fail)) for n, fail in writes]
    await asyncio.sleep(0.05)
    release.set()
    await busy
    return list(await asyncio.gather(*queued, return_exceptions=True))


async def test_writes_queued_together_share_one_transaction(kit: Kit) -> None:
    sessions = await _behind_a_busy_writer(kit, [(n, False) for n in range(5)])
    assert await kit.db.read(_count) == 5
    if kit.db.sqlite:  # one writer thread: one BEGIN and one COMMIT for the five
        assert len({id(x) for x in sessions}) == 1
    else:  # a server database: each its own transaction, as with run()
        assert len({id(x) for x in sessions}) == 5


async def test_a_failing_write_fails_alone(kit: Kit) -> None:
    """The shared transaction is rolled back and each write runs again on its own: the others are stored
    and answered, the failing one raises to its own caller and leaves nothing."""
    outcomes = await _behind_a_busy_writer(kit, [(0, False), (1, True), (2, False)])
    assert isinstance(outcomes[0], Session) and isinstance(outcomes[2], Session)
    assert isinstance(outcomes[1], ValueError) and "write 1 refused" in str(outcomes[1])
    assert await kit.db.read(_count) == 2


async def test_more_than_a_group_all_get_written(kit: Kit) -> None:
    from service.store.database import GROUP

    sessions = await _behind_a_busy_writer(kit, [(n, False) for n in range(GROUP + 5)])
    assert await kit.db.read(_count) == GROUP + 5
    if kit.db.sqlite:
        assert len({id(x) for x in sessions}) == 2  # a full group, then the rest in a turn of its own


_COUNT = select(StudyRow.instance_count).where(StudyRow.study_uid == bindparam("study"))


async def test_read_row_sees_every_commit_and_writes_nothing(kit: Kit) -> None:
    """The admit check's read (:meth:`Database.read_row`; on SQLite the thread's own connection, kept):
    each call sees the latest commit, never a snapshot of the connection's first use."""
    with pytest.raises(LookupError):
        kit.db.read_row(_COUNT, {"study": "1.2.999.0"})
    await kit.db.run(_write, 0)
    assert kit.db.read_row(_COUNT, {"study": "1.2.999.0"}) == (0,)
    await kit.db.run(lambda s: s.execute(update(StudyRow).values(instance_count=7)))
    assert kit.db.read_row(_COUNT, {"study": "1.2.999.0"}) == (7,)
    row = threading.Thread(target=lambda: kit.db.read_row(_COUNT, {"study": "1.2.999.0"}))
    row.start()  # another thread, its own connection
    row.join()
    if kit.db.sqlite:  # read-only, as the read engine's connections
        with pytest.raises(sqlite3.OperationalError, match="readonly"):
            kit.db.read_row(
                update(StudyRow).values(instance_count=bindparam("n")).returning(StudyRow.instance_count),
                {"n": 9},
            )
    assert kit.db.read_row(_COUNT, {"study": "1.2.999.0"}) == (7,)
    assert await kit.db.read(_count) == 1


def test_a_database_disk_that_filled_up_takes_writes_again_once_there_is_room(tmp_path: Path) -> None:
    """A 2 MiB disk for the database alone fills up: writes fail with StorageFullError; once the operator
    makes room, every later write succeeds and the WAL stays small. Before, SQLite's own checkpoint
    (at 4 MiB of WAL) never came on so small a disk: each commit appended to the WAL, and once room was
    made the WAL grew into it until the disk was full again (the reliability test's rows stayed
    uncommitted). :meth:`Database._restart_wal`."""
    from service.errors import StorageFullError
    from tests.fixtures.tmpfs import mounted_tmpfs

    with mounted_tmpfs(tmp_path / "tiny", "2m") as disk:
        db = Database(f"sqlite:///{disk / 'db.sqlite'}")
        try:
            filler = disk / "filler.bin"
            filler.write_bytes(b"\0" * (shutil.disk_usage(disk).free - 64 * 1024))
            written = 0
            with pytest.raises(StorageFullError):
                for written in range(10_000):  # noqa: B007 (the count is read after)
                    db.run_blocking(_write, written)
            filler.unlink()
            for n in range(written, written + 400):  # 400 single-row commits: ~5 MiB of WAL unchecked
                db.run_blocking(_write, n)
            assert db.run_blocking(_count) == written + 400
            assert (disk / "db.sqlite-wal").stat().st_size < 256 * 1024
        finally:
            db.close()


def test_an_sqlite_too_old_for_the_store_is_refused_clearly(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The ingest's upserts need ``RETURNING`` (SQLite 3.35): a Python linked against an older SQLite is
    told so at start, and by ``pacs-triage check``, rather than failing on the first study."""
    import sqlite3

    from service.preflight import _database

    monkeypatch.setattr(sqlite3, "sqlite_version_info", (3, 31, 1))
    with pytest.raises(RuntimeError, match="too old for the store, which needs 3.35.0"):
        Database(f"sqlite:///{tmp_path / 'db.sqlite'}")
    (finding,) = list(_database(Settings(data_dir=tmp_path)))
    assert not finding.ok and "PACS_TRIAGE_STORE__DATABASE_URL" in finding.detail
