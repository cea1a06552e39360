"""HL7 v2.5.1 ORU^R01 to the RIS over MLLP: one preliminary AI result per message, retried until acknowledged.

The message (HL7 v2.5.1 chapter 7, ORU^R01 unsolicited observation)::

    MSH  PACS_TRIAGE, control id from the notification id (a retry carries the same one)
    PID  from a stored DICOM instance: PatientID with its issuer, name, birth date, sex
    ORC  RE (observations to follow), ORC-7 priority (TQ-6, table 0027: S stat, A ASAP, R routine)
    OBR  filler order number, universal service id, OBR-25 P (preliminary), OBR-27 priority
    NTE  "AI result, not for diagnostic use"
    TQ1  TQ1-9 priority (table 0485), where v2.5 moved the priority of ORC-7/OBR-27
    OBX  per finding: CWE, OBX-3 the finding's code, OBX-5 SNOMED CT Present/Absent
    OBX  per finding: NM, OBX-3 "AI probability", OBX-5 the probability, same OBX-4 sub-id

Every OBX is status P (preliminary) and names the model in OBX-17 (observation method) and OBX-18
(equipment instance). hl7apy builds the message and validates its structure (STRICT) before it is sent.

MLLP (HL7 v2 Transport Specification: MLLP, release 2): ``<VT> message <FS><CR>`` both ways. The ACK's
MSA-1 decides: AA or CA is success; AE, AR, CE, CR, a control id in MSA-2 that is not ours, no ACK within
``notify.timeout_seconds``, or a closed connection raise :class:`HL7Error`, and the outbox retries.
The ACK is read by splitting its segments rather than with hl7apy, which refuses HL7 versions it does not
know, and an ACK's version is the RIS's choice.

PHI goes into the message (the RIS needs it) but never into logs or errors: the RIS's error text is
redacted of the patient's identifiers before it is raised, since the outbox logs and stores it.
"""

from __future__ import annotations

import hashlib
import logging
import re
import socket
import time
from collections.abc import Iterable
from datetime import datetime
from pathlib import Path
from typing import Any

import pydicom
from hl7apy.consts import VALIDATION_LEVEL
from hl7apy.core import Message
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue

from service.clock import utcnow
from service.config import NotifySettings
from service.errors import HL7Error
from service.results.schema import Finding, StudyResult
from service.store.notify import NotificationInfo

__all__ = [
    "build_oru",
    "control_id",
    "mllp_frame",
    "parse_ack",
    "read_header",
    "redact",
    "send_hl7",
]

logger = logging.getLogger(__name__)

VERSION = "2.5.1"
SENDING_APPLICATION = "PACS_TRIAGE"
DISCLAIMER = "AI result, not for diagnostic use"

PRIORITY_CODES: dict[str, str] = {"stat": "S", "urgent": "A", "routine": "R"}
"""HL7 table 0027 (TQ-6 in ORC-7/OBR-27) and table 0485 (TQ1-9): S stat, A ASAP, R routine."""
PRIORITY_TEXT: dict[str, str] = {"S": "Stat", "A": "ASAP", "R": "Routine"}

PRESENT = "52101004^Present^SCT"
"""SNOMED CT 52101004 |Present (qualifier value)|, OBX-5 of a positive finding."""
ABSENT = "2667000^Absent^SCT"
"""SNOMED CT 2667000 |Absent (qualifier value)|, OBX-5 of a negative finding."""
PROBABILITY = "AIPROB^AI model probability^L"
"""OBX-3 of the numeric OBX: a local code (table 0396 "L"); OBX-4 ties it to its finding's CWE OBX."""

ACCEPTED = frozenset({"AA", "CA"})
"""MSA-1 (table 0008): application accept (original mode) or commit accept (enhanced mode)."""

SB, EB, CR = b"\x0b", b"\x1c", b"\x0d"
MAX_ACK_BYTES = 1 << 20


def control_id(n: NotificationInfo) -> str:
    """MSH-10: the notification id plus a digest of the result id, so retries repeat it and a fresh
    database does not (a RIS may drop a control id it has already seen). At most 20 characters
    (MSH-10's length in v2.5.1)."""
    digest = hashlib.sha256((n.result.result_id if n.result else n.study_uid).encode()).hexdigest()
    return f"PT{n.id}-{digest[:6]}"


