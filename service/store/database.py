"""The database: one engine for writes, one for reads, the threads that run SQL, the SQLite settings.

Synchronous SQLAlchemy calls run on dedicated threads, never on the event loop. Writes go to a writer pool:
one thread for SQLite, which serialises writers anyway (one writer thread turns "database is locked"
retries into a plain queue and makes check-then-insert race-free), four for a server database (the
duplicate checks then also rely on primary keys and the one-pending-job index). Reads (the worklist, a
result, lists) go to a reader pool on their own connections: SQLite in WAL mode lets readers run while the
writer commits, so a page refreshing the worklist never queues ingest behind it. On SQLite the hot path's
writes (an ingest's rows, a result's save) queued while the writer is busy share one transaction
(:meth:`Database.run_grouped`, group commit): one ``BEGIN``/``COMMIT`` for several studies.

Why WAL with ``synchronous=FULL`` by default: the API promises an instance is durable before it answers
202. In WAL mode ``NORMAL`` keeps the database consistent after a power cut but may lose the last commits,
i.e. instances a client was told were stored; ``FULL`` fsyncs the WAL on every commit, which costs ~1 ms
per commit on our disks. ``NORMAL`` is a setting away for deployments that accept that risk.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Concatenate, ParamSpec, TypeVar, cast

from sqlalchemy import Engine, Executable, create_engine, event
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session
from sqlalchemy.sql.compiler import SQLCompiler

from service.errors import StorageFullError
from service.store.files import disk_space
from service.store.migrate import upgrade

__all__ = ["SQLITE_MINIMUM", "Database", "is_database_full", "sqlite_too_old"]

logger = logging.getLogger(__name__)

P = ParamSpec("P")
T = TypeVar("T")

READERS = 4
"""Reader threads (and connections): enough for a few worklist pages and result polls at once."""

SQLITE_MINIMUM = (3, 35, 0)
"""The oldest SQLite the store runs on: the ingest's upserts read their count back with ``RETURNING``
(SQLite 3.35, 2021; Debian 12 ships 3.40). Python uses the SQLite library it was linked with."""

WAL_ROOM = 8 << 20
"""Free space on the database's disk below which each write is preceded by a WAL checkpoint
(:meth:`Database._restart_wal`): twice the WAL that SQLite's own checkpoints let grow (1,000 pages)."""

CHECKPOINT_WAIT_MS = 200
"""How long that checkpoint waits for readers to move on before the write goes ahead without it."""

GROUP = 32
"""At most this many queued writes share one transaction (:meth:`Database.run_grouped`)."""


class _Queued:
    """A write waiting for the writer thread, with the future its caller awaits."""

    __slots__ = ("args", "fn", "future", "kwargs")

    def __init__(self, fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        self.fn, self.args, self.kwargs = fn, args, kwargs
        self.future: Future[Any] = Future()


def sqlite_too_old() -> str:
    """Why this Python's SQLite cannot hold the store (said at start and by ``pacs-triage check``)."""
    wanted = ".".join(map(str, SQLITE_MINIMUM))
    return (
        f"SQLite {sqlite3.sqlite_version} is too old for the store, which needs {wanted} or newer"
        " (INSERT ... RETURNING): run a Python linked against a newer SQLite (the Docker image has one),"
        " or use PostgreSQL (PACS_TRIAGE_STORE__DATABASE_URL)"
    )


def is_database_full(exc: OperationalError) -> bool:
    """SQLite's SQLITE_FULL (13) or PostgreSQL's disk_full (SQLSTATE 53100)."""
    orig = exc.orig
    return getattr(orig, "sqlite_errorcode", None) == 13 or getattr(orig, "sqlstate", None) == "53100"


def _sqlite_engine(url: str, synchronous: str, *, writer: bool) -> Engine:
    engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False})

    @event.listens_for(engine, "connect")
    def _pragmas(dbapi_conn: Any, _record: Any) -> None:
        # Python's sqlite3 commits DDL on its own, so a migration killed halfway would leave tables
        # without their alembic stamp: take transactions over (SQLAlchemy's documented recipe).
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute(f"PRAGMA synchronous={synchronous}")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.execute("PRAGMA busy_timeout=30000")
        if not writer:
            cur.execute("PRAGMA query_only=ON")  # a read connection that tries to write is a bug
        cur.close()

    if writer:

        @event.listens_for(engine, "begin")
        def _begin(conn: Any) -> None:
            # IMMEDIATE takes the write lock up front, so a second writer (another process) waits
            # (busy_timeout) instead of failing when its read turns into a write. Readers issue no BEGIN:
            # each query reads the latest committed state and never takes the lock (a round trip less).
            conn.exec_driver_sql("BEGIN IMMEDIATE")

    return engine


