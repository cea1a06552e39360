"""Saving results: one per job, superseding the previous one, with worklist, audit and notifications in the
same transaction; a result built on a stale context is refused, not written beside the newer one."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydicom.uid import generate_uid
from sqlalchemy import insert, select
from sqlalchemy.exc import IntegrityError

from service.clock import utcnow
from service.errors import StaleResultError
from service.results.schema import StudyResult
from service.store.db import AuditRow, JobRow, JobState, NotificationRow, ResultRow, StudyRow
from service.store.validate import ParsedInstance, parse_instance
from tests.service.dicom_factory import chest
from tests.service.store.kit import Kit, open_kit

pytestmark = pytest.mark.anyio


def _instance(study: str | None = None) -> ParsedInstance:
    return parse_instance(chest(study_uid=study or generate_uid()), "part 1")


async def test_results_supersede_and_are_written_once(kit: Kit) -> None:
    inst = _instance()
    await kit.instances.ingest([inst], not_before=utcnow())
    job = await kit.jobs.claim()
    assert job is not None
    assert (await kit.results.status(inst.study_uid)).outstanding
    first = await kit.finish(job)
    assert first.supersedes is None
    await kit.instances.ingest([_instance(inst.study_uid)], not_before=utcnow())  # a late image
    job2 = await kit.jobs.claim()
    assert job2 is not None
    second = await kit.finish(job2)
    assert second.supersedes == first.result_id
    status = await kit.results.status(inst.study_uid)
    assert status.exists and status.result == second and not status.outstanding
    assert await kit.results.count(inst.study_uid) == 2
    assert not (await kit.results.status(generate_uid())).exists


async def test_a_result_built_before_another_was_saved_is_stale(kit: Kit) -> None:
    """Two jobs of one study at once (late images): the slower one must build again on the new context."""
    inst = _instance()
    await kit.instances.ingest([inst], not_before=utcnow())
    slow = await kit.jobs.claim()
    await kit.instances.ingest([_instance(inst.study_uid)], not_before=utcnow())
    fast = await kit.jobs.claim()
    assert slow is not None and fast is not None
    ctx = await kit.results.context(inst.study_uid)  # slow reads its context...
    await kit.finish(fast)  # ...fast saves meanwhile
    stale = StudyResult(
        result_id="slow",
        study_uid=inst.study_uid,
        status="not_analysed",
        priority="routine",
        supersedes=ctx.supersedes,
    )
    with pytest.raises(StaleResultError):
        await kit.results.save(slow, stale)
    saved = await kit.finish(slow)  # built again on the fresh context
    assert saved.supersedes == f"r{fast.id}"
    assert await kit.results.count(inst.study_uid) == 2


async def test_one_transaction_holds_result_job_worklist_audit_and_notifications(tmp_path: Path) -> None:
    targets = lambda r: [("webhook", "https://example.invalid/hook")] if r.priority == "stat" else []  # noqa: E731
    kit = open_kit(f"sqlite:///{tmp_path / 'db.sqlite'}", tmp_path, targets=targets)
    try:
        inst = _instance()
        await kit.instances.ingest([inst], not_before=utcnow())
        job = await kit.jobs.claim()
        assert job is not None
        await kit.finish(job, result_id="stat-1", priority="stat")
        with kit.db.engine.connect() as c:
            (job_row,) = c.execute(select(JobRow.state, JobRow.result_id)).all()
            assert tuple(job_row) == (JobState.DONE, "stat-1")
            assert c.scalar(select(ResultRow.rendered_at)) is not None  # no findings: nothing to render
            study = c.execute(select(StudyRow.ai_priority, StudyRow.flagged_at)).one()
            assert study.ai_priority == 0 and study.flagged_at is not None
            assert c.scalars(select(AuditRow.event)).all() == ["flagged"]
            assert c.execute(select(NotificationRow.channel, NotificationRow.priority)).all() == [
                ("webhook", 0)
            ]
    finally:
        kit.close()


async def test_a_failed_save_leaves_nothing_behind(kit: Kit) -> None:
    """The lease check fails inside the transaction: no result, no worklist change, no audit row."""
    inst = _instance()
    await kit.instances.ingest([inst], not_before=utcnow())
    job = await kit.jobs.claim()
    assert job is not None
    kit.jobs.worker_id = "someone-else"  # as if another worker had taken the job over
    with pytest.raises(Exception, match="no longer ours"):
        await kit.finish(job)
    with kit.db.engine.connect() as c:
        assert c.scalar(select(ResultRow.result_id)) is None
        assert c.scalar(select(StudyRow.flagged_at)) is None
        assert c.scalars(select(AuditRow.event)).all() == []


async def test_a_result_with_findings_is_queued_for_rendering_unless_nothing_renders(tmp_path: Path) -> None:
    for render, queued in ((True, ["r"]), (False, [])):
        kit = open_kit(f"sqlite:///{tmp_path / f'{render}.sqlite'}", tmp_path / str(render))
        kit.results.render = render
        try:
            await kit.instances.ingest([_instance()], not_before=utcnow())
            job = await kit.jobs.claim()
            assert job is not None
            await kit.finish(job, result_id="r", priority="stat", findings=True)
            assert [p.result.result_id for p in await kit.outbox.pending_renders()] == queued
        finally:
            kit.close()


class TestMeasurementsPending:
    """A job whose positive findings a segmentation measures stores them first (the flag does not wait for
    the measurement), then its final result; only that one is rendered into SR/SEG."""

    async def test_the_findings_are_the_answer_while_the_job_measures_them(self, kit: Kit) -> None:
        inst = _instance()
        await kit.instances.ingest([inst], not_before=utcnow())
        job = await kit.jobs.claim()
        assert job is not None
        flag = await kit.finish(job, result_id="flag", priority="stat", findings=True, pending=True)
        status = await kit.results.status(inst.study_uid)
        assert status.result == flag and not status.outstanding  # GET answers it: 200, not 202
        with kit.db.engine.connect() as c:
            row = c.execute(select(JobRow).where(JobRow.id == job.id)).one()
            assert row.state == JobState.RUNNING and row.result_id == "flag"  # the job goes on
            study = c.execute(select(StudyRow).where(StudyRow.study_uid == inst.study_uid)).one()
            assert study.ai_priority == 0  # stat on the worklist already
        assert await kit.outbox.pending_renders() == []  # never rendered: no SR for it
        final = await kit.finish(job, result_id="final", priority="stat", findings=True)
        assert final.supersedes == "flag"
        status = await kit.results.status(inst.study_uid)
        assert status.result == final and not status.outstanding
        with kit.db.engine.connect() as c:
            row = c.execute(select(JobRow).where(JobRow.id == job.id)).one()
            assert row.state == JobState.DONE and row.result_id == "final"
        assert [r.result.result_id for r in await kit.outbox.pending_renders()] == ["final"]

    async def test_a_job_has_one_final_result(self, kit: Kit) -> None:
        inst = _instance()
        await kit.instances.ingest([inst], not_before=utcnow())
        job = await kit.jobs.claim()
        assert job is not None
        await kit.finish(job, result_id="flag", findings=True, pending=True)
        await kit.finish(job, result_id="final", findings=True)
        with kit.db.engine.begin() as c, pytest.raises(IntegrityError):
            c.execute(
                insert(ResultRow).values(
                    result_id="again",
                    study_uid=inst.study_uid,
                    job_id=job.id,
                    created_at=utcnow(),
                    body="{}",
                    measurements_pending=False,
                )
            )

    async def test_a_crash_while_measuring_runs_the_job_again(self, tmp_path: Path) -> None:
        """Killed between the two results: the restart re-runs the job from the start (the study is being
        analysed again, 202), or finishes it with its measurements-pending result where a newer pending
        job of the study (late images) will analyse everything."""
        url = f"sqlite:///{tmp_path / 'db.sqlite'}"
        kit = open_kit(url, tmp_path)
        alone, other = _instance(), _instance()
        for inst in (alone, other):
            await kit.instances.ingest([inst], not_before=utcnow())
        jobs = [await kit.jobs.claim(), await kit.jobs.claim()]
        ids = []
        for job in jobs:
            assert job is not None
            await kit.finish(job, result_id=f"flag-{job.id}", findings=True, pending=True)
            ids.append(job.id)
        await kit.instances.ingest([_instance(other.study_uid)], not_before=utcnow())  # a late image
        kit.close()
        kit = open_kit(url, tmp_path)  # the restart
        try:
            assert await kit.jobs.recover() == 2
            with kit.db.engine.connect() as c:
                rows = c.execute(select(JobRow.study_uid, JobRow.state, JobRow.result_id)).all()
            again = [r for r in rows if r.study_uid == alone.study_uid]
            assert [(r.state, r.result_id) for r in again] == [(JobState.PENDING, None)]  # runs again
            folded = sorted((r.state, r.result_id) for r in rows if r.study_uid == other.study_uid)
            assert folded == [(JobState.DONE, f"flag-{ids[1]}"), (JobState.PENDING, None)]
            for inst in (alone, other):
                assert (await kit.results.status(inst.study_uid)).outstanding  # 202: analysed again
            job = await kit.jobs.claim()
            assert job is not None and job.study_uid == alone.study_uid
            await kit.finish(job, result_id="flag-again", findings=True, pending=True)  # a second, allowed
            await kit.finish(job, result_id="measured", findings=True)
        finally:
            kit.close()
