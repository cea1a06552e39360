"""One study's analysis → its :class:`StudyResult`: a pure function, no I/O, no clock, no store.

The worker gathers the inputs (what the models found, what the store knows about the study, the hop
times it measured) and hands them here; the store then saves what comes out
(:class:`service.store.results.Results`). Keeping this pure means the result a test builds is the result
the service stores, and the store never calls back into the worker to build it.

Status (``StudyResult.status``): ``complete`` when every routed series was analysed; ``partial`` when
some findings exist and something was not analysed, or a series is short of its declared count;
``not_analysed`` when nothing was; ``failed`` after the job's last failed attempt. Priority: the most urgent
urgency of any positive finding, after the site's overrides (``worklist.priorities``,
:func:`service.worklist.policy.apply_overrides`).
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime

from service.inference.card import ModelCard
from service.inference.domain import InputSummary
from service.results.schema import (
    Assembly,
    Finding,
    HopTimes,
    ModelUsed,
    NotAnalysed,
    Priority,
    PriorityName,
    RemoteRequest,
    ResultStatus,
    StudyResult,
)
from service.worklist.policy import apply_overrides

__all__ = ["Analysis", "Hops", "StudyFacts", "build_result", "result_priority", "result_status"]


@dataclass
class Analysis:
    """What the models said about a study (:func:`service.analyse.analyse_study` fills it)."""

    findings: list[Finding] = field(default_factory=list)
    not_analysed: list[NotAnalysed] = field(default_factory=list)
    models: dict[str, ModelUsed] = field(default_factory=dict)
    remote_requests: list[RemoteRequest] = field(default_factory=list)
    """Requests sent to remote backends while analysing, failed ones included (the data left anyway)."""
    shadow: Analysis | None = None
    """What models in shadow mode said (their not-analysed reasons are not part of the result)."""
    inputs: list[InputSummary] = field(default_factory=list)
    """One summary per model and series, for the drift monitor (:mod:`service.lifecycle.drift`)."""

    def before_measuring(self) -> Analysis:
        """A copy of what is known before the segmentation models measure the positive findings (they
        replace findings and add reasons in this one): the measurements-pending result's content."""
        return Analysis(
            findings=sorted(self.findings, key=lambda f: (f.series_uid, f.model, f.label)),
            not_analysed=list(self.not_analysed),
            models=dict(self.models),
            remote_requests=list(self.remote_requests),
            shadow=self.shadow.before_measuring() if self.shadow is not None else None,
            inputs=list(self.inputs),
        )

    def record_model(
        self, card: ModelCard, providers: Sequence[str], code_version: str, inputs: Sequence[str]
    ) -> None:
        """Add a run of ``card`` on ``inputs`` (SOP instance UIDs) to the result's reproducibility record;
        the same model may run on several series of a study, so the instances accumulate."""
        earlier = self.models.get(card.name)
        self.models[card.name] = ModelUsed(
            name=card.name,
            version=card.version,
            sha256=card.sha256,
            provider=providers[0] if providers else "unknown",
            card_version=card.card_version,
            preprocessing_version=card.preprocessing.version,
            code_version=code_version,
            input_instances=(earlier.input_instances if earlier else []) + list(inputs),
        )


@dataclass(frozen=True)
class StudyFacts:
    """What the store knows about the study when its result is built."""

    accession_number: str | None = None
    first_received: datetime | None = None
    last_received: datetime | None = None
    supersedes: str | None = None


@dataclass(frozen=True)
class Hops:
    """Times the worker measured: the job's gate, inference start and end, and the moment of saving;
    ``flagged``: when a measurements-pending result of the same job put the findings on the worklist."""

    gate: datetime
    started: datetime
    done: datetime
    stored: datetime
    flagged: datetime | None = None


def result_status(
    analysis: Analysis, *, failed: bool = False, assembly: Assembly | None = None
) -> ResultStatus:
    """Never ``complete`` when a series has fewer instances than it declares (``assembly.complete``)."""
    if failed:
        return "failed"
    if not analysis.findings:
        return "not_analysed"
    if analysis.not_analysed or (assembly is not None and assembly.complete is False):
        return "partial"
    return "complete"


def result_priority(findings: list[Finding]) -> PriorityName:
    """The most urgent urgency among positive findings; routine when none is positive."""
    urgencies: list[PriorityName] = [f.urgency for f in findings if f.positive] or ["routine"]
    return min(urgencies, key=Priority.of)


def build_result(
    study_uid: str,
    analysis: Analysis,
    facts: StudyFacts,
    hops: Hops,
    *,
    failed: bool = False,
    overrides: Mapping[str, str] | None = None,
    result_id: str | None = None,
    assembly: Assembly | None = None,
    measurements_pending: bool = False,
) -> StudyResult:
    """The study's result; ``overrides`` are the site's ``model/label`` → urgency settings; ``assembly``
    how complete the analysed series were (:func:`service.assemble.completeness`);
    ``measurements_pending``: the classifiers' findings, before the segmentation measures them."""
    findings = apply_overrides(analysis.findings, overrides or {})
    last = facts.last_received
    return StudyResult(
        result_id=result_id or str(uuid.uuid4()),
        study_uid=study_uid,
        accession_number=facts.accession_number,
        status=result_status(analysis, failed=failed, assembly=assembly),
        priority=result_priority(findings),
        findings=findings,
        not_analysed=analysis.not_analysed,
        models=sorted(analysis.models.values(), key=lambda m: m.name),
        timestamps=HopTimes(
            first_instance_received=facts.first_received,
            last_instance_received=last,
            # complete when the gate opened, never before the last instance it waited for
            study_complete=max(hops.gate, last) if last else hops.gate,
            inference_started=hops.started,
            inference_done=hops.done,
            result_stored=hops.stored,
            # updated in the result's transaction (first in the measurements-pending one's)
            worklist_updated=hops.flagged or hops.stored,
        ),
        supersedes=facts.supersedes,
        measurements_pending=measurements_pending,
        assembly=assembly,
        remote_requests=analysis.remote_requests,
        shadow_findings=analysis.shadow.findings if analysis.shadow else [],
        shadow_models=sorted(analysis.shadow.models.values(), key=lambda m: m.name)
        if analysis.shadow
        else [],
    )
