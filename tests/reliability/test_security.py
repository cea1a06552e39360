"""Security checks on a real ``pacs-triage serve`` process: paths, PHI in logs, secrets.

- **Path traversal through UIDs is impossible.** Study, series and SOP Instance UIDs such as ``../../etc``,
  ``1.2/../..``, absolute paths, NUL bytes and backslashes are refused over HTTP (422) and over DICOM
  (0xC000); a multipart part whose Content-Disposition file name climbs out (``../../x.dcm``, an absolute
  path) is stored by its UIDs only. Nothing is written outside the data directory, and every file inside
  it has a UID-only path. API path parameters with traversal strings get a 4xx.
- **No PHI in logs.** A full flow at DEBUG (DICOM from DCMTK, a refused C-STORE, REST single and multipart,
  partial and refused requests, every GET, an acknowledgement, delivery to Orthanc, a webhook, HL7 to a RIS
  and FHIR whose first answers name the patient) with the sentinel patient of tests/service/dicom_factory.py;
  the whole log is scanned for the name (also with spaces for ``^``, and its parts), the patient ID, the
  accession number and the birth date (also as ISO), plain and hex-encoded as a PDU dump would show them.
  ``/v1`` answers carry no patient name, ID or birth date (the accession number is part of the result by
  design), nor does a notification's ``last_error``.
- **Secrets only from the environment.** Tracked files hold no private key, cloud or chat token, or
  secret-looking literal (``git ls-files``; obviously fake test values are allowed by name); every token or
  secret setting is a ``SecretStr``; with API tokens, a tokens file and a webhook secret configured, none
  of them (nor a wrong token presented by a client) appears in the log at DEBUG or in any answer.
- **A webhook URL is a credential too** (Slack, Teams and most chat webhooks carry their key in the path):
  it must not appear in the log, in ``last_error`` or in ``GET /v1/notifications``.
"""

from __future__ import annotations

import base64
import http.client
import json
import re
import secrets
import subprocess
import time
import typing
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydantic import BaseModel, SecretStr
from pydicom.datadict import tag_for_keyword
from pydicom.dataelem import DataElement
from pydicom.uid import generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import ComputedRadiographyImageStorage  # type: ignore[attr-defined]  # made at import

from service.api.auth import token_line
from service.config import Settings
from tests.peers.orthanc import Orthanc
from tests.reliability.test_crash import (
    Service,
    chest_file,
    head_ct_series,
    orthanc_sop_uids,
    report,
    storescu_acked,
    tiny_models,
)
from tests.service.deliver.test_fhir import FHIRServer
from tests.service.deliver.test_hl7 import RIS
from tests.service.deliver.test_webhooks import Receiver
from tests.service.dicom_factory import (
    SENTINEL_ACCESSION,
    SENTINEL_ID,
    SENTINEL_NAME,
    chest,
    make_dataset,
    multipart_related,
    to_bytes,
)

pytestmark = [pytest.mark.slow, pytest.mark.e2e]

ROOT = Path(__file__).resolve().parents[2]
BAD_UIDS = [
    "../../etc",
    "1.2/../..",
    "/etc/passwd",
    "/tmp/pacs-triage-evil",
    "1.2.3\x00/../x",
    "..",
    ".",
    "1.2.3/",
    "C:\\Windows",
    "1.2.3\\..\\..",
    "%2e%2e%2f",
    "1." + "2" * 70,  # too long
]


def _bad_dataset(keyword: str, value: str) -> Any:
    """A chest radiograph whose UID ``keyword`` holds ``value`` as raw bytes, exactly as an attacker sends it.

    pydicom validates UI values when they are set, converted or written, and warns (an error in this suite)
    however its validation mode is set; the raw bytes value is written as it is, so the warnings are
    silenced here, where they are the point.
    """
    raw = value.encode("latin-1")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = make_dataset()
        tag = tag_for_keyword(keyword)
        assert tag is not None, keyword
        ds[tag] = DataElement(tag, "UI", raw)
        if keyword == "SOPInstanceUID":
            ds.file_meta["MediaStorageSOPInstanceUID"] = DataElement(0x00020003, "UI", raw)
    return ds


