"""FHIR R4 DiagnosticReport and Flag: one transaction Bundle per result, POSTed to ``notify.fhir_base_url``.

The Bundle (FHIR R4 http.html#transaction) holds::

    DiagnosticReport  preliminary, category RAD, LOINC 18748-4; the patient and the ImagingStudy by
                      identifier (logical references: no server ids needed); one contained Observation per
                      finding (probability, POS/NEG, the model as method and device); conclusionCode =
                      the positive findings' codes
    Flag              only with a positive finding and a known patient: active, category clinical, code =
                      the most urgent positive finding, the flag-priority and flag-detail extensions
    Provenance        when a model ran: the reproducibility record (FHIR R4 provenance.html) targeting the
                      report; one agent (a Device, by display) per model with its version, sha256, card
                      and preprocessing versions, our version and execution provider; one source entity
                      per input instance (SOP Instance UID as identifier, system urn:dicom:uid)

The report and the Flag are conditional creates (``ifNoneExist`` on an identifier derived from the result
id); Provenance has no identifier in R4, so it is a PUT to an id derived from the result id. Either way a
retry after a lost response does not duplicate anything. The resources are built with ``fhir.resources``
(its R4B models: R4B changed none of these three resources from R4), which validates them on construction.

A 2xx answer whose entries all report 2xx is success; anything else raises :class:`FHIRError` with the
OperationOutcome's text, redacted of the patient's identifiers since the outbox logs and stores it.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from datetime import datetime
from typing import Any

import httpx
from fhir.resources.R4B.bundle import Bundle
from fhir.resources.R4B.diagnosticreport import DiagnosticReport
from fhir.resources.R4B.flag import Flag
from fhir.resources.R4B.observation import Observation
from fhir.resources.R4B.provenance import Provenance
from pydicom.dataset import Dataset

from service.clock import utcnow
from service.config import NotifySettings
from service.deliver.hl7 import DISCLAIMER, read_header, redact
from service.errors import FHIRError
from service.results.schema import Code, Finding, Priority, StudyResult
from service.store.notify import NotificationInfo, shown_target

__all__ = ["build_bundle", "coding", "patient_reference", "send_fhir"]

logger = logging.getLogger(__name__)

FHIR_JSON = "application/fhir+json"
URI = "urn:ietf:rfc:3986"
UCUM = "http://unitsofmeasure.org"
SYSTEMS: dict[str, str] = {
    "SCT": "http://snomed.info/sct",
    "LN": "http://loinc.org",
    "DCM": "http://dicom.nema.org/resources/ontology/DCM",
    "RADLEX": "http://radlex.org",
}
"""DICOM coding scheme designators (PS3.16 section 8) → FHIR code system URIs."""
PATIENT_ID_SYSTEM = "urn:dicom:patient-id"
"""Identifier.system for a PatientID whose issuer has no universal id (IssuerOfPatientID goes to assigner)."""
FLAG_PRIORITY: dict[str, str] = {"stat": "PH", "urgent": "PM", "routine": "PL"}
"""http://hl7.org/fhir/flag-priority-code: high, medium, low."""
FLAG_PRIORITY_DISPLAY = {"PH": "High priority", "PM": "Medium priority", "PL": "Low priority"}
REPORT_CODE = {"system": SYSTEMS["LN"], "code": "18748-4", "display": "Diagnostic imaging study"}
_NAMESPACE = uuid.UUID("6f1c8f1e-7d2a-4f55-9a3e-2f1d1b3c9a10")
"""uuid5 namespace for ids derived from a result id, so that a retry repeats them."""


def coding(code: Code) -> dict[str, str]:
    """A FHIR Coding from a DICOM-style code; an unknown scheme keeps its code without a system."""
    out = {"code": code.value, "display": code.meaning}
    if code.scheme.upper() in SYSTEMS:
        out["system"] = SYSTEMS[code.scheme.upper()]
    return out


