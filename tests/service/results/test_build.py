"""results.build: status, priority (with site overrides), hop times and supersedes, from plain inputs."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from service.results.build import Analysis, Hops, StudyFacts, build_result, result_priority
from service.results.schema import Code, Finding, ModelUsed, NotAnalysed

T0 = datetime(2026, 1, 1, 8, 0, tzinfo=UTC)


def _finding(label: str, positive: bool, urgency: str = "stat", probability: float = 0.9) -> Finding:
    return Finding(
        model="cxr-pneumothorax",
        model_version="1",
        model_sha256="0" * 64,
        label=label,
        code=Code(scheme="SCT", value="36118008", meaning="Pneumothorax"),
        probability=probability,
        threshold=0.5,
        positive=positive,
        urgent=positive and urgency != "routine",
        urgency=urgency,
        series_uid="1.2.3",
    )


def _hops() -> Hops:
    return Hops(
        gate=T0,
        started=T0 + timedelta(seconds=1),
        done=T0 + timedelta(seconds=2),
        stored=T0 + timedelta(seconds=3),
    )


def test_a_positive_stat_finding_makes_a_complete_stat_result() -> None:
    analysis = Analysis(
        findings=[_finding("pneumothorax", True)],
        models={
            "cxr-pneumothorax": ModelUsed(
                name="cxr-pneumothorax", version="1", sha256="0" * 64, provider="CPU"
            )
        },
    )
    facts = StudyFacts(
        accession_number="A1",
        first_received=T0 - timedelta(seconds=5),
        last_received=T0 - timedelta(seconds=1),
        supersedes="old",
    )
    result = build_result("1.2", analysis, facts, _hops(), result_id="r1")
    assert (result.result_id, result.status, result.priority, result.supersedes) == (
        "r1",
        "complete",
        "stat",
        "old",
    )
    assert result.accession_number == "A1" and [m.name for m in result.models] == ["cxr-pneumothorax"]
    t = result.timestamps
    assert t.first_instance_received == T0 - timedelta(seconds=5)
    assert t.study_complete == T0  # the gate opened after the last instance
    assert t.inference_started == T0 + timedelta(seconds=1) and t.inference_done == T0 + timedelta(seconds=2)
    assert t.result_stored == t.worklist_updated == T0 + timedelta(seconds=3)


def test_study_complete_is_never_before_the_last_instance() -> None:
    late = StudyFacts(last_received=T0 + timedelta(seconds=10))
    result = build_result("1.2", Analysis(), late, _hops())
    assert result.timestamps.study_complete == T0 + timedelta(seconds=10)


def test_status_partial_not_analysed_and_failed() -> None:
    skipped = NotAnalysed(series_uid="1.2.4", reason="not analysed: no model for MR")
    partial = Analysis(findings=[_finding("pneumothorax", False)], not_analysed=[skipped])
    assert build_result("1.2", partial, StudyFacts(), _hops()).status == "partial"
    assert (
        build_result("1.2", Analysis(not_analysed=[skipped]), StudyFacts(), _hops()).status == "not_analysed"
    )
    failed = build_result("1.2", Analysis(), StudyFacts(), _hops(), failed=True)
    assert failed.status == "failed" and failed.priority == "routine"


def test_priority_is_the_most_urgent_positive_after_site_overrides() -> None:
    assert result_priority([_finding("a", False, "stat"), _finding("b", True, "urgent")]) == "urgent"
    assert result_priority([_finding("a", False, "stat")]) == "routine"
    analysis = Analysis(findings=[_finding("pneumothorax", True, "stat")])
    lowered = build_result(
        "1.2", analysis, StudyFacts(), _hops(), overrides={"cxr-pneumothorax/pneumothorax": "routine"}
    )
    assert lowered.priority == "routine" and not lowered.findings[0].urgent


def test_each_build_gets_a_new_result_id() -> None:
    a = build_result("1.2", Analysis(), StudyFacts(), _hops())
    b = build_result("1.2", Analysis(), StudyFacts(), _hops())
    assert a.result_id != b.result_id
