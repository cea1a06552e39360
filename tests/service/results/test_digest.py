"""The worklist's digest of a stored result (service/results/digest.py) reads the same values as the whole
result, from the same stored JSON, and ignores everything else in it."""

from __future__ import annotations

from datetime import UTC, datetime

from service.results.digest import ResultDigest
from service.results.schema import Code, Finding, HopTimes, Lesion, Segment, StudyResult
from tests.service.deliver.messages import make_result

FIRST = datetime(2026, 12, 5, 4, 0, 0, tzinfo=UTC)
FLAGGED = datetime(2026, 12, 5, 4, 0, 1, 500000, tzinfo=UTC)
BLOOD = Code(scheme="SCT", value="1386000", meaning="Intracranial hemorrhage")


def _segmented() -> StudyResult:
    segment = Segment(
        model="ct-hemorrhage-seg",
        model_version="1.0.0",
        model_sha256="cd" * 32,
        label="hemorrhage",
        code=BLOOD,
        threshold=0.5,
        volume_ml=12.5,
        max_axial_diameter_mm=41.0,
        lesions=[Lesion(volume_ml=12.5, max_axial_diameter_mm=41.0, widest_instance_uid="1.2.3.5")],
        voxel_mm=(0.9, 0.9, 5.0),
        slice_spacing_source="positions",
        rows=256,
        columns=256,
        instances=["1.2.3.5", "1.2.3.6"],
    )
    finding = Finding(
        model="ct-hemorrhage",
        model_version="1.0.0",
        model_sha256="ab" * 32,
        label="hemorrhage",
        code=BLOOD,
        probability=0.91,
        threshold=0.06,
        positive=True,
        urgent=True,
        urgency="stat",
        series_uid="1.2.3.4",
        segments=[segment],
    )
    return StudyResult(
        result_id="0f1e2d3c-4b5a-4978-8695-a4b3c2d1e0f9",
        study_uid="1.2.826.0.1.3680043.8.498.2",
        status="complete",
        priority="stat",
        findings=[finding],
        timestamps=HopTimes(first_instance_received=FIRST, worklist_updated=FLAGGED, result_stored=FLAGGED),
    )


def test_the_digest_reads_what_the_whole_result_says():
    for result in (make_result(), _segmented()):
        digest = ResultDigest.model_validate_json(result.model_dump_json())
        assert (digest.result_id, digest.status) == (result.result_id, result.status)
        assert [(f.model, f.label, f.probability, f.positive, f.urgency) for f in digest.findings] == [
            (f.model, f.label, f.probability, f.positive, f.urgency) for f in result.findings
        ]
        assert [[(s.volume_ml, s.max_axial_diameter_mm) for s in f.segments] for f in digest.findings] == [
            [(s.volume_ml, s.max_axial_diameter_mm) for s in f.segments] for f in result.findings
        ]
        assert digest.timestamps.first_instance_received == result.timestamps.first_instance_received
        assert digest.timestamps.worklist_updated == result.timestamps.worklist_updated


def test_members_it_does_not_name_are_skipped_and_absent_ones_default():
    digest = ResultDigest.model_validate_json(
        '{"result_id": "r", "status": "not_analysed", "future_member": {"x": [1, 2]}, "models": []}'
    )
    assert digest.findings == [] and digest.timestamps.worklist_updated is None
