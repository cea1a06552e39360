"""A real PostgreSQL (the Debian package's server) as the shared store and job queue for end-to-end tests.

Each `Postgres` is a private cluster: its own ``initdb``, data directory, log and loopback port, so tests
(and concurrent test runs) never touch a system cluster, /var/run/postgresql or port 5432. Facts this relies
on:

- The binaries live in a versioned directory, /usr/lib/postgresql/<major>/bin (Debian 12: 15); the newest
  installed major is used.
- The server refuses to run as root ("root" execution of the PostgreSQL server is not permitted), and CI
  runs as root. As root, initdb and the server run as the ``postgres`` system user that the Debian package
  creates, and the cluster lives in a private ``pacs-triage-pg-*`` directory under the system temp dir
  owned by that user: pytest's ``/tmp/pytest-of-root`` is mode 0700, so the unprivileged server could not
  reach a data directory under ``tmp_path``. That directory is removed by `stop()`. As any other user the
  cluster runs as that user under ``tmp_dir``. Either way the log is ``tmp_dir/postgres.log``.
- Authentication is ``trust`` and the server listens on 127.0.0.1 only; the superuser is ``postgres``
  whoever runs it, so URLs look the same everywhere.

Use the fixtures (registered for every test by ``pytest_plugins`` in tests/conftest.py): ``postgres_url``
is a fresh, empty database per test on one session-wide server (``postgres_server``)::

    def test_x(postgres_url: str) -> None:
        engine = create_engine(postgres_url)   # postgresql+psycopg://postgres@127.0.0.1:PORT/DBNAME

or a private server as a context manager, e.g. for a benchmark with durable commits::

    with Postgres.start(tmp_path, fsync=True) as pg:
        url = pg.create_database("bench")
"""

from __future__ import annotations

import contextlib
import glob
import itertools
import os
import pwd
import re
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

import psycopg
import pytest
from psycopg import sql

from tests.peers import free_port, log_tail

__all__ = [
    "Postgres",
    "find_bindir",
    "postgres_server",
    "postgres_url",
    "require_postgres",
]

BINDIR_GLOB = "/usr/lib/postgresql/*/bin"
SERVER_USER = "postgres"  # the OS user the server runs as when we are root (created by the Debian package)
SUPERUSER = "postgres"  # the database superuser initdb creates, whoever runs it
INITDB_TIMEOUT_S = 60.0
START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 10.0
SOCKET_PATH_MAX = 107  # sun_path is 108 bytes on Linux, NUL included
_DB_NAME = re.compile(r"[a-z_][a-z0-9_]{0,62}")


def find_bindir() -> Path | None:
    """The newest /usr/lib/postgresql/<major>/bin holding initdb and postgres, or None."""
    found = [
        Path(d) for d in glob.glob(BINDIR_GLOB) if all(Path(d, b).exists() for b in ("initdb", "postgres"))
    ]
    return max(found, key=lambda d: int(d.parent.name) if d.parent.name.isdigit() else -1, default=None)


def require_postgres() -> Path:
    """Fail (not skip) where the server is absent: scripts/test always installs it, so a skip would hide a
    broken CI."""
    bindir = find_bindir()
    if bindir is None:
        pytest.fail(f"no PostgreSQL server in {BINDIR_GLOB}: run scripts/install-peers (scripts/test does)")
    if os.geteuid() == 0:
        try:
            pwd.getpwnam(SERVER_USER)
        except KeyError:
            pytest.fail(
                f"running as root but there is no {SERVER_USER!r} user to run PostgreSQL as (the Debian "
                "package creates it): run scripts/install-peers"
            )
    return bindir


