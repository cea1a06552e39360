"""Ingest: durable files then rows, duplicates stored once, a job per study, claimed at once on request."""

from __future__ import annotations

from datetime import timedelta
from io import BytesIO

import pytest
from pydicom import dcmread
from pydicom.uid import generate_uid

from service.clock import utcnow
from service.store.validate import parse_instance
from tests.service.dicom_factory import chest, head_ct_series, to_bytes
from tests.service.store.kit import Kit

pytestmark = pytest.mark.anyio


async def test_an_instance_is_stored_once_and_its_file_read_back_as_sent(kit: Kit) -> None:
    data = chest()
    inst = parse_instance(data, "part 1")
    done = await kit.instances.ingest([inst, inst], not_before=utcnow())
    assert len(done.gates) == 1 and done.claimed == []
    (record,) = await kit.instances.records(inst.study_uid)
    assert record == kit.instances.record(inst)
    assert record.path.read_bytes() == data
    again = await kit.instances.ingest([inst], not_before=utcnow())  # a retry: nothing new, no new job
    assert again.gates == []
    assert await kit.instances.paths([inst.sop_instance_uid, generate_uid()]) == {
        inst.sop_instance_uid: record.path
    }


async def test_a_study_complete_on_arrival_is_claimed_in_the_ingest_transaction(kit: Kit) -> None:
    inst = parse_instance(chest(), "part 1")
    done = await kit.instances.ingest([inst], not_before=utcnow(), priority=1, claim=kit.jobs)
    (job,) = done.claimed
    assert job.study_uid == inst.study_uid and job.priority == 1 and job.attempts == 1
    assert await kit.jobs.claim() is None  # ours already: no worker sees it
    assert await kit.jobs.heartbeat([job.id]) == 1  # leased like any claimed job
    # a study still behind its quiet timer is not claimed
    later = parse_instance(chest(), "part 1")
    waiting = await kit.instances.ingest([later], not_before=utcnow() + timedelta(hours=1), claim=kit.jobs)
    assert waiting.claimed == []


async def test_a_full_series_opens_the_gate_before_the_quiet_timer(kit: Kit) -> None:
    study = generate_uid()
    datasets = [dcmread(BytesIO(d)) for d in head_ct_series(4, study_uid=study)]
    for ds in datasets:
        ds.ImagesInAcquisition = 4  # the sender says how many images the series will have
    series = [parse_instance(to_bytes(ds), f"part {i}") for i, ds in enumerate(datasets)]
    quiet = utcnow() + timedelta(hours=1)
    first = await kit.instances.ingest(series[:3], not_before=quiet)
    assert first.gates == [quiet]
    last = await kit.instances.ingest(series[3:], not_before=quiet)
    assert last.gates[0] < quiet  # every image series full: due now
    assert len(await kit.instances.records(study)) == 4


async def test_the_ingest_that_creates_a_study_hands_over_its_result_context(kit: Kit) -> None:
    """One upsert per study row (no SELECT first): it counts, keeps the first accession, and says when it
    created the study, with what a result's build would otherwise read back (the one-pass path's saving).
    A study that existed (a second request, or one whose instances retention purged) is read as before."""
    study = generate_uid()
    first = parse_instance(chest(study_uid=study), "part 1")
    before = utcnow()
    done = await kit.instances.ingest([first], not_before=utcnow(), claim=kit.jobs)
    context = done.created[study]
    assert context == await kit.results.context(study)  # what the worker would have read
    assert context.supersedes is None and context.accession_number == first.accession_number
    assert context.first_received == context.last_received
    assert context.first_received is not None and before <= context.first_received <= utcnow()
    assert done.whole == {study}
    ds = dcmread(BytesIO(chest(study_uid=study)))
    del ds.AccessionNumber  # a later instance without one keeps the study's
    again = await kit.instances.ingest([parse_instance(to_bytes(ds), "part 1")], not_before=utcnow())
    assert again.created == {} and again.whole == set()
    stored = await kit.results.context(study)
    assert (
        stored.accession_number == first.accession_number and stored.first_received == context.first_received
    )
    assert len(await kit.instances.records(study)) == 2
