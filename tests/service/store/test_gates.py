"""The assembly gate's counts (:func:`service.store.gates.series_fill`): image series only, each counted from
the index on (series_uid, role) alone, so a group commit's cost does not grow with the series."""

from __future__ import annotations

from datetime import timedelta
from io import BytesIO

import pytest
from pydicom import dcmread
from pydicom.uid import BasicTextSRStorage, generate_uid
from sqlalchemy import select, text
from sqlalchemy.orm import Session

from service.clock import utcnow
from service.store.db import SeriesRow
from service.store.gates import _IMAGES_IN_SERIES, series_fill
from service.store.validate import parse_instance
from tests.service.dicom_factory import head_ct_series, to_bytes
from tests.service.store.kit import Kit, counted_series


def _report(study_uid: str) -> bytes:
    """A text SR in its own series of the study: an instance whose role is not "image"."""
    ds = dcmread(BytesIO(head_ct_series(1, study_uid=study_uid)[0]))
    del ds.PixelData
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = BasicTextSRStorage
    ds.Modality, ds.SeriesInstanceUID = "SR", generate_uid()
    return to_bytes(ds)


def test_image_series_only_each_with_its_declared_count(kit: Kit) -> None:
    counted = counted_series(3)[:2]  # declares 3, two arrived
    study = counted[0].study_uid
    uncounted = [parse_instance(d, "test") for d in head_ct_series(1, study_uid=study)]
    report = parse_instance(_report(study), "test", images_only=False)
    assert report.role != "image"
    kit.db.run_blocking(
        kit.instances.commit_rows,
        [*counted, *uncounted, report],
        not_before=utcnow() + timedelta(hours=1),
        hold_until=None,
        complete_when_full=True,
    )
    fill = kit.db.run_blocking(lambda s: series_fill(s, study))
    assert sorted(fill, key=str) == [(3, 2), (None, 1)]  # the SR's series is not an image series
    assert kit.db.run_blocking(lambda s: series_fill(s, generate_uid())) == []


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_counted_from_the_index_alone(kit: Kit) -> None:
    """SQLite answers each series' count from the covering index: no instance row is read (1.4 ms per
    group commit at 2,400 instances before migration 0003, bench/RESULTS.md session 30)."""
    query = select(SeriesRow.expected_instances, _IMAGES_IN_SERIES).where(SeriesRow.study_uid == "1.2")
    with Session(kit.db.engine) as s:
        sql = str(query.compile(s.get_bind(), compile_kwargs={"literal_binds": True}))
        plan = " | ".join(str(row[-1]) for row in s.execute(text("EXPLAIN QUERY PLAN " + sql)))
    assert "COVERING INDEX ix_instances_series_role" in plan, plan