def _bad_bytes(keyword: str, value: str) -> bytes:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        data = to_bytes(_bad_dataset(keyword, value))
    assert value.encode("latin-1") in data
    return data


def _tree(root: Path, skip: Path) -> set[Path]:
    return {p for p in root.rglob("*") if skip not in p.parents and p != skip}


# ---- path traversal ----------------------------------------------------------------------------------------


def test_traversal_uids_and_file_names_are_refused_and_nothing_escapes(tmp_path: Path) -> None:
    svc = Service(tmp_path / "srv", tiny_models(tmp_path))
    svc.root.mkdir()
    outside_before = _tree(tmp_path, svc.data_dir)
    http_answers: dict[str, int] = {}
    dimse_answers: dict[str, int | str] = {}
    with svc.start():
        for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"):
            for value in BAD_UIDS:
                body = _bad_bytes(keyword, value)
                r = httpx.post(
                    f"{svc.base}/v1/studies", content=body, headers={"Content-Type": "application/dicom"}
                )
                http_answers[f"{keyword}={value!r}"] = r.status_code
        ae = AE(ae_title="INTRUDER")
        ae.add_requested_context(ComputedRadiographyImageStorage)
        for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"):
            for value in BAD_UIDS:
                ds = _bad_dataset(keyword, value)
                assoc = ae.associate("127.0.0.1", svc.dicom_port, ae_title="PACS_TRIAGE")
                assert assoc.is_established
                try:
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")  # pynetdicom and pydicom warn about such UIDs
                        status = assoc.send_c_store(ds)
                    dimse_answers[f"{keyword}={value!r}"] = (
                        int(status.Status) if "Status" in status else "none"
                    )
                except (TypeError, ValueError) as exc:  # pynetdicom cannot even put it in the request
                    dimse_answers[f"{keyword}={value!r}"] = f"not sendable ({type(exc).__name__})"
                finally:
                    assoc.release()
        # File names in multipart parts are labels at most, never paths.
        good = chest()
        evil_names = [
            "../../../../tmp/pacs-triage-evil.dcm",
            "/etc/cron.d/pacs-triage-evil",
            "..\\..\\evil.dcm",
        ]
        boundary = "evil-boundary"
        parts = b"".join(
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{name}"\r\n'
            "Content-Type: application/dicom\r\n\r\n".encode()
            + (good if i == 0 else b"not dicom at all")
            + b"\r\n"
            for i, name in enumerate(evil_names)
        )
        r = httpx.post(
            f"{svc.base}/v1/studies",
            content=parts + f"--{boundary}--\r\n".encode(),
            headers={"Content-Type": f"multipart/form-data; boundary={boundary}"},
        )
        multipart = r.status_code, r.json()
        paths = _path_param_answers(svc)
        rows = svc.query("SELECT path FROM instances")

    outside_after = _tree(tmp_path, svc.data_dir)
    assert set(http_answers.values()) == {422}, http_answers
    refused = {k: v for k, v in dimse_answers.items() if v != 0xC000}
    assert all(isinstance(v, str) for v in refused.values()), refused  # never a success status
    assert multipart[0] == 409, multipart  # the DICOM part stored, the two junk parts refused
    labels = [f["part"] for f in multipart[1]["failed"]]
    assert labels == ["part 2 (pacs-triage-evil)", "part 3 (evil.dcm)"], labels
    assert not (Path("/tmp") / "pacs-triage-evil.dcm").exists()
    assert not (Path("/etc/cron.d") / "pacs-triage-evil").exists()
    assert outside_after - outside_before <= {svc.log_path}, sorted(outside_after - outside_before)
    uid = r"(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*"
    for (path,) in rows:
        assert re.fullmatch(rf"{uid}/{uid}/{uid}\.dcm", path), path
    for p in (svc.data_dir / "instances").rglob("*"):
        rel = p.relative_to(svc.data_dir / "instances").as_posix()
        assert re.fullmatch(rf"{uid}(/{uid}(/{uid}\.dcm)?)?", rel), rel
    bad_paths = {k: v for k, v in paths.items() if not 400 <= v < 500}
    assert not bad_paths, bad_paths
    report(
        "path traversal",
        {
            "uids_refused_http_422": len(http_answers),
            "uids_refused_dimse_0xC000": sum(1 for v in dimse_answers.values() if v == 0xC000),
            "uids_not_even_sendable": sorted(k for k, v in dimse_answers.items() if isinstance(v, str)),
            "path_params_4xx": len(paths),
        },
    )