def read_header(path: Path | None) -> Dataset | None:
    """The stored instance's header (no pixels), or None when it is gone or unreadable."""
    if path is None:
        return None
    try:
        return pydicom.dcmread(path, stop_before_pixels=True)
    except (OSError, InvalidDicomError) as exc:
        logger.warning("cannot read the study header for demographics: %s", type(exc).__name__)
        return None


def redact(text: str, ds: Dataset | None, extra: Iterable[str | None] = ()) -> str:
    """``text`` without the patient's identifiers (ID, name parts, birth date, accession number)."""
    secrets: set[str] = {s for s in extra if s}
    if ds is not None:
        for keyword in ("PatientID", "PatientBirthDate", "AccessionNumber", "OtherPatientIDs"):
            value = ds.get(keyword)
            secrets.update(str(v) for v in (value if isinstance(value, MultiValue) else [value]) if v)
        name = ds.get("PatientName")
        if name:
            secrets.add(str(name))
            secrets.update(part for part in str(name).replace("=", "^").split("^") if len(part) >= 3)
    for secret in sorted(secrets, key=len, reverse=True):
        text = re.sub(re.escape(secret), "***", text, flags=re.IGNORECASE)
    return text


def _esc(value: object) -> str:
    """One value as ER7 text: the delimiters escaped (HL7 v2.5.1 section 2.7), line breaks flattened."""
    text = str(value)
    for char, seq in (("\\", "\\E\\"), ("|", "\\F\\"), ("^", "\\S\\"), ("&", "\\T\\"), ("~", "\\R\\")):
        text = text.replace(char, seq)
    return " ".join(text.splitlines())


def _ts(at: datetime | None) -> str | None:
    """An HL7 DTM with its UTC offset."""
    return at.strftime("%Y%m%d%H%M%S%z") if at is not None else None


def _dicom_dtm(date: object, time_: object = None) -> str | None:
    """DICOM DA (and TM, whole seconds) as an HL7 DTM, or None if the header's values are not dates."""
    d = str(date or "")
    if not re.fullmatch(r"\d{8}", d):
        return None
    t = re.sub(r"\..*", "", str(time_ or ""))
    return d + t if re.fullmatch(r"(\d{2}){0,3}", t) else d


def _cwe(scheme: str, value: str, meaning: str) -> str:
    return f"{_esc(value)}^{_esc(meaning)}^{_esc(scheme)}"


def _patient_identifier(ds: Dataset) -> str:
    """PID-3 (CX): PatientID; IssuerOfPatientID, its universal id and identifier type code if given."""
    cx = [_esc(ds.PatientID), "", "", "", ""]
    namespace = str(ds.get("IssuerOfPatientID") or "")
    universal = universal_type = ""
    qualifiers = ds.get("IssuerOfPatientIDQualifiersSequence")
    if qualifiers:
        q = qualifiers[0]
        universal = str(q.get("UniversalEntityID") or "")
        universal_type = str(q.get("UniversalEntityIDType") or "")
        cx[4] = _esc(q.get("IdentifierTypeCode") or "")
    if namespace or universal:
        cx[3] = "&".join(_esc(v) for v in (namespace, universal, universal_type)).rstrip("&")
    return "^".join(cx).rstrip("^")


def _patient_name(ds: Dataset) -> str:
    """PID-5 (XPN family^given^middle^suffix^prefix) from a DICOM PN (family^given^middle^prefix^suffix)."""
    pn = ds.PatientName
    parts = [pn.family_name, pn.given_name, pn.middle_name, pn.name_suffix, pn.name_prefix]
    return "^".join(_esc(p) for p in parts).rstrip("^") or '""'


def _add_patient(patient_result: Any, ds: Dataset) -> None:
    patient = patient_result.add_group("ORU_R01_PATIENT")
    pid = patient.pid
    pid.pid_1 = "1"
    pid.pid_3 = _patient_identifier(ds)
    pid.pid_5 = _patient_name(ds)
    birth = _dicom_dtm(ds.get("PatientBirthDate"))
    if birth:
        pid.pid_7 = birth
    sex = str(ds.get("PatientSex") or "").upper()
    if sex:
        pid.pid_8 = sex if sex in ("M", "F", "O") else "U"  # table 0001


