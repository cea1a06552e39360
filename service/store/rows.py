"""Instance rows: the one insert behind every arrival (HTTP ingest, the DICOM group commit, the re-index).

For instances whose files are already durable: their instance, series and study rows, the study's count
(``api.max_instances_per_study`` when ``limit`` is given), and the job each study needs, scheduled behind
its assembly gate (:func:`service.assemble.study_gate`) in the same transaction, so an instance is never
stored without the work it causes. An instance stored meanwhile is skipped: one row, still a success.
Split from :mod:`service.store.instances`, which owns the files and the reads.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, Executable, bindparam, func, insert, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from service.assemble import study_gate
from service.clock import utcnow
from service.errors import StudyTooLargeError
from service.store.db import InstanceRow, JobRow, SeriesRow, StudyRow
from service.store.facts import ResultContext
from service.store.files import instance_relname
from service.store.gates import any_counted, series_fill
from service.store.jobs import JobInfo, Jobs, schedule
from service.store.validate import ParsedInstance

__all__ = ["Ingested", "insert_rows"]

logger = logging.getLogger(__name__)

# Built once: these run with every arrival (an HTTP request, each DICOM group commit) on the one writer
# thread, and building a statement and its cache key costs more than running it (store/results.py).
_STORED = select(InstanceRow.sop_instance_uid).where(
    InstanceRow.sop_instance_uid.in_(bindparam("sops", expanding=True))
)
_INSERT_INSTANCE = insert(InstanceRow)


def _upserts(
    insert_into: Callable[[Any], postgresql.Insert | sqlite.Insert],
) -> tuple[Executable, Executable]:
    """A study's and a series' row in one statement each, whether new or not (``INSERT ... ON CONFLICT
    DO UPDATE``: PostgreSQL 9.5, SQLite 3.24; ``RETURNING``: SQLite 3.35), instead of a SELECT and then an
    INSERT or UPDATE: two statements fewer per arrival on the one writer thread, where each waits for the
    GIL (bench/RESULTS.md, session 11). On PostgreSQL the conflicting row is locked as ``FOR UPDATE``
    would, so ingests of one study by several processes still take turns, and two first ingests of one
    new study no longer race to insert it (the second updates the first's row)."""
    new_study = insert_into(StudyRow)
    study = new_study.on_conflict_do_update(
        index_elements=[StudyRow.study_uid],
        set_={
            "instance_count": StudyRow.instance_count + new_study.excluded.instance_count,
            "last_received": new_study.excluded.last_received,
            "accession_number": func.coalesce(StudyRow.accession_number, new_study.excluded.accession_number),
        },
    ).returning(StudyRow.instance_count, StudyRow.first_received, StudyRow.accession_number)
    new_series = insert_into(SeriesRow)
    series = new_series.on_conflict_do_update(
        index_elements=[SeriesRow.series_uid],
        set_={
            "expected_instances": func.coalesce(
                SeriesRow.expected_instances, new_series.excluded.expected_instances
            )
        },
    )
    return study, series


_UPSERTS = {"sqlite": _upserts(sqlite.insert), "postgresql": _upserts(postgresql.insert)}
_ANY_JOB = select(JobRow.id).where(JobRow.study_uid == bindparam("study")).limit(1)


@dataclass(frozen=True)
class Ingested:
    """What one ingest did: the gate of each study it (re)scheduled and the jobs leased to the caller."""

    gates: list[datetime] = field(default_factory=list)
    claimed: list[JobInfo] = field(default_factory=list)
    whole: set[str] = field(default_factory=set)
    """Studies whose every stored instance came in this call: the caller holds all of them."""
    created: dict[str, ResultContext] = field(default_factory=dict)
    """Studies this call created, with what building their first result needs from the store (no result
    to supersede, received now): known here, so the worker need not read it back (two reads fewer)."""


def insert_rows(
    s: Session,
    fresh: list[ParsedInstance],
    not_before: datetime,
    priority: int,
    claim: Jobs | None,
    hold_until: datetime | None = None,
    complete_when_full: bool = True,
    limit: int | None = None,
) -> Ingested:
    """Rows for instances whose files are durable (:func:`_insert`), in the caller's transaction; again
    after losing a race with another process (same instance, series or pending job inserted meanwhile):
    the retry sees their rows and joins them.

    On SQLite there is no such race: one process, whose write transactions take the lock up front (``BEGIN
    IMMEDIATE``), so no insert lands between our check and ours; no savepoint either, two statements fewer on
    the one writer thread, the serial hop under concurrent load (bench/RESULTS.md, session 11)."""
    if s.get_bind().dialect.name == "sqlite":
        return _insert(s, fresh, not_before, priority, claim, hold_until, complete_when_full, limit)
    for attempt in range(4):
        try:
            with s.begin_nested():
                return _insert(s, fresh, not_before, priority, claim, hold_until, complete_when_full, limit)
        except IntegrityError:
            if attempt == 3:
                raise
            logger.debug("ingest lost an insert race; retrying")
    raise AssertionError("unreachable")


def _insert(
    s: Session,
    fresh: list[ParsedInstance],
    not_before: datetime,
    priority: int,
    claim: Jobs | None,
    hold_until: datetime | None = None,
    complete_when_full: bool = True,
    limit: int | None = None,
) -> Ingested:
    """Rows for the fresh instances; the gate of each study (re)scheduled, and the jobs claimed.

    Plain SQL statements (SQLAlchemy Core), a few per study rather than per instance: this runs once
    per HTTP request and once per C-STORE, on the one writer thread.
    """
    now = utcnow()
    done = Ingested()
    conn = s.connection()
    sops = [p.sop_instance_uid for p in fresh]
    stored = set(conn.scalars(_STORED, {"sops": sops}))
    new = [p for p in fresh if p.sop_instance_uid not in stored]  # stored meanwhile: once, still a success
    if not new:
        return done
    by_study: dict[str, list[ParsedInstance]] = {}
    for p in new:
        by_study.setdefault(p.study_uid, []).append(p)
    for study_uid, items in by_study.items():
        _add_study(conn, study_uid, items, now, limit, done)
    _add_series(conn, new)
    conn.execute(
        _INSERT_INSTANCE,
        [
            {
                "sop_instance_uid": p.sop_instance_uid,
                "series_uid": p.series_uid,
                "study_uid": p.study_uid,
                "sop_class_uid": p.sop_class_uid,
                "transfer_syntax_uid": p.transfer_syntax_uid,
                "path": instance_relname(p.study_uid, p.series_uid, p.sop_instance_uid),
                "received_at": now,
                "role": p.role,
            }
            for p in new
        ],
    )
    # Only studies that gained an image need (re-)analysis: an SR, a presentation state or our own
    # result coming back from the PACS changes nothing.
    images = sorted({p.study_uid for p in new if p.role == "image"})
    for study_uid in images:
        # Only a series with a known count can make the study full: skip the count query for the
        # common case of senders that do not say (radiographs, most MR).
        counted = any(p.expected_in_series for p in by_study[study_uid]) or (
            hold_until is not None and any_counted(s, study_uid)
        )
        gate = (
            study_gate(
                not_before,
                now,
                series_fill(s, study_uid),
                hold_until=hold_until,
                complete_when_full=complete_when_full,
            )
            if counted and (not_before > now or hold_until is not None)
            else not_before
        )
        job = schedule(s, study_uid, gate, priority, now, lease_to=claim)
        done.gates.append(gate)
        if job is not None:
            done.claimed.append(job)
    # A study of non-image objects only (SR, RT, waveforms, no pixel data) still gets an answer: one
    # job, whose result says "not analysed" and why, unless the study already has a job of its own.
    for study_uid in sorted({p.study_uid for p in new if p.role == "other"} - set(images)):
        if conn.scalars(_ANY_JOB, {"study": study_uid}).first() is None:
            schedule(s, study_uid, not_before, priority, now)
            done.gates.append(not_before)
    return done


def _add_study(
    conn: Connection,
    study_uid: str,
    items: list[ParsedInstance],
    now: datetime,
    limit: int | None,
    done: Ingested,
) -> None:
    """Count the study's new instances in; in ``done``, whether it had none before (the caller holds them
    all) and whether this call created it.

    Over ``limit``, :class:`StudyTooLargeError` after the row was counted: raising rolls the caller's
    transaction back, so nothing of the request stays."""
    accession = next((p.accession_number[:16] for p in items if p.accession_number), None)
    row = {
        "study_uid": study_uid,
        "first_received": now,
        "last_received": now,
        "instance_count": len(items),
        "accession_number": accession,
    }
    count, first, stored_accession = conn.execute(_UPSERTS[conn.dialect.name][0], row).one()
    before = count - len(items)
    if limit and count > limit:
        raise StudyTooLargeError(
            f"the study already has {max(before, limit)} instances, the configured maximum",
            part="StudyInstanceUID",
        )
    if before == 0:  # a new study, or retention purged its earlier instances
        done.whole.add(study_uid)
    if first == now:  # inserted, not updated: no earlier result either
        done.created[study_uid] = ResultContext(stored_accession, now, now, None)


def _add_series(conn: Connection, new: list[ParsedInstance]) -> None:
    """A row per new series; a count the sender declares now fills one it had not declared before."""
    first: dict[str, ParsedInstance] = {}
    expected: dict[str, int] = {}
    for p in new:
        first.setdefault(p.series_uid, p)
        if p.expected_in_series is not None:
            expected.setdefault(p.series_uid, p.expected_in_series)
    conn.execute(
        _UPSERTS[conn.dialect.name][1],
        [
            {
                "series_uid": uid,
                "study_uid": p.study_uid,
                "modality": p.modality,
                "body_part": p.body_part,
                "expected_instances": expected.get(uid),
            }
            for uid, p in first.items()
        ],
    )