TRAVERSALS = [
    "..",
    "%2e%2e",
    "..%2F..%2F..%2Fetc%2Fpasswd",
    "%2e%2e%2f%2e%2e%2fetc%2fpasswd",
    "..%5C..%5Cwindows",
    "1.2.3%00",
    "%252e%252e%252f",
    "1.2.3%2F..%2F..",
    "....//....//etc",
    "%c0%ae%c0%ae",
]


def _path_param_answers(svc: Service) -> dict[str, int]:
    """Raw request lines (no client-side normalisation of ``..``) against every path with a parameter."""
    answers: dict[str, int] = {}
    templates = [
        ("GET", "/v1/studies/{}/result"),
        ("GET", "/v1/studies/{}/preview.png"),
        ("GET", "/v1/studies/{}/audit"),
        ("POST", "/v1/studies/{}/acknowledge"),
        ("POST", "/v1/deliveries/{}/retry"),
        ("GET", "/v1/studies/{}/../../../../etc/passwd"),
    ]
    for method, template in templates:
        for value in TRAVERSALS:
            conn = http.client.HTTPConnection("127.0.0.1", svc.http_port, timeout=10)
            try:
                body = json.dumps({"by": "security-test"}) if method == "POST" else None
                headers = {"Content-Type": "application/json"} if body else {}
                conn.request(method, template.format(value), body=body, headers=headers)
                response = conn.getresponse()
                text = response.read()
                assert b"root:" not in text  # /etc/passwd never comes back, whatever the status
                answers[f"{method} {template.format(value)}"] = response.status
            finally:
                conn.close()
    return answers


# ---- PHI in logs -------------------------------------------------------------------------------------------

BIRTH_DATE = "19010101"


def _hex_forms(text: str) -> list[str]:
    raw = text.encode()
    return [raw.hex(), raw.hex().upper(), raw.hex(" "), raw.hex(" ").upper()]


def phi_needles() -> list[str]:
    """What must never be in a log: each sentinel, its parts and encodings as a dump would show them."""
    name_parts = [p for p in SENTINEL_NAME.split("^") if len(p) > 3]  # "Sentinel", "PHI" is too short
    plain = [
        SENTINEL_NAME,
        SENTINEL_NAME.replace("^", " "),
        SENTINEL_NAME.replace("^", ", ", 1),
        "Do^Not^Log",
        "Do Not Log",
        SENTINEL_ID,
        SENTINEL_ACCESSION,
        BIRTH_DATE,
        "1901-01-01",
        *name_parts,
    ]
    encoded = [h for s in ("Sentinel", SENTINEL_ID, BIRTH_DATE) for h in _hex_forms(s)]
    encoded += [base64.b64encode(s.encode()).decode().rstrip("=") for s in (SENTINEL_NAME, SENTINEL_ID)]
    return plain + encoded


def _found(text: str, needles: list[str]) -> list[str]:
    lower = text.lower()
    return [n for n in needles if n.lower() in lower]