def patient_reference(ds: Dataset | None) -> dict[str, Any] | None:
    """Reference(Patient) by identifier: the PatientID, its issuer's universal id as the system if given."""
    patient_id = str(ds.get("PatientID") or "") if ds is not None else ""
    if ds is None or not patient_id:
        return None
    identifier: dict[str, Any] = {"system": PATIENT_ID_SYSTEM, "value": patient_id}
    qualifiers = ds.get("IssuerOfPatientIDQualifiersSequence")
    q = qualifiers[0] if qualifiers else Dataset()
    universal, kind = str(q.get("UniversalEntityID") or ""), str(q.get("UniversalEntityIDType") or "")
    if universal and kind == "ISO":
        identifier["system"] = f"urn:oid:{universal}"
    elif universal and kind in ("URI", "URL"):
        identifier["system"] = universal
    if q.get("IdentifierTypeCode"):
        identifier["type"] = {
            "coding": [
                {"system": "http://terminology.hl7.org/CodeSystem/v2-0203", "code": q.IdentifierTypeCode}
            ]
        }
    if ds.get("IssuerOfPatientID"):
        identifier["assigner"] = {"display": str(ds.IssuerOfPatientID)}
    return {"type": "Patient", "identifier": identifier}


def _urn(result_id: str, part: str = "") -> str:
    """``urn:uuid:`` of the result id (a UUID already), or of a name derived from it for ``part``."""
    try:
        base = uuid.UUID(result_id)
    except ValueError:
        base = uuid.uuid5(_NAMESPACE, result_id)
    return f"urn:uuid:{uuid.uuid5(base, part) if part else base}"


def _instant(at: datetime) -> str:
    return at.isoformat(timespec="milliseconds")


def _study_date(ds: Dataset | None) -> str | None:
    """StudyDate as a FHIR date; not StudyTime, since a dateTime with a time needs a zone DICOM may lack."""
    d = str(ds.get("StudyDate") or "") if ds is not None else ""
    return f"{d[:4]}-{d[4:6]}-{d[6:8]}" if len(d) == 8 and d.isdigit() else None


def _observation(i: int, f: Finding, result: StudyResult, subject: dict[str, Any] | None) -> Observation:
    method = f"{f.model} {f.model_version}"
    return Observation(
        id=f"finding-{i}",
        status="preliminary",
        category=[
            {
                "coding": [
                    {
                        "system": "http://terminology.hl7.org/CodeSystem/observation-category",
                        "code": "imaging",
                        "display": "Imaging",
                    }
                ]
            }
        ],
        code={"coding": [coding(f.code)], "text": f.label},
        subject=subject,
        effectiveDateTime=_instant(result.timestamps.inference_done)
        if result.timestamps.inference_done
        else None,
        valueQuantity={"value": round(f.probability, 4), "unit": "probability", "system": UCUM, "code": "1"},
        interpretation=[
            {
                "coding": [
                    {
                        "system": "http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation",
                        "code": "POS" if f.positive else "NEG",
                        "display": "Positive" if f.positive else "Negative",
                    }
                ]
            }
        ],
        referenceRange=[
            {
                "high": {"value": f.threshold, "system": UCUM, "code": "1"},
                "text": "probability below the model's threshold: negative",
            }
        ],
        method={"text": method},
        device={"display": f"{method} (sha256 {f.model_sha256[:12]})"},
        derivedFrom=[_imaging_study(result)],
    )


def _imaging_study(result: StudyResult) -> dict[str, Any]:
    return {
        "type": "ImagingStudy",
        "identifier": {"system": "urn:dicom:uid", "value": f"urn:oid:{result.study_uid}"},
    }


def _most_urgent(findings: list[Finding]) -> Finding | None:
    positive = [f for f in findings if f.positive]
    return min(positive, key=lambda f: (Priority.of(f.urgency), -f.probability), default=None)