def _add_finding(order: Any, set_id: int, sub_id: int, f: Finding, result: StudyResult) -> None:
    method = f"{_esc(f.model)}^{_esc(f.model)} {_esc(f.model_version)}^L"
    equipment = f"{_esc(f.model)}-{_esc(f.model_version)}^{SENDING_APPLICATION}"
    done = _ts(result.timestamps.inference_done)
    for offset, (value_type, identifier, value) in enumerate(
        (
            ("CWE", _cwe(f.code.scheme, f.code.value, f.code.meaning), PRESENT if f.positive else ABSENT),
            ("NM", PROBABILITY, f"{f.probability:.4f}"),
        )
    ):
        obx = order.add_group("ORU_R01_OBSERVATION").obx
        obx.obx_1 = str(set_id + offset)
        obx.obx_2 = value_type
        obx.obx_3 = identifier
        obx.obx_4 = str(sub_id)
        obx.obx_5 = value
        if value_type == "NM":
            obx.obx_6 = "1^^UCUM"
            obx.obx_7 = f"<{f.threshold:g}"
        obx.obx_8 = "A" if f.positive else "N"  # table 0078: abnormal / normal
        obx.obx_11 = "P"
        if done:
            obx.obx_14 = done
            obx.obx_19 = done
        obx.obx_17 = method
        obx.obx_18 = equipment


def build_oru(
    result: StudyResult,
    ds: Dataset | None,
    *,
    control: str,
    accession_number: str | None = None,
    now: datetime | None = None,
) -> Message:
    """The ORU^R01 for one result, validated (hl7apy STRICT) before it is returned.

    Parameters
    ----------
    result
        The stored result; every finding becomes a CWE OBX and an NM OBX.
    ds
        A header of the study for PID, OBR-4 and OBR-7; without one (instances removed by retention) the
        optional PATIENT group is left out and the RIS decides.
    control
        MSH-10, see :func:`control_id`.
    accession_number
        ORC-3/OBR-3 filler order number and OBR-18 (IHE Radiology's place for it); the result id when absent.
    now
        MSH-7 and ORC-9; the current UTC time by default.
    """
    now = now or utcnow()
    msg = Message("ORU_R01", version=VERSION, validation_level=VALIDATION_LEVEL.STRICT)
    msh = msg.msh
    msh.msh_3 = SENDING_APPLICATION
    msh.msh_7 = _ts(now)
    msh.msh_9 = "ORU^R01^ORU_R01"
    msh.msh_10 = _esc(control)
    msh.msh_11 = "P"
    msh.msh_18 = "UNICODE UTF-8"

    accession = accession_number or (str(ds.get("AccessionNumber") or "") if ds is not None else "") or None
    priority = PRIORITY_CODES[result.priority]
    tq = f"^^^^^{priority}"  # TQ-6 priority

    patient_result = msg.add_group("ORU_R01_PATIENT_RESULT")
    if ds is not None and str(ds.get("PatientID") or ""):
        _add_patient(patient_result, ds)
    else:
        logger.warning("HL7 %s built without PID: no study header with a patient ID is left", control)

    order = patient_result.add_group("ORU_R01_ORDER_OBSERVATION")
    filler = f"{_esc(accession)}" if accession else f"{_esc(result.result_id)}^{SENDING_APPLICATION}"
    orc = order.orc
    orc.orc_1 = "RE"  # observations to follow (table 0119)
    orc.orc_3 = filler
    orc.orc_5 = "CM"  # the AI's work is complete; the report itself is not (OBR-25 P)
    orc.orc_7 = tq
    orc.orc_9 = _ts(now)

    description = str(ds.get("StudyDescription") or "") if ds is not None else ""
    obr = order.obr
    obr.obr_1 = "1"
    obr.obr_3 = filler
    obr.obr_4 = f"AITRIAGE^{_esc(description or 'AI triage of imaging study')}^L"
    observed = _dicom_dtm(ds.get("StudyDate"), ds.get("StudyTime")) if ds is not None else None
    if observed:
        obr.obr_7 = observed
    if accession:
        obr.obr_18 = _esc(accession)
    obr.obr_20 = _esc(result.result_id)
    stored = _ts(result.timestamps.result_stored)
    if stored:
        obr.obr_22 = stored
    obr.obr_24 = "RAD"  # table 0074
    obr.obr_25 = "P"  # preliminary (table 0123): an AI result awaiting a radiologist
    obr.obr_27 = tq

    nte = order.nte
    nte.nte_1 = "1"
    nte.nte_3 = DISCLAIMER

    tq1 = order.add_group("ORU_R01_TIMING_QTY").tq1
    tq1.tq1_1 = "1"
    tq1.tq1_9 = f"{priority}^{PRIORITY_TEXT[priority]}^HL70485"

    for i, finding in enumerate(result.findings):
        _add_finding(order, 2 * i + 1, i + 1, finding, result)

    msg.validate()
    return msg