class Postgres:
    """One running PostgreSQL cluster; stop it with `stop()` or by leaving the ``with`` block (idempotent)."""

    def __init__(
        self,
        *,
        bindir: Path,
        root: Path,
        cluster_dir: Path,
        owned_cluster_dir: bool,
        port: int,
        dbname: str,
        proc: subprocess.Popen[bytes],
    ) -> None:
        self.bindir = bindir
        self.root = root
        self.cluster_dir = cluster_dir
        self.data_dir = cluster_dir / "data"
        self.log_path = root / "postgres.log"
        self.port = port
        self.dbname = dbname
        self.proc = proc
        self._owned_cluster_dir = owned_cluster_dir
        self._names = itertools.count()

    # --- life cycle -------------------------------------------------------------------------------------

    @classmethod
    def start(
        cls,
        tmp_dir: Path | str,
        *,
        port: int | None = None,
        dbname: str = "pacs_triage",
        fsync: bool = False,
        max_connections: int = 100,
        settings: Mapping[str, str] | None = None,
    ) -> Postgres:
        """initdb a private cluster, start the server, wait until it accepts connections, create `dbname`.

        ``fsync=False`` (the default, for tests) runs initdb with ``--no-sync`` and the server with
        ``fsync=off`` and ``full_page_writes=off``: an OS crash may corrupt the cluster, which is thrown
        away anyway, and start-up and commits get cheaper. Commits stay synchronous
        (``synchronous_commit=on``), so a killed server loses no acknowledged commit, which "the database
        went down" tests rely on. A benchmark that should pay for durability passes ``fsync=True``.
        `settings` adds or overrides postgresql.conf parameters (values are written as given, so quote
        strings: ``{"log_statement": "'all'"}``). A `port` left as None is picked free; if that pick loses a
        race with another process, start retries new ports.
        """
        bindir = require_postgres()
        root = Path(tmp_dir)
        root.mkdir(parents=True, exist_ok=True)
        user = pwd.getpwnam(SERVER_USER) if os.geteuid() == 0 else None
        if user is None:
            cluster_dir, owned = root / "cluster", False
            cluster_dir.mkdir(exist_ok=True)
        else:
            cluster_dir, owned = Path(tempfile.mkdtemp(prefix="pacs-triage-pg-")), True
            os.chown(cluster_dir, user.pw_uid, user.pw_gid)
        log_path = root / "postgres.log"
        try:
            _initdb(bindir, cluster_dir, log_path, user, fsync=fsync)
            _configure(cluster_dir, fsync=fsync, max_connections=max_connections, settings=settings)
            attempts = 1 if port is not None else 3
            for attempt in range(attempts):
                server = cls._spawn(bindir, root, cluster_dir, owned, port or free_port(), dbname, user)
                try:
                    server._wait_ready()
                    server._create(dbname)
                    return server
                except _ExitedEarly:
                    server.stop(remove=False)
                    if attempt + 1 == attempts:
                        raise RuntimeError(f"PostgreSQL exited at start-up:\n{log_tail(log_path)}") from None
                except BaseException:
                    server.stop(remove=False)
                    raise
        except BaseException:
            if owned:
                shutil.rmtree(cluster_dir, ignore_errors=True)
            raise
        raise AssertionError("unreachable")

    @classmethod
    def _spawn(
        cls,
        bindir: Path,
        root: Path,
        cluster_dir: Path,
        owned: bool,
        port: int,
        dbname: str,
        user: pwd.struct_passwd | None,
    ) -> Postgres:
        log = (root / "postgres.log").open("ab")
        try:
            # The postmaster itself, in the foreground (not pg_ctl, which daemonises): we own the process, so
            # we can reap it. Same process group as pytest on purpose: a Ctrl-C on the run reaches it too.
            proc = subprocess.Popen(
                [str(bindir / "postgres"), "-D", str(cluster_dir / "data"), "-p", str(port)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=cluster_dir,
                env=_env(),
                **_as_user(user),
            )
        finally:
            log.close()
        return cls(
            bindir=bindir,
            root=root,
            cluster_dir=cluster_dir,
            owned_cluster_dir=owned,
            port=port,
            dbname=dbname,
            proc=proc,
        )

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise _ExitedEarly
            # pg_ctl's own test: the postmaster writes its pid on line 1 of postmaster.pid and "ready" on
            # line 8 once it accepts connections. Polling with connects instead could reach whoever else holds
            # a raced port (and libpq's shortest connect_timeout is 2 s).
            with contextlib.suppress(OSError):
                lines = (self.data_dir / "postmaster.pid").read_text().splitlines()
                if len(lines) >= 8 and lines[0] == str(self.proc.pid) and lines[7].strip() == "ready":
                    return
            time.sleep(0.02)
        raise RuntimeError(
            f"PostgreSQL did not accept connections within {START_TIMEOUT_S:.0f} s:\n{self.log_tail()}"
        )

    def stop(self, *, remove: bool = True) -> None:
        """Fast shutdown (SIGINT: roll back open transactions, close sessions, checkpoint), then reap.

        Escalates to an immediate shutdown (SIGQUIT) and then SIGKILL if the server lingers. The postmaster
        exits only after all its backends, so nothing of this cluster outlives `stop()`. Idempotent. As root,
        the private cluster directory is removed too (`remove=False` keeps it).
        """
        if self.proc.poll() is None:
            for sig in (signal.SIGINT, signal.SIGQUIT, signal.SIGKILL):
                with contextlib.suppress(ProcessLookupError):
                    self.proc.send_signal(sig)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.proc.wait(timeout=STOP_TIMEOUT_S / 2)
                    break
        self.proc.wait()
        if remove and self._owned_cluster_dir:
            shutil.rmtree(self.cluster_dir, ignore_errors=True)

    def __enter__(self) -> Postgres:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # --- addresses and databases ------------------------------------------------------------------------

    @property
    def url(self) -> str:
        """SQLAlchemy URL of the database created at start (`dbname`)."""
        return self.url_for(self.dbname)

    def url_for(self, dbname: str) -> str:
        return f"postgresql+psycopg://{SUPERUSER}@127.0.0.1:{self.port}/{dbname}"

    def create_database(self, name: str | None = None) -> str:
        """Create an empty database (a fresh name if None) and return its SQLAlchemy URL."""
        name = name if name is not None else f"test_{next(self._names)}"
        self._create(name)
        return self.url_for(name)

    def drop_database(self, name: str) -> None:
        """Drop it even if connections remain (WITH (FORCE) terminates them); a missing one is fine."""
        with self._admin() as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))

    @contextlib.contextmanager
    def database(self, name: str | None = None) -> Iterator[str]:
        """A fresh database for the ``with`` block, dropped afterwards; yields its URL."""
        url = self.create_database(name)
        try:
            yield url
        finally:
            self.drop_database(url.rsplit("/", 1)[1])

    def log_tail(self, lines: int = 40) -> str:
        """The end of the server log (initdb's output first, then the server's), for assertion messages."""
        return log_tail(self.log_path, lines)

    def _create(self, name: str) -> None:
        if not _DB_NAME.fullmatch(name):
            raise ValueError(f"database name {name!r}: use lower-case letters, digits and _ (63 at most)")
        with self._admin() as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))

    def _admin(self) -> psycopg.Connection[tuple[object, ...]]:
        """An autocommit connection to the maintenance database (CREATE/DROP DATABASE cannot run in a
        transaction)."""
        return psycopg.connect(
            host="127.0.0.1",
            port=self.port,
            user=SUPERUSER,
            dbname="postgres",
            autocommit=True,
            connect_timeout=10,
        )