@pytest.fixture(scope="module")
def phi_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """One full flow at DEBUG with every peer; yields the log and every answer the API gave."""
    tmp = tmp_path_factory.mktemp("phi")
    pacs = Orthanc.start(tmp / "orthanc")
    hook, ris, fhir = Receiver(fail_first=1), RIS(["AE", "AA"]), FHIRServer(["outcome", "ok"])
    svc = Service(
        tmp,
        tiny_models(tmp),
        PACS_TRIAGE_LOG_LEVEL="DEBUG",
        PACS_TRIAGE_ASSEMBLY__QUIET_SECONDS="0.5",
        PACS_TRIAGE_DELIVERY__DESTINATIONS=json.dumps([pacs.peer_text]),
        PACS_TRIAGE_NOTIFY__WEBHOOKS=json.dumps([hook.url("/hook")]),
        PACS_TRIAGE_NOTIFY__WEBHOOK_SECRET=secrets.token_urlsafe(24),
        PACS_TRIAGE_NOTIFY__HL7_ENDPOINTS=json.dumps([ris.endpoint]),
        PACS_TRIAGE_NOTIFY__FHIR_BASE_URL=fhir.base,
        PACS_TRIAGE_NOTIFY__BACKOFF_SECONDS="0.2",
    )
    answers: list[tuple[str, int, str]] = []
    try:
        with svc.start():
            client = httpx.Client(base_url=svc.base, timeout=30)

            def call(method: str, url: str, **kwargs: Any) -> httpx.Response:
                r = client.request(method, url, **kwargs)
                text = r.text if "json" in r.headers.get("content-type", "") else ""
                answers.append((f"{method} {url}", r.status_code, text))
                return r

            # DICOM from DCMTK: a chest radiograph and a head CT series, complete when full.
            cr = chest_file(tmp / "send" / "cr.dcm")
            ct = head_ct_series(tmp / "send" / "ct", 5, size=64)
            sent = storescu_acked(svc.dicom_port, [cr, *ct])
            assert sent.returncode == 0 and len(sent.acked) == 6, sent.output[-2000:]
            # A refused C-STORE (bad UID) with the sentinel patient in it.
            ae = AE(ae_title="MODALITY")
            ae.add_requested_context(ComputedRadiographyImageStorage)
            assoc = ae.associate("127.0.0.1", svc.dicom_port, ae_title="PACS_TRIAGE")
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                assert assoc.send_c_store(_bad_dataset("StudyInstanceUID", "1.2.03.x")).Status == 0xC000
            assoc.release()
            # REST: one instance, a multipart with a part refused, a body that is not DICOM at all.
            rest_study = generate_uid()
            r = call(
                "POST",
                "/v1/studies",
                content=chest(study_uid=rest_study),
                headers={"Content-Type": "application/dicom", "Prefer": "wait=20"},
            )
            assert r.status_code == 200, r.text
            no_pixels = make_dataset()
            del no_pixels.PixelData
            body, ctype = multipart_related([chest(), to_bytes(no_pixels)])
            assert (
                call("POST", "/v1/studies", content=body, headers={"Content-Type": ctype}).status_code == 409
            )
            junk = f"{SENTINEL_NAME} {SENTINEL_ID} {BIRTH_DATE}".encode() * 10
            r = call("POST", "/v1/studies", content=junk, headers={"Content-Type": "application/dicom"})
            assert r.status_code == 415
            studies = [rest_study, _study(cr), _study(ct[0])]
            for study in studies:
                deadline = time.monotonic() + 60
                while call("GET", f"/v1/studies/{study}/result").status_code != 200:
                    assert time.monotonic() < deadline
                    time.sleep(0.1)
                call("GET", f"/v1/studies/{study}/audit")
                call("GET", f"/v1/studies/{study}/preview.png")
            call("POST", f"/v1/studies/{rest_study}/acknowledge", json={"by": "dr.test", "note": "seen"})

            def settled() -> bool:
                ((n,),) = svc.query(
                    "SELECT (SELECT COUNT(*) FROM deliveries WHERE state != 'done')"
                    " + (SELECT COUNT(*) FROM notifications WHERE state NOT IN ('done', 'dead'))"
                    " + (SELECT COUNT(*) FROM results WHERE rendered_at IS NULL)"
                )
                return n == 0 and len(orthanc_sop_uids(pacs)) > 0

            deadline = time.monotonic() + 90
            while not settled():
                assert time.monotonic() < deadline, svc.log_tail()
                time.sleep(0.2)
            for path in ("/v1/worklist?status=all", "/v1/deliveries", "/v1/notifications", "/v1/models"):
                call("GET", path)
            client.close()
            log = svc.log()
        yield {
            "log": log,
            "answers": answers,
            "webhook_bodies": [b.decode() for _, _, b in hook.requests],
            "hl7_messages": len(ris.received),
            "fhir_bundles": len(fhir.bundles),
            "in_orthanc": sum(orthanc_sop_uids(pacs).values()),
        }
    finally:
        svc.stop()
        pacs.stop(graceful=False)
        hook.close()
        ris.close()
        fhir.close()


