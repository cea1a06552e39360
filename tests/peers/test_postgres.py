"""The PostgreSQL harness against the real server: the shared store and job queue (issue 8) build on it."""

from __future__ import annotations

import os
import pwd
import socket
import subprocess
from pathlib import Path

import pytest
from sqlalchemy import create_engine, inspect, text
from sqlalchemy.exc import OperationalError

from tests.peers.postgres import SERVER_USER, Postgres

pytestmark = pytest.mark.e2e


def test_sqlalchemy_round_trip(postgres_url):
    assert postgres_url.startswith("postgresql+psycopg://postgres@127.0.0.1:")
    engine = create_engine(postgres_url)
    try:
        with engine.begin() as conn:
            conn.execute(text("CREATE TABLE studies (id serial PRIMARY KEY, uid text NOT NULL UNIQUE)"))
            conn.execute(
                text("INSERT INTO studies (uid) VALUES (:uid)"), [{"uid": "1.2.3"}, {"uid": "1.2.4"}]
            )
        with engine.connect() as conn:
            assert conn.execute(text("SELECT uid FROM studies ORDER BY id")).scalars().all() == [
                "1.2.3",
                "1.2.4",
            ]
            assert conn.execute(text("SHOW server_encoding")).scalar() == "UTF8"
            assert conn.execute(text("SHOW TimeZone")).scalar() == "UTC"
    finally:
        engine.dispose()


def test_skip_locked_hands_each_row_to_one_worker(postgres_url):
    """The job-queue claim: a row locked by worker A is skipped by worker B, and free again once A ends."""
    engine = create_engine(postgres_url)
    claim = text("SELECT id FROM jobs WHERE state = 'queued' ORDER BY id LIMIT 1 FOR UPDATE SKIP LOCKED")
    try:
        with engine.begin() as conn:
            conn.execute(text("CREATE TABLE jobs (id int PRIMARY KEY, state text NOT NULL)"))
            conn.execute(text("INSERT INTO jobs VALUES (1, 'queued'), (2, 'queued')"))
        with engine.connect() as a, engine.connect() as b:
            assert a.execute(claim).scalar() == 1
            assert b.execute(claim).scalar() == 2  # 1 is locked by A: skipped, not waited for
            with pytest.raises(OperationalError, match="could not obtain lock"):
                b.execute(text("SELECT id FROM jobs WHERE id = 1 FOR UPDATE NOWAIT"))
            b.rollback()  # releases 2 (and clears the failed transaction)
            assert b.execute(claim).scalar() == 2
            b.rollback()
            a.rollback()  # A "crashed" before finishing: its row is claimable again
            assert b.execute(claim).scalar() == 1
            b.rollback()
    finally:
        engine.dispose()


def test_databases_are_isolated_and_dropped(postgres_server, postgres_url):
    names = {postgres_url.rsplit("/", 1)[1]}
    engine = create_engine(postgres_url)
    try:
        assert inspect(engine).get_table_names() == []  # fresh, whatever other tests created
    finally:
        engine.dispose()
    with postgres_server.database() as first, postgres_server.database() as second:
        names |= {first.rsplit("/", 1)[1], second.rsplit("/", 1)[1]}
        assert len(names) == 3
        one, two = create_engine(first), create_engine(second)
        try:
            with one.begin() as conn:
                conn.execute(text("CREATE TABLE results (id int)"))
            assert inspect(two).get_table_names() == []
            two.connect().close()  # a connection left in the pool: the drop must not wait for it
        finally:
            one.dispose()
    two.dispose()
    admin = create_engine(postgres_server.url)
    try:
        with admin.connect() as conn:
            present = set(conn.execute(text("SELECT datname FROM pg_database")).scalars())
    finally:
        admin.dispose()
    assert first.rsplit("/", 1)[1] not in present
    assert second.rsplit("/", 1)[1] not in present
    assert postgres_url.rsplit("/", 1)[1] in present  # dropped only after this test


def test_stop_leaves_no_process(tmp_path):
    with Postgres.start(tmp_path / "pg") as pg:
        postmaster = pg.proc.pid
        pgrep = subprocess.run(["pgrep", "-P", str(postmaster)], capture_output=True, text=True)
        children = [int(pid) for pid in pgrep.stdout.split()]
        assert children, "a running postmaster has background processes"
        if os.geteuid() == 0:  # the server refuses root; the harness must have dropped to SERVER_USER
            uid = pwd.getpwnam(SERVER_USER).pw_uid
            assert _uid(postmaster) == uid
            assert pg.data_dir.stat().st_uid == uid
        session = create_engine(pg.url).connect()  # an open session does not delay a fast shutdown
        data_dir = pg.data_dir
    session.invalidate()
    session.close()
    assert pg.proc.returncode == 0, pg.log_tail()
    assert subprocess.run(["pgrep", "-f", str(data_dir)], capture_output=True).returncode == 1
    assert not any(Path("/proc", str(pid)).exists() for pid in children)
    assert "database system is shut down" in pg.log_tail()
    pg.stop()  # idempotent


def test_taken_port_fails_with_the_log(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(RuntimeError, match="could not (create any TCP/IP sockets|bind)"):
            Postgres.start(tmp_path / "pg", port=port)


def _uid(pid: int) -> int:
    for line in Path("/proc", str(pid), "status").read_text().splitlines():
        if line.startswith("Uid:"):
            return int(line.split()[1])
    raise AssertionError(f"no Uid line for {pid}")
