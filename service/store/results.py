"""Finished results: one transaction saves the result, finishes its job, updates the worklist entry, and
writes the audit event and the outbox and notification rows.

The result is built before it comes here, outside the store (:func:`service.results.build.build_result`);
what the builder needs from the database (the study's timestamps, the result it supersedes) it reads with
:meth:`Results.context`. Saving checks that nothing changed in between: the job is still this worker's
(lease), and no other result of the study was saved meanwhile; otherwise :class:`StaleResultError` asks
the caller to build again on a fresh context. Atomicity means a crash leaves either no result and a job to
re-run, or everything: a result is never written twice, nor without its worklist entry, its audit event,
its outbox entry (``rendered_at`` NULL: the render loop's queue) and its notifications.

A measurements-pending result (``StudyResult.measurements_pending``: a job's findings before the
segmentation measures them) is saved the same way except that its job goes on (the job's ``result_id``
names it, so the study is not "being analysed" meanwhile) and it is never rendered: the job's final result
supersedes it and is the one the PACS gets. A job has one final result (a partial unique index).
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import bindparam, func, insert, select, update
from sqlalchemy.orm import Session

from service.clock import utcnow
from service.errors import StaleResultError
from service.results.schema import StudyResult
from service.store.database import Database
from service.store.db import JobRow, JobState, ResultRow, StudyRow
from service.store.facts import ResultContext
from service.store.jobs import JobInfo, Jobs
from service.store.notify import Targets, enqueue
from service.store.worklist import apply_result, audit_remote_requests

__all__ = ["Results", "StudyStatus"]


@dataclass(frozen=True)
class StudyStatus:
    """What GET result needs: does the study exist, is work outstanding, the latest result."""

    exists: bool
    outstanding: bool
    result: StudyResult | None
    accession_number: str | None = None


def _newest(s: Session, study_uid: str) -> ResultRow | None:
    return s.scalars(
        select(ResultRow)
        .where(ResultRow.study_uid == study_uid)
        .order_by(ResultRow.created_at.desc(), ResultRow.job_id.desc())
        .limit(1)
    ).first()


# The statements of a result's save and context, built once: building a statement and its cache key cost
# more than running it (a prebuilt SELECT in a transaction ~90 us, built on each call ~250 us, measured on
# SQLite here), and these run once per study on the one writer thread.
_NEWEST_ID = (
    select(ResultRow.result_id)
    .where(ResultRow.study_uid == bindparam("study"))
    .order_by(ResultRow.created_at.desc(), ResultRow.job_id.desc())
    .limit(1)
)
_STUDY_FACTS = select(StudyRow.accession_number, StudyRow.first_received, StudyRow.last_received).where(
    StudyRow.study_uid == bindparam("study")
)
_JOB_AND_STUDY_FOR_UPDATE = (
    select(JobRow.study_uid, JobRow.state, JobRow.worker_id, StudyRow.ai_priority)
    .join_from(JobRow, StudyRow, JobRow.study_uid == StudyRow.study_uid)
    .where(JobRow.id == bindparam("job"))
    .with_for_update(of=[JobRow, StudyRow])
)
"""The job (its lease) and its study's AI priority in one statement (was two): on PostgreSQL both rows
locked, and the study row lock serialises two results of one study; the newest result is read after it, in
a statement of its own, so that under READ COMMITTED it sees a result committed while we waited."""
_INSERT_RESULT = insert(ResultRow)
_FINISH_JOB = update(JobRow).where(JobRow.id == bindparam("job"))
_NOTE_PENDING_RESULT = (
    update(JobRow).where(JobRow.id == bindparam("job")).values(result_id=bindparam("result_id"))
)


def _newest_id(s: Session, study_uid: str) -> str | None:
    return s.connection().execute(_NEWEST_ID, {"study": study_uid}).scalar()


class Results:
    """Save and read results.

    ``targets`` says which notifications a saved result creates; ``render`` whether results are queued
    for SR/preview rendering (False when no DICOM destination wants them: the result is then saved as
    rendered, and the render loop has nothing to look at).
    """

    def __init__(
        self, db: Database, jobs: Jobs, *, targets: Targets = lambda _result: (), render: bool = True
    ) -> None:
        self.db = db
        self.jobs = jobs
        self.targets = targets
        self.render = render

    async def context(self, study_uid: str) -> ResultContext:
        return await self.db.read(self._context, study_uid)

    @staticmethod
    def _context(s: Session, study_uid: str) -> ResultContext:
        study = s.connection().execute(_STUDY_FACTS, {"study": study_uid}).first()
        if study is None:
            return ResultContext(None, None, None, None)
        return ResultContext(*study, _newest_id(s, study_uid))

    async def save(self, job: JobInfo, result: StudyResult) -> StudyResult:
        """Store ``result`` as ``job``'s one result; see the module docstring for what goes with it.

        Raises
        ------
        LeaseLostError
            The job is no longer ours: another worker took it over after our lease ran out.
        StaleResultError
            The study has a newer result than ``result.supersedes``: build again and save that.
        """
        return await self.db.run_grouped(self._save, job.id, result)

    def _save(self, s: Session, job_id: int, result: StudyResult) -> StudyResult:
        conn = s.connection()  # plain statements: this runs once per study on the one writer thread
        job = conn.execute(_JOB_AND_STUDY_FOR_UPDATE, {"job": job_id}).one()
        self.jobs.check_lease(job_id, job.state, job.worker_id, also=(JobState.FAILED,))
        current = job.ai_priority
        if _newest_id(s, job.study_uid) != result.supersedes:
            raise StaleResultError("another result of the study was saved meanwhile", part="result")
        now = utcnow()
        pending = result.measurements_pending
        conn.execute(
            _INSERT_RESULT,
            {
                "result_id": result.result_id,
                "study_uid": job.study_uid,
                "job_id": job_id,
                "created_at": now,
                "supersedes": result.supersedes,
                "body": result.model_dump_json(),
                "measurements_pending": pending,
                # one SR/SEG per analysis, from its final result: a measurements-pending one is never rendered
                "rendered_at": None if self.render and result.findings and not pending else now,
            },
        )
        if pending:  # the job goes on (its segmentation); its result_id says the findings are stored
            conn.execute(_NOTE_PENDING_RESULT, {"job": job_id, "result_id": result.result_id})
        else:
            conn.execute(
                _FINISH_JOB,
                {
                    "job": job_id,
                    "state": JobState.FAILED if result.status == "failed" else JobState.DONE,
                    "finished_at": now,
                    "result_id": result.result_id,
                },
            )
        apply_result(s, job.study_uid, current, result, now)
        audit_remote_requests(s, job.study_uid, result, now)
        enqueue(s, result, self.targets(result), now)
        return result

    async def status(self, study_uid: str) -> StudyStatus:
        return await self.db.read(self._status, study_uid)

    @staticmethod
    def _status(s: Session, study_uid: str) -> StudyStatus:
        study = s.get(StudyRow, study_uid)
        if study is None:
            return StudyStatus(exists=False, outstanding=False, result=None)
        # A running job that stored a measurements-pending result (its result_id set, see _save) is not
        # outstanding: its findings are the answer until the measured result supersedes them.
        outstanding = (
            s.scalars(
                select(JobRow.id)
                .where(
                    JobRow.study_uid == study_uid,
                    (JobRow.state == JobState.PENDING)
                    | ((JobRow.state == JobState.RUNNING) & JobRow.result_id.is_(None)),
                )
                .limit(1)
            ).first()
            is not None
        )
        row = _newest(s, study_uid)
        result = StudyResult.model_validate_json(row.body) if row is not None else None
        return StudyStatus(True, outstanding, result, study.accession_number)

    async def count(self, study_uid: str) -> int:
        return await self.db.read(self._count, study_uid)

    @staticmethod
    def _count(s: Session, study_uid: str) -> int:
        query = select(func.count()).select_from(ResultRow).where(ResultRow.study_uid == study_uid)
        return int(s.scalar(query) or 0)