def build_bundle(
    result: StudyResult,
    ds: Dataset | None,
    *,
    accession_number: str | None = None,
    now: datetime | None = None,
) -> Bundle:
    """The transaction Bundle for one result (validated by ``fhir.resources`` as it is built).

    Parameters
    ----------
    result
        The stored result; each finding becomes a contained Observation.
    ds
        A header of the study for the patient identifier and the study date; without one the report has no
        subject and no Flag is sent (Flag.subject is required).
    accession_number
        ``basedOn`` a ServiceRequest by its accession number (identifier type ACSN), when known.
    now
        ``issued`` and the Flag's start when the result carries no ``result_stored`` time.
    """
    now = now or utcnow()
    subject = patient_reference(ds)
    accession = accession_number or (str(ds.get("AccessionNumber") or "") if ds is not None else "") or None
    report_urn = _urn(result.result_id)
    issued = result.timestamps.result_stored or now
    findings = result.findings
    positives = [f for f in findings if f.positive]
    summary = "; ".join(
        f"{f.code.meaning} {'present' if f.positive else 'absent'} (p={f.probability:.2f})" for f in findings
    )
    report = DiagnosticReport(
        identifier=[{"system": URI, "value": report_urn}],
        basedOn=[
            {
                "type": "ServiceRequest",
                "identifier": {
                    "type": {
                        "coding": [
                            {"system": "http://terminology.hl7.org/CodeSystem/v2-0203", "code": "ACSN"}
                        ]
                    },
                    "value": accession,
                },
            }
        ]
        if accession
        else None,
        status="preliminary",
        category=[
            {
                "coding": [
                    {
                        "system": "http://terminology.hl7.org/CodeSystem/v2-0074",
                        "code": "RAD",
                        "display": "Radiology",
                    }
                ]
            }
        ],
        code={"coding": [REPORT_CODE], "text": "AI triage"},
        subject=subject,
        effectiveDateTime=_study_date(ds),
        issued=_instant(issued),
        imagingStudy=[_imaging_study(result)],
        contained=[_observation(i + 1, f, result, subject) for i, f in enumerate(findings)] or None,
        result=[{"reference": f"#finding-{i + 1}"} for i in range(len(findings))] or None,
        conclusion=f"AI triage, {result.priority} ({DISCLAIMER}): {summary or 'no findings'}.",
        conclusionCode=[{"coding": [coding(f.code)], "text": f.label} for f in positives] or None,
    )
    entries: list[dict[str, Any]] = [_entry(report_urn, report)]

    top = _most_urgent(findings)
    if top is not None and subject is not None:
        flag_urn = _urn(result.result_id, "flag")
        priority = FLAG_PRIORITY[top.urgency]
        flag = Flag(
            identifier=[{"system": URI, "value": flag_urn}],
            extension=[
                {
                    "url": "http://hl7.org/fhir/StructureDefinition/flag-priority",
                    "valueCodeableConcept": {
                        "coding": [
                            {
                                "system": "http://hl7.org/fhir/flag-priority-code",
                                "code": priority,
                                "display": FLAG_PRIORITY_DISPLAY[priority],
                            }
                        ]
                    },
                },
                {
                    "url": "http://hl7.org/fhir/StructureDefinition/flag-detail",
                    "valueReference": {"reference": report_urn},
                },
            ],
            status="active",
            category=[
                {
                    "coding": [
                        {
                            "system": "http://terminology.hl7.org/CodeSystem/flag-category",
                            "code": "clinical",
                            "display": "Clinical",
                        }
                    ]
                }
            ],
            code={"coding": [coding(top.code)], "text": f"AI triage: {top.code.meaning} ({DISCLAIMER})"},
            subject=subject,
            period={"start": _instant(issued)},
            author={"display": "pacs-triage"},
        )
        entries.append(_entry(flag_urn, flag))
    if result.models:
        entries.append(_provenance_entry(result, report_urn, issued))
    return Bundle(type="transaction", entry=entries)