def _study(path: Path) -> str:
    from pydicom import dcmread

    return str(dcmread(path, stop_before_pixels=True).StudyInstanceUID)


def test_no_phi_in_the_log_of_a_full_flow_at_debug(phi_run: dict[str, Any]) -> None:
    log = phi_run["log"]
    assert " DEBUG " in log  # the level really was DEBUG
    assert phi_run["in_orthanc"] >= 6 and phi_run["hl7_messages"] >= 2 and phi_run["fhir_bundles"] >= 2
    assert len(phi_run["webhook_bodies"]) >= 2  # one refused with 500, then delivered
    # The sentinels did flow through: the webhook carries the accession number by design.
    assert any(SENTINEL_ACCESSION in _found(body, phi_needles()) for body in phi_run["webhook_bodies"])
    found = _found(log, phi_needles())
    where = {n: log[max(0, log.lower().index(n.lower()) - 300) :][:600] for n in found[:3]}
    assert not found, where
    report(
        "PHI in logs",
        {
            "log_lines": log.count("\n"),
            "needles": len(phi_needles()),
            "found": found,
            "hl7_messages": phi_run["hl7_messages"],
            "fhir_bundles": phi_run["fhir_bundles"],
            "webhooks": len(phi_run["webhook_bodies"]),
            "objects_in_orthanc": phi_run["in_orthanc"],
        },
    )


def test_no_patient_identity_in_api_answers_or_webhooks(phi_run: dict[str, Any]) -> None:
    identity = [SENTINEL_NAME, SENTINEL_NAME.replace("^", " "), SENTINEL_ID, BIRTH_DATE, "1901-01-01"]
    leaks = {what: _found(text, identity) for what, _, text in phi_run["answers"] if _found(text, identity)}
    assert not leaks, leaks
    for body in phi_run["webhook_bodies"]:
        assert not _found(body, identity), body


# ---- secrets -----------------------------------------------------------------------------------------------

_SECRET_PATTERNS = {
    "private key": re.compile(r"-----BEGIN ([A-Z]+ )*PRIVATE KEY-----"),
    "AWS access key": re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b"),
    "GitHub token": re.compile(r"\bgh[pousr]_[A-Za-z0-9]{36,}\b|\bgithub_pat_[A-Za-z0-9_]{40,}\b"),
    "Slack token or webhook": re.compile(r"\bxox[abposr]-[A-Za-z0-9-]{10,}|hooks\.slack\.com/services/T\w+"),
    "OpenAI-style key": re.compile(r"\bsk-[A-Za-z0-9_-]{20,}\b"),
    "JWT": re.compile(r"\beyJ[A-Za-z0-9_-]{10,}\.eyJ[A-Za-z0-9_-]{10,}\.[A-Za-z0-9_-]{10,}"),
    "URL with a password": re.compile(r"[a-z][a-z0-9+.-]*://[^/\s:@'\"]+:([^/\s@'\"$<{]{4,})@"),
    "secret-looking literal": re.compile(
        r"(?i)\b[\w-]*(password|passwd|secret|token|api[_-]?key)[\w-]*\b['\"]?\s*[:=]\s*['\"]([^'\"\s]{8,})['\"]"
    ),
}
_FAKE = re.compile(r"(?i)test|fake|example|dummy|sentinel|placeholder|not-a-|<[^>]*>|\$\{|\$\(")
_KEY_FILES = re.compile(
    r"(?i)\.(pem|key|p12|pfx|jks|keystore|kdbx)$|(^|/)id_(rsa|ed25519|ecdsa)$|(^|/)\.env$"
)


