"""The DICOM group commit: files durable before the answer, rows of everything that waited in one transaction,
checks that a row would make done before the answer, association ends applied after their rows."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator

import pytest
from sqlalchemy import event, select, text
from sqlalchemy.orm import Session

from service.clock import utcnow
from service.config import AssemblySettings
from service.errors import SopInstanceConflictError, StorageFullError, StudyTooLargeError
from service.store.db import InstanceRow, JobRow
from service.store.group_commit import GroupCommit
from service.store.instances import Instances
from service.store.validate import parse_instance
from tests.service.dicom_factory import chest
from tests.service.store.kit import Kit, counted_series


def _rows(instances: Instances) -> list[InstanceRow]:
    with Session(instances.db.engine) as s:
        return list(s.scalars(select(InstanceRow)))


def _jobs(instances: Instances) -> list[JobRow]:
    with Session(instances.db.engine) as s:
        return list(s.scalars(select(JobRow)))


@pytest.fixture
def due() -> list[int]:
    return []


@pytest.fixture
def commits(kit: Kit, due: list[int]) -> Iterator[GroupCommit]:
    """A group commit whose thread the test starts (so rows can queue up first); stopped at teardown."""
    gc = GroupCommit(
        kit.instances, quiet_seconds=60, assembly=AssemblySettings(), on_due=lambda: due.append(1)
    )
    yield gc
    gc.stop(30)


def test_the_file_is_durable_at_the_answer_and_the_row_follows(kit: Kit, commits: GroupCommit) -> None:
    (p,) = counted_series(1)
    assert commits.store(p, held=True) is True
    path = kit.instances.record(p).path
    assert path.read_bytes() == p.data  # on disk (fsynced) when store() returned ...
    assert _rows(kit.instances) == []  # ... the row not yet: the committer has not started
    assert commits.waiting == 1
    commits.start()
    assert commits.flush(30)
    (row,) = _rows(kit.instances)
    assert row.sop_instance_uid == p.sop_instance_uid and commits.waiting == 0


def test_rows_that_waited_are_committed_in_one_transaction(
    kit: Kit, commits: GroupCommit, due: list[int]
) -> None:
    series = counted_series(12)
    for p in series:
        assert commits.store(p, held=True)
    transactions: list[int] = []
    event.listen(kit.db.engine, "commit", lambda _conn: transactions.append(1))
    commits.start()
    assert commits.flush(30)
    assert len(transactions) == 1
    assert len(_rows(kit.instances)) == 12
    (job,) = _jobs(kit.instances)
    assert job.not_before <= utcnow()  # the series is full: due at once, and the workers were woken
    assert due == [1]


def test_a_duplicate_waiting_for_its_row_is_a_success_stored_once(kit: Kit, commits: GroupCommit) -> None:
    (p,) = counted_series(1)
    assert commits.store(p, held=True) is True
    assert commits.store(p, held=True) is False
    commits.start()
    assert commits.flush(30)
    assert commits.store(p, held=True) is False  # and once committed
    assert len(_rows(kit.instances)) == 1 and len(_jobs(kit.instances)) == 1


def test_a_uid_of_another_study_is_refused_before_its_row_exists(kit: Kit, commits: GroupCommit) -> None:
    first = parse_instance(chest(sop_uid="1.2.3.4.5"), "a")
    other = parse_instance(chest(sop_uid="1.2.3.4.5", pixels=None, value=10.0), "b")
    assert first.study_uid != other.study_uid
    assert commits.store(first, held=True)
    with pytest.raises(SopInstanceConflictError):
        commits.store(other, held=True)  # the first waits in the queue
    commits.start()
    assert commits.flush(30)
    with pytest.raises(SopInstanceConflictError):
        commits.store(other, held=True)  # the first is committed
    assert [r.study_uid for r in _rows(kit.instances)] == [first.study_uid]
    assert not kit.instances.record(other).path.exists()


def test_the_study_limit_counts_rows_still_waiting(kit: Kit, due: list[int]) -> None:
    instances = Instances(kit.db, kit.instances.instances_dir, max_instances_per_study=2)
    gc = GroupCommit(instances, quiet_seconds=60, assembly=AssemblySettings())
    try:
        a, b, c = counted_series(3)
        assert gc.store(a, held=True) and gc.store(b, held=True)
        with pytest.raises(StudyTooLargeError):
            gc.store(c, held=True)
        assert not instances.record(c).path.exists()  # refused before anything was written
        gc.start()
        assert gc.flush(30)
        assert len(_rows(instances)) == 2
    finally:
        gc.stop(30)


def test_an_association_end_is_applied_after_its_rows(kit: Kit, commits: GroupCommit) -> None:
    """A radiograph held while its association is open, released at once: the end, queued after the row,
    finds the row and makes the study due now (before its row it would find no job to move)."""
    p = parse_instance(chest(), "cr")
    assert commits.store(p, held=True)
    commits.ended((p.study_uid,), released=True)
    commits.start()
    assert commits.flush(30)
    (job,) = _jobs(kit.instances)
    assert job.not_before <= utcnow()


def test_concurrent_senders_of_one_new_instance_write_it_once(kit: Kit, commits: GroupCommit) -> None:
    commits.start()
    (p,) = counted_series(1)
    answers: list[bool] = []
    threads = [threading.Thread(target=lambda: answers.append(commits.store(p, held=True))) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(answers) == [False] * 5 + [True]
    assert commits.flush(30)
    assert len(_rows(kit.instances)) == 1


def test_a_failed_commit_is_retried_and_nothing_acknowledged_is_lost(
    kit: Kit, commits: GroupCommit, caplog: pytest.LogCaptureFixture, db_url: str
) -> None:
    if not db_url.startswith("sqlite"):
        pytest.skip("the failing insert is an SQLite trigger; the retry path is the same on PostgreSQL")
    with kit.db.engine.begin() as conn:
        conn.execute(text("CREATE TABLE refuse (x INTEGER)"))
        conn.execute(text("INSERT INTO refuse VALUES (1)"))
        conn.execute(
            text(
                "CREATE TRIGGER refuse_rows BEFORE INSERT ON instances WHEN (SELECT COUNT(*) FROM refuse) > 0"
                " BEGIN SELECT RAISE(ABORT, 'refused for the test'); END"
            )
        )
    caplog.set_level(logging.DEBUG, logger="service.store.group_commit")
    series = counted_series(3)
    for p in series:
        assert commits.store(p, held=True)
    commits.start()
    deadline = time.monotonic() + 30
    while "group commit of received instance rows failing: IntegrityError" not in caplog.text:
        assert time.monotonic() < deadline, "the commit was never tried"
        time.sleep(0.01)
    assert commits.waiting == 3 and _rows(kit.instances) == []  # still queued, files on disk
    assert all(kit.instances.record(p).path.exists() for p in series)
    (late,) = counted_series(1)
    with pytest.raises(StorageFullError):  # rows are not being written: "try again later", not more
        commits.store(late, held=True)
    assert not kit.instances.record(late).path.exists()
    assert all(p.sop_instance_uid not in caplog.text for p in series)  # no UIDs, no values in the log
    with kit.db.engine.begin() as conn:
        conn.execute(text("DELETE FROM refuse"))
    assert commits.flush(60)
    assert len(_rows(kit.instances)) == 3 and len(_jobs(kit.instances)) == 1


def test_stop_commits_what_waits(kit: Kit) -> None:
    gc = GroupCommit(kit.instances, quiet_seconds=60, assembly=AssemblySettings())
    gc.start()
    for p in counted_series(5):
        gc.store(p, held=True)
    gc.stop(30)
    assert len(_rows(kit.instances)) == 5


def _committed_within(kit: Kit, n: int, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while len(_rows(kit.instances)) < n:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def test_rows_linger_for_more_and_an_association_end_does_not_wait(kit: Kit) -> None:
    """A batch waits for more rows (one commit, not one per instance); a sender's end cuts that short, since
    the study may be complete now (here the linger is 60 s: only the end can commit within 10 s)."""
    gc = GroupCommit(kit.instances, quiet_seconds=60, assembly=AssemblySettings(), linger_seconds=60)
    gc.start()
    try:
        a, b = counted_series(2)
        assert gc.store(a, held=True) and gc.store(b, held=True)
        time.sleep(0.3)
        assert _rows(kit.instances) == [] and gc.waiting == 2  # lingering
        gc.ended((a.study_uid,), released=True)
        assert _committed_within(kit, 2, 10), "the association's end waited out the linger"
        assert len(_jobs(kit.instances)) == 1
    finally:
        gc.stop(30)


def test_a_flush_and_a_full_batch_do_not_wait_out_the_linger(kit: Kit) -> None:
    gc = GroupCommit(kit.instances, quiet_seconds=60, assembly=AssemblySettings(), linger_seconds=60)
    gc.start()
    try:
        (p,) = counted_series(1)
        assert gc.store(p, held=True)
        assert gc.flush(10), "a flush (a stop waits on one) waited out the linger"
        series = counted_series(64)
        for q in series:
            assert gc.store(q, held=True)
        assert _committed_within(kit, 65, 10), "a full batch waited out the linger"
    finally:
        gc.stop(30)