def _provenance_entry(result: StudyResult, report_urn: str, recorded: datetime) -> dict[str, Any]:
    """The reproducibility record as a Provenance of the report (see the module docstring)."""
    provenance_id = _urn(result.result_id, "provenance").removeprefix("urn:uuid:")
    inputs = dict.fromkeys(uid for m in result.models for uid in m.input_instances)
    provenance = Provenance(
        id=provenance_id,
        target=[{"reference": report_urn}],
        recorded=_instant(recorded),
        activity={
            "coding": [
                {
                    "system": "http://terminology.hl7.org/CodeSystem/v3-DataOperation",
                    "code": "CREATE",
                    "display": "create",
                }
            ]
        },
        agent=[
            {
                "type": {
                    "coding": [
                        {
                            "system": "http://terminology.hl7.org/CodeSystem/provenance-participant-type",
                            "code": "performer",
                            "display": "Performer",
                        }
                    ]
                },
                "who": {"type": "Device", "display": m.describe()},
            }
            for m in result.models
        ],
        entity=[
            {"role": "source", "what": {"identifier": {"system": "urn:dicom:uid", "value": f"urn:oid:{uid}"}}}
            for uid in inputs
        ]
        or None,
    )
    return {
        "fullUrl": f"urn:uuid:{provenance_id}",
        "resource": provenance,
        "request": {"method": "PUT", "url": f"Provenance/{provenance_id}"},
    }


def _entry(urn: str, resource: DiagnosticReport | Flag) -> dict[str, Any]:
    kind = resource.get_resource_type()
    return {
        "fullUrl": urn,
        "resource": resource,
        "request": {"method": "POST", "url": kind, "ifNoneExist": f"identifier={URI}|{urn}"},
    }


def _outcome_text(body: bytes) -> str:
    """The OperationOutcome's issue texts (diagnostics, details), or '' when the body is not one."""
    try:
        doc = json.loads(body)
    except ValueError:
        return ""
    if not isinstance(doc, dict) or doc.get("resourceType") != "OperationOutcome":
        return ""
    texts = []
    for issue in doc.get("issue") or []:
        text = issue.get("diagnostics") or (issue.get("details") or {}).get("text") or issue.get("code")
        if text:
            texts.append(f"{issue.get('severity', 'error')}: {text}")
    return "; ".join(texts)


def _failed_entries(body: bytes) -> list[str]:
    """Entry statuses of a transaction-response that are not 2xx (a server answering like a batch)."""
    try:
        doc = json.loads(body)
    except ValueError:
        return []
    if not isinstance(doc, dict) or doc.get("resourceType") != "Bundle":
        return []
    statuses = [str((e.get("response") or {}).get("status", "")) for e in doc.get("entry") or []]
    return [s for s in statuses if s and not s.startswith("2")]


def send_fhir(n: NotificationInfo, settings: NotifySettings) -> None:
    """POST the transaction Bundle to the base URL; raise on anything but success so the outbox retries."""
    if n.result is None:
        raise FHIRError("the notification has no stored result to send")
    ds = read_header(n.header_path)
    body = build_bundle(n.result, ds, accession_number=n.accession_number).model_dump_json()
    base = n.target.rstrip("/")
    shown = shown_target(n.target)  # errors and logs: a base URL may carry user:password@
    started = time.monotonic()
    try:
        response = httpx.post(
            base,
            content=body.encode(),
            headers={"Content-Type": FHIR_JSON, "Accept": FHIR_JSON, "User-Agent": "pacs-triage"},
            timeout=settings.timeout_seconds,
        )
    except httpx.HTTPError as exc:
        raise FHIRError(f"{shown}: {type(exc).__name__}: {str(exc).replace(base, shown)}") from exc
    failed = _failed_entries(response.content) if response.is_success else []
    if not response.is_success or failed:
        detail = _outcome_text(response.content) or (f"entries {', '.join(failed)}" if failed else "")
        detail = redact(detail, ds, [n.accession_number])[:500]
        raise FHIRError(f"{shown} answered HTTP {response.status_code}" + (f": {detail}" if detail else ""))
    logger.info(
        "FHIR transaction for result %s accepted by %s: HTTP %d (%.0f ms)",
        n.result.result_id,
        shown,
        response.status_code,
        (time.monotonic() - started) * 1000,
    )