def test_no_secrets_in_tracked_files() -> None:
    files = (
        subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True)
        .stdout.decode()
        .split("\0")
    )
    hits: list[str] = []
    for name in filter(None, files):
        if _KEY_FILES.search(name):
            hits.append(f"{name}: a key or credentials file is tracked")
            continue
        path = ROOT / name
        try:
            data = path.read_bytes()
        except OSError:  # deleted in the working tree but still tracked
            continue
        if b"\0" in data[:8192]:  # binary (ONNX models, PNGs)
            continue
        text = data.decode("utf-8", errors="replace")
        for what, pattern in _SECRET_PATTERNS.items():
            for match in pattern.finditer(text):
                value = match.group(match.lastindex or 0)
                if _FAKE.search(value) or _FAKE.search(match.group(0)):
                    continue
                if match.lastindex and not re.search(r"[0-9]", value):
                    continue  # words ("token_urlsafe", "user:pass@") are placeholders; real ones have digits
                line = text.count("\n", 0, match.start()) + 1
                hits.append(f"{name}:{line}: {what}: {match.group(0)[:60]}")
    assert not hits, "\n".join(hits)


_SECRET_NAME = re.compile(r"token|secret|password|passwd|api_key|credential")


def _secret_fields(model: type[BaseModel], prefix: str = "") -> Iterator[tuple[str, Any]]:
    for name, field in model.model_fields.items():
        annotation = field.annotation
        nested = [a for a in (annotation, *typing.get_args(annotation)) if isinstance(a, type)]
        sub = next((a for a in nested if issubclass(a, BaseModel)), None)
        if sub is not None:
            yield from _secret_fields(sub, f"{prefix}{name}.")
        elif _SECRET_NAME.search(name) and not name.endswith("_file") and annotation not in (int, float):
            # (a number such as auth.min_token_length is about a secret, not one)
            yield f"{prefix}{name}", annotation


def test_token_and_secret_settings_are_secret_str(monkeypatch: pytest.MonkeyPatch) -> None:
    fields = dict(_secret_fields(Settings))
    assert fields, "no secret settings found: the walk is broken"

    def holds_secret(annotation: Any) -> bool:
        args = typing.get_args(annotation)
        return annotation is SecretStr or any(holds_secret(a) for a in args)

    plain = {name: str(a) for name, a in fields.items() if not holds_secret(a) or str in typing.get_args(a)}
    assert not plain, plain
    monkeypatch.setenv("PACS_TRIAGE_NOTIFY__WEBHOOK_SECRET", "s3cr3t-value-xyz")
    monkeypatch.setenv("PACS_TRIAGE_AUTH__ADMIN_TOKENS", '["adm-v4lue"]')
    settings = Settings()
    dumped = repr(settings) + str(settings) + settings.model_dump_json()
    assert "s3cr3t-value-xyz" not in dumped and "adm-v4lue" not in dumped
    report("secret settings", {"SecretStr fields": sorted(fields)})