def mllp_frame(er7: str) -> bytes:
    """One MLLP block: start byte, the message (UTF-8, MSH-18), end byte and carriage return."""
    return SB + er7.encode("utf-8") + EB + CR


def _unescape(text: str, component: str, escape: str) -> str:
    out = text
    for code, char in (("F", "|"), ("S", component), ("T", "&"), ("R", "~"), ("E", escape)):
        out = out.replace(f"{escape}{code}{escape}", char)
    return out


def parse_ack(ack: str, expected_control: str) -> str:
    """MSA-1 of an ACK that accepts ``expected_control``; else :class:`HL7Error` with MSA-3 (or ERR-8)."""
    segments = [s for s in re.split(r"\r\n?|\n", ack) if s]
    if not segments or not segments[0].startswith("MSH") or len(segments[0]) < 8:
        raise HL7Error("the answer is not an HL7 message")
    field, component, escape = segments[0][3], segments[0][4], segments[0][6]
    by_name: dict[str, list[str]] = {}
    for seg in segments:
        by_name.setdefault(seg[:3], seg.split(field))
    msa = by_name.get("MSA")
    if msa is None:
        raise HL7Error("the ACK has no MSA segment")
    msa += [""] * (4 - len(msa))
    code, acked, text = msa[1].split(component)[0].upper(), msa[2], _unescape(msa[3], component, escape)
    if not text and "ERR" in by_name:
        err = by_name["ERR"] + [""] * 9
        text = _unescape(err[8] or err[3].replace(component, " ").strip(), component, escape)
    if acked != expected_control:
        raise HL7Error(f"the ACK is for control id {acked!r}, not {expected_control!r}")
    if code not in ACCEPTED:
        raise HL7Error(f"{code or 'no MSA-1'}: {text or 'no reason given'}")
    return code


def _read_frame(sock: socket.socket, deadline: float) -> bytes:
    buf = bytearray()
    while (end := buf.find(EB + CR)) < 0:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("timed out")
        sock.settimeout(remaining)
        chunk = sock.recv(65536)
        if not chunk:
            raise HL7Error("the connection was closed without an ACK")
        buf += chunk
        if len(buf) > MAX_ACK_BYTES:
            raise HL7Error("the answer is too long for an ACK")
    start = buf.find(SB)
    if start < 0 or start > end:
        raise HL7Error("the answer is not an MLLP block")
    return bytes(buf[start + 1 : end])


def _address(target: str) -> tuple[str, int]:
    host, _, port = target.rpartition(":")
    if not host or not port.isdigit():
        raise HL7Error(f"HL7 endpoint {target!r} is not host:port")
    return host.strip("[]"), int(port)


def send_hl7(n: NotificationInfo, settings: NotifySettings) -> None:
    """Send the ORU^R01 over MLLP and wait for its ACK; raise so the outbox retries (same control id)."""
    if n.result is None:
        raise HL7Error("the notification has no stored result to send")
    ds = read_header(n.header_path)
    control = control_id(n)
    er7 = build_oru(n.result, ds, control=control, accession_number=n.accession_number).to_er7()
    host, port = _address(n.target)
    started = time.monotonic()
    try:
        with socket.create_connection((host, port), timeout=settings.timeout_seconds) as sock:
            sock.sendall(mllp_frame(er7))
            reply = _read_frame(sock, started + settings.timeout_seconds)
        code = parse_ack(reply.decode("utf-8", errors="replace"), control)
    except HL7Error as exc:
        raise HL7Error(f"{n.target}: {redact(str(exc), ds, [n.accession_number])}") from None
    except TimeoutError as exc:
        raise HL7Error(f"{n.target}: no ACK within {settings.timeout_seconds:g} s") from exc
    except OSError as exc:
        raise HL7Error(f"{n.target}: {type(exc).__name__}: {exc.strerror or exc}") from exc
    logger.info(
        "HL7 ORU^R01 %s acknowledged by %s: %s (%.0f ms)",
        control,
        n.target,
        code,
        (time.monotonic() - started) * 1000,
    )