class _ExitedEarly(Exception):
    """The server exited before accepting connections: usually a port taken between picking and binding."""


def _env() -> dict[str, str]:
    """Our environment without libpq's and the server's PG* variables (PGDATA, PGPORT, PGHOST...), which
    would otherwise point the tools at someone else's cluster."""
    return {k: v for k, v in os.environ.items() if not k.startswith("PG")}


def _as_user(user: pwd.struct_passwd | None) -> dict[str, Any]:
    """Popen keywords that drop root to `user` (uid, gid, no supplementary groups such as root's)."""
    if user is None:
        return {}
    return {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": []}


def _initdb(
    bindir: Path, cluster_dir: Path, log_path: Path, user: pwd.struct_passwd | None, *, fsync: bool
) -> None:
    cmd = [
        str(bindir / "initdb"),
        "-D", str(cluster_dir / "data"),
        "-U", SUPERUSER,
        "-A", "trust",  # loopback only (listen_addresses below), throwaway data
        "-E", "UTF8",
        "--no-locale",  # C collation: no dependence on which locales the machine has generated
        "--no-instructions",
    ]  # fmt: skip
    if not fsync:
        cmd.append("--no-sync")
    with log_path.open("ab") as log:
        done = subprocess.run(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=cluster_dir,
            env=_env(),
            timeout=INITDB_TIMEOUT_S,
            check=False,
            **_as_user(user),
        )
    if done.returncode != 0:
        raise RuntimeError(f"initdb failed ({done.returncode}):\n{log_tail(log_path)}")


def _configure(
    cluster_dir: Path, *, fsync: bool, max_connections: int, settings: Mapping[str, str] | None
) -> None:
    """Append our parameters to postgresql.conf (the last setting of a name wins)."""
    # The socket sits beside the data directory (never /var/run/postgresql), and only where its path fits in
    # sun_path ("/.s.PGSQL.65535" included); TCP always works.
    sockets = str(cluster_dir) if len(str(cluster_dir)) + 16 <= SOCKET_PATH_MAX else ""
    params = {
        "listen_addresses": "'127.0.0.1'",
        "unix_socket_directories": f"'{sockets}'",
        "max_connections": str(max_connections),
        "fsync": "on" if fsync else "off",
        "full_page_writes": "on" if fsync else "off",
        "timezone": "'UTC'",
        "log_timezone": "'UTC'",
        "logging_collector": "off",  # to stderr, i.e. our log file
        "log_min_messages": "warning",
        "log_checkpoints": "off",  # on by default since 15; DROP DATABASE checkpoints every time
        "log_line_prefix": "'%m [%p] %q%d '",
        **(settings or {}),
    }
    with (cluster_dir / "data" / "postgresql.conf").open("a") as conf:
        conf.write("\n# pacs-triage tests/peers/postgres.py\n")
        conf.writelines(f"{name} = {value}\n" for name, value in params.items())


@pytest.fixture(scope="session")
def postgres_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Postgres]:
    """One PostgreSQL for the whole test run (about 1 s to start, mostly initdb); stopped at the end."""
    with Postgres.start(tmp_path_factory.mktemp("postgres")) as server:
        yield server


@pytest.fixture
def postgres_url(postgres_server: Postgres) -> Iterator[str]:
    """SQLAlchemy URL of a fresh, empty database for this test, dropped (connections and all) afterwards."""
    with postgres_server.database() as url:
        yield url