class Database:
    """Engines and threads; :meth:`run` a write transaction, :meth:`read` a read-only one.

    ``shared`` is True for a server database that other processes use too: leases instead of resetting at
    start, ``SKIP LOCKED`` claims. SQLite belongs to one process.
    """

    def __init__(self, url: str, *, sqlite_synchronous: str = "FULL") -> None:
        self.sqlite = url.startswith("sqlite")
        self.shared = not self.sqlite
        if self.sqlite and sqlite3.sqlite_version_info < SQLITE_MINIMUM:
            raise RuntimeError(sqlite_too_old())
        if self.sqlite:
            self.engine = _sqlite_engine(url, sqlite_synchronous, writer=True)
            upgrade(self.engine)  # before the readers connect: query_only connections cannot migrate
            self.read_engine = _sqlite_engine(url, sqlite_synchronous, writer=False)
        else:
            self.engine = create_engine(url, pool_pre_ping=True, pool_size=READERS + 4)
            upgrade(self.engine)
            self.read_engine = self.engine
        self._writer = ThreadPoolExecutor(max_workers=1 if self.sqlite else 4, thread_name_prefix="db-write")
        self._grouped: list[_Queued] = []  # writes waiting for a shared transaction (SQLite)
        self._group_lock = threading.Lock()
        self._readers = ThreadPoolExecutor(max_workers=READERS, thread_name_prefix="db-read")
        path = self.read_engine.url.database if self.sqlite else None
        self._own_path = (
            path if path and path != ":memory:" and "mode=memory" not in str(self.read_engine.url) else None
        )
        self._own = threading.local()  # the calling thread's sqlite3 connection (read_row)
        self._owned: list[sqlite3.Connection] = []  # every thread's, closed by close()
        self._owned_lock = threading.Lock()
        self._compiled: dict[int, tuple[str, tuple[str, ...]]] = {}
        self._wal_full = False  # a write failed with SQLITE_FULL: checkpoint before the next one
        logger.info("store opened (%s)", self.engine.url.render_as_string(hide_password=True))

    def transaction(self, fn: Callable[Concatenate[Session, P], T], *args: P.args, **kwargs: P.kwargs) -> T:
        """``fn(session, ...)`` in one write transaction, on the calling thread (the writer pool's)."""
        if self._own_path is not None and (self._wal_full or self._disk_short()):
            self._restart_wal()
        try:
            with Session(self.engine) as s, s.begin():
                return fn(s, *args, **kwargs)
        except OperationalError as exc:
            if is_database_full(exc):  # the sender should retry later (0xA700 / 507), like a full disk
                self._wal_full = True
                raise StorageFullError("the database has no space left; try again later") from exc
            raise

    def _disk_short(self) -> bool:
        """The database's disk has less room than SQLite's own checkpoints need (:meth:`_restart_wal`).
        A ``statvfs`` (~2 µs) per write transaction."""
        assert self._own_path is not None
        try:
            return disk_space(Path(self._own_path).absolute().parent).available < WAL_ROOM
        except OSError:
            return False

    def _restart_wal(self) -> None:
        """Copy the WAL into the database and have the next write start it over, on a disk nearly full.

        SQLite checkpoints a WAL on its own once it holds ``wal_autocheckpoint`` pages (1,000: 4 MiB) and
        then reuses the file from its start. On a disk with less room than that, no checkpoint ever runs:
        every commit appends to the WAL (a row of one instance rewrites ~8 pages of its tables and
        indexes, 32 KiB), the disk fills, and when the operator makes room the retries grow the WAL into
        it again, until nothing is left for the database file itself: acknowledged instances' rows stayed
        uncommitted for good (tests/reliability/test_faults.py with a 100 ms placer linger, 5 of 5 runs:
        a 2 MiB database disk, 200 KiB of database and 1.8 MiB of WAL, 13 rows left). So while the disk
        has less than :data:`WAL_ROOM` free, or after a write failed with SQLITE_FULL, each write is
        preceded by a ``RESTART`` checkpoint (https://sqlite.org/pragma.html#pragma_wal_checkpoint,
        https://sqlite.org/wal.html#ckpt): the write then reuses the WAL from its start, so the WAL file
        never grows past the largest transaction and the disk's room goes to the database file. Not
        ``TRUNCATE``: the free space would then rise and fall with every transaction, and an instance
        refused for want of room could fit a moment later (a CI run: a 512 KiB radiograph stored, 202,
        right after a CT slice a third its size was refused at the watermark). A checkpoint waits for
        readers to reach the latest snapshot: at most :data:`CHECKPOINT_WAIT_MS` here, then the write goes
        ahead without it. Runs on the writer thread, outside a transaction."""
        raw = self.engine.raw_connection()
        try:
            cur = raw.cursor()
            cur.execute(f"PRAGMA busy_timeout={CHECKPOINT_WAIT_MS}")
            try:
                busy, _log, _done = cur.execute("PRAGMA wal_checkpoint(RESTART)").fetchone()
            finally:
                cur.execute("PRAGMA busy_timeout=30000")
        except sqlite3.Error as exc:
            logger.debug("WAL checkpoint on a short disk failed (%s)", type(exc).__name__)
            return
        finally:
            raw.close()
        if not busy and self._wal_full:
            self._wal_full = False
            logger.debug("store: WAL checkpointed after the database disk was full")

    def snapshot(self, fn: Callable[Concatenate[Session, P], T], *args: P.args, **kwargs: P.kwargs) -> T:
        """``fn(session, ...)`` on a read connection, on the calling thread. On SQLite each query sees the
        latest commit (no enclosing transaction): readers that need two queries to agree re-check on write,
        as :meth:`service.store.results.Results.save` does."""
        with Session(self.read_engine) as s, s.begin():
            return fn(s, *args, **kwargs)

    async def run(self, fn: Callable[Concatenate[Session, P], T], *args: P.args, **kwargs: P.kwargs) -> T:
        """:meth:`transaction` on the writer pool, awaited from the event loop."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._writer, lambda: self.transaction(fn, *args, **kwargs))

    async def run_grouped(
        self, fn: Callable[Concatenate[Session, P], T], *args: P.args, **kwargs: P.kwargs
    ) -> T:
        """:meth:`run`, sharing its transaction with the writes queued beside it (group commit).

        For the per-study hot path (an ingest's rows, a result's save) on SQLite, where one writer thread
        runs every write in turn: each transaction cost a ``BEGIN IMMEDIATE`` and a ``COMMIT`` (the WAL's
        fsync) besides its own statements, and on the writer each statement waits for the GIL again, so
        under concurrent load the two were half of a transaction's time (bench/RESULTS.md, session 12).
        Writes queued while the writer is busy now run one after another in one transaction, and every
        caller is answered after its ``COMMIT``: nothing is reported before it is durable. If any of them
        raises, the shared transaction is rolled back and each is run again in a transaction of its own, so
        a failure (a stale result, a lease lost, a full disk) is its caller's alone, as before. ``fn`` must
        therefore touch nothing but the session. On a server database (several writer threads and
        processes, row locks held to the end of a transaction) this is :meth:`run`."""
        if not self.sqlite:
            return await self.run(fn, *args, **kwargs)
        item = _Queued(fn, args, kwargs)
        with self._group_lock:
            self._grouped.append(item)
            first = len(self._grouped) == 1
        if first:  # the writer takes every write queued by the time it gets to this one
            self._writer.submit(self._write_group)
        result: T = await asyncio.wrap_future(item.future)
        return result

    def _write_group(self) -> None:
        """One shared transaction for the writes queued now (on the writer thread); the next ones get a
        turn of their own, behind the other writes queued meanwhile."""
        while True:
            with self._group_lock:
                batch, self._grouped = self._grouped[:GROUP], self._grouped[GROUP:]
                more = bool(self._grouped)
            if more:
                try:
                    self._writer.submit(self._write_group)
                    more = False
                except RuntimeError:  # shutting down: no new turns, so drain what is left here
                    pass
            self._write_batch(batch)
            if not more:
                return

    def _write_batch(self, batch: list[_Queued]) -> None:
        if not batch:
            return
        try:
            results = self.transaction(lambda s: [q.fn(s, *q.args, **q.kwargs) for q in batch])
        except Exception as exc:
            if len(batch) == 1:
                batch[0].future.set_exception(exc)
                return
            for q in batch:  # rolled back together; now each alone, so that a failure is its own
                try:
                    q.future.set_result(self.transaction(q.fn, *q.args, **q.kwargs))
                except Exception as own:
                    q.future.set_exception(own)
            return
        for q, r in zip(batch, results, strict=True):
            q.future.set_result(r)

    async def read(self, fn: Callable[Concatenate[Session, P], T], *args: P.args, **kwargs: P.kwargs) -> T:
        """:meth:`snapshot` on the reader pool: never queues behind ingest."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._readers, lambda: self.snapshot(fn, *args, **kwargs))

    def run_blocking(self, fn: Callable[Concatenate[Session, P], T], *args: P.args, **kwargs: P.kwargs) -> T:
        """:meth:`run` from a thread that has no event loop (a DICOM association's thread)."""
        return self._writer.submit(lambda: self.transaction(fn, *args, **kwargs)).result()

    def read_blocking(self, fn: Callable[Concatenate[Session, P], T], *args: P.args, **kwargs: P.kwargs) -> T:
        """:meth:`read` from a thread that has no event loop: on the calling thread itself."""
        return self.snapshot(fn, *args, **kwargs)

    def read_row(self, statement: Executable, params: dict[str, Any]) -> tuple[Any, ...]:
        """The one row of a prepared read, on the calling thread (:class:`LookupError` if none).

        For the admit check on every C-STORE's answer path (:meth:`Instances.admit_blocking`). On a SQLite
        file, through a ``sqlite3`` connection the thread keeps (read-only, as the read engine's): a
        pooled SQLAlchemy connection's checkout, execution context and result cost ~8x the query itself
        (33 against 4 µs here); elsewhere, through the read engine. Values come as the driver gives them,
        without SQLAlchemy's type processing: for text and integer columns only (no datetimes, enums)."""
        if self._own_path is None:
            with self.read_engine.connect() as conn:
                found = conn.execute(statement, params).first()
            if found is None:
                raise LookupError("the query returned no row")
            return tuple(found)
        own: sqlite3.Connection | None = getattr(self._own, "conn", None)
        if own is None:
            own = sqlite3.connect(self._own_path, timeout=30, check_same_thread=False, isolation_level=None)
            own.execute("PRAGMA busy_timeout=30000")
            own.execute("PRAGMA query_only=ON")
            with self._owned_lock:
                self._owned.append(own)
            self._own.conn = own
        sql, names = self._compiled.get(id(statement)) or self._compile(statement)
        row = own.execute(sql, [params[n] for n in names]).fetchone()
        if row is None:
            raise LookupError("the query returned no row")
        return tuple(row)

    def _compile(self, statement: Executable) -> tuple[str, tuple[str, ...]]:
        compiled = cast(SQLCompiler, statement.compile(dialect=self.read_engine.dialect))  # type: ignore[attr-defined]
        entry = (str(compiled), tuple(compiled.positiontup or ()))
        self._compiled[id(statement)] = entry
        return entry

    def close(self) -> None:
        self._writer.shutdown(wait=True)
        self._readers.shutdown(wait=True)
        with self._owned_lock:
            owned, self._owned = self._owned, []
        for conn in owned:
            conn.close()
        self.engine.dispose()
        self.read_engine.dispose()
