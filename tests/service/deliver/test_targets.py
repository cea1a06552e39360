"""Which notifications a stored result creates (``notification_targets``): an urgent webhook alerts once per
flag, even when the measured result follows the measurements-pending one; HL7 and FHIR get every result."""

from __future__ import annotations

from datetime import timedelta

from service.clock import utcnow
from service.config import NotifySettings
from service.deliver.notify import notification_targets
from service.results.schema import HopTimes, StudyResult
from tests.service.store.kit import finding

SETTINGS = NotifySettings(
    webhooks=["https://hooks.example/alert"],
    hl7_endpoints=["ris:2575"],
    fhir_base_url="https://fhir.example/r4",
)


def _result(pending: bool, flagged_earlier: bool) -> StudyResult:
    stored = utcnow()
    flagged = stored - timedelta(milliseconds=250) if flagged_earlier else stored
    return StudyResult(
        result_id="r",
        study_uid="1.2.3",
        status="complete",
        priority="stat",
        findings=[finding("stat")],
        measurements_pending=pending,
        timestamps=HopTimes(result_stored=stored, worklist_updated=flagged),
    )


def test_the_flag_alerts_and_its_measured_result_only_updates_the_records() -> None:
    targets = notification_targets(SETTINGS)
    records = [("hl7", "ris:2575"), ("fhir", "https://fhir.example/r4")]
    assert targets(_result(pending=True, flagged_earlier=False)) == [
        ("webhook", "https://hooks.example/alert"),
        *records,
    ]
    assert targets(_result(pending=False, flagged_earlier=True)) == records  # measured: no second alert
    assert targets(_result(pending=False, flagged_earlier=False))[0][0] == "webhook"  # a plain result