@pytest.fixture(scope="module")
def secrets_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """A server with tokens (environment and file), a webhook secret and a webhook URL carrying its own key,
    called with each token and with a wrong one, at DEBUG. Yields the values, the log and the answers."""
    tmp = tmp_path_factory.mktemp("secrets")
    values = {
        "admin": "adm-" + secrets.token_urlsafe(24),
        "reader": "rdr-" + secrets.token_urlsafe(24),
        "file_admin": "fil-" + secrets.token_urlsafe(24),
        "webhook_secret": "whs-" + secrets.token_urlsafe(24),
        "wrong": "wrong-" + secrets.token_urlsafe(24),
        "hook_key": "hk" + secrets.token_hex(16),
    }
    tokens_file = tmp / "tokens"
    tokens_file.write_text(token_line("admin", "ci-bot", values["file_admin"]) + "\n")
    hook = Receiver(fail_first=1)
    svc = Service(
        tmp,
        tiny_models(tmp),
        PACS_TRIAGE_AUTH__OPEN="false",
        PACS_TRIAGE_AUTH__ADMIN_TOKENS=json.dumps([values["admin"]]),
        PACS_TRIAGE_AUTH__READER_TOKENS=json.dumps([values["reader"]]),
        PACS_TRIAGE_AUTH__TOKENS_FILE=str(tokens_file),
        PACS_TRIAGE_NOTIFY__WEBHOOK_SECRET=values["webhook_secret"],
        PACS_TRIAGE_NOTIFY__WEBHOOKS=json.dumps([hook.url(f"/services/T01/B02/{values['hook_key']}")]),
        PACS_TRIAGE_NOTIFY__BACKOFF_SECONDS="0.2",
        PACS_TRIAGE_LOG_LEVEL="DEBUG",
        PACS_TRIAGE_AUTH__FAILED_AUTH_BURST="10000",  # every route with a wrong token; limits: test_redteam
    )
    answers: list[tuple[str, int, str, str]] = []
    try:
        with svc.start():

            def call(token: str, method: str, url: str, **kwargs: Any) -> httpx.Response:
                headers = {"Authorization": f"Bearer {token}", **kwargs.pop("headers", {})}
                r = httpx.request(method, f"{svc.base}{url}", headers=headers, timeout=30, **kwargs)
                answers.append((f"{method} {url}", r.status_code, r.text, str(dict(r.headers))))
                return r

            study = generate_uid()
            r = call(
                values["file_admin"],
                "POST",
                "/v1/studies",
                content=chest(study_uid=study),
                headers={"Content-Type": "application/dicom", "Prefer": "wait=20"},
            )
            assert r.status_code == 200, r.text
            deadline = time.monotonic() + 30
            while not any(s == "done" for (s,) in svc.query("SELECT state FROM notifications")):
                assert time.monotonic() < deadline, svc.log_tail()
                time.sleep(0.1)
            gets = [
                "/v1/worklist",
                "/v1/deliveries",
                "/v1/notifications",
                "/v1/models",
                f"/v1/studies/{study}/result",
                f"/v1/studies/{study}/audit",
                "/metrics",
                "/openapi.json",
                "/healthz/ready",
            ]
            for token in (values["admin"], values["reader"], values["wrong"]):
                for path in gets:
                    call(token, "GET", path)
            assert call(values["wrong"], "POST", "/v1/studies", content=b"x").status_code == 401
            assert call(values["reader"], "POST", "/v1/studies", content=b"x").status_code == 403
            log = svc.log()
        yield {"values": values, "log": log, "answers": answers, "hook_requests": len(hook.requests)}
    finally:
        svc.stop()
        hook.close()


def test_tokens_and_webhook_secret_never_in_logs_or_answers(secrets_run: dict[str, Any]) -> None:
    values = secrets_run["values"]
    names = ("admin", "reader", "file_admin", "webhook_secret", "wrong")
    assert " DEBUG " in secrets_run["log"]
    assert {s for _, s, _, _ in secrets_run["answers"] if s >= 400} == {401, 403}
    in_log = [k for k in names if values[k] in secrets_run["log"]]
    assert not in_log, in_log
    leaks = [
        (what, k)
        for what, _, text, headers in secrets_run["answers"]
        for k in names
        if values[k] in text + headers
    ]
    assert not leaks, leaks


def _webhook_key_leaks(run: dict[str, Any], *, audit: bool) -> dict[str, list[str]]:
    key = run["values"]["hook_key"]
    answers = [what for what, _, text, _ in run["answers"] if key in text and ("/audit" in what) == audit]
    return {"answers": answers, "log": [line[:160] for line in run["log"].splitlines() if key in line]}


def test_webhook_url_key_never_in_logs_or_answers(secrets_run: dict[str, Any]) -> None:
    """Slack/Teams-style webhook URLs carry their credential in the path: the URL is a secret too."""
    assert secrets_run["hook_requests"] >= 2  # refused once (HTTP 500), then delivered
    leaks = _webhook_key_leaks(secrets_run, audit=False)
    assert leaks == {"answers": [], "log": []}, leaks


def test_webhook_url_key_not_in_the_audit_trail(secrets_run: dict[str, Any]) -> None:
    leaks = _webhook_key_leaks(secrets_run, audit=True)
    assert not leaks["answers"], leaks
