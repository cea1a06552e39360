"""The worklist's digest of a stored result (service/results/digest.py) reads the same values as the whole
result, from the same stored JSON, and ignores everything else in it."""

from __future__ import annotations

from datetime import UTC, datetime

from service.results.digest import ResultDigest
from service.results.schema import HopTimes
from tests.service.deliver.messages import make_result
from tests.service.results.test_seg import ct_series, known_mask, segmented_result

FIRST = datetime(2026, 12, 5, 4, 0, 0, tzinfo=UTC)
FLAGGED = datetime(2026, 12, 5, 4, 0, 1, 500000, tzinfo=UTC)


def _segmented():
    """A head CT result with a measured segment (the builder test_seg.py checks against dciodvfy), flagged."""
    result = segmented_result(ct_series(), known_mask(6, 32))
    times = HopTimes(first_instance_received=FIRST, worklist_updated=FLAGGED, result_stored=FLAGGED)
    return result.model_copy(update={"timestamps": times})


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
