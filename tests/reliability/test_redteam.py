"""Our own red-team suite (issue 15 item 6): what an attacker or a careless client does, against a real
``pacs-triage serve`` process on loopback, bounded in time and size. Each case prints its figures as one
``[reliability] red team: ...`` line (``pytest -s``); docs/reliability.md quotes them.

- **Slowloris**: 40 connections dribbling request-header bytes; every one is closed with 408 once
  ``api.header_timeout_seconds`` has passed, while the API keeps answering.
- **Slow bodies**: ``Content-Length: 500000000`` sent at 2 KiB/s (total deadline), a body that stalls (idle
  deadline): 408 problem, connection closed. **Upload cap**: the third concurrent upload gets 503 +
  Retry-After.
- **Oversized and malformed multipart**: declared and streamed bodies over ``api.max_body_bytes`` (413), a
  wrong boundary, a missing close delimiter, a 300-byte boundary, an empty body (400): all problem+json,
  the server's memory checked after.
- **Wrong tokens**: 200 guesses from one address; after ``auth.failed_auth_burst`` they get 429, the right
  token from that address too, another address is unaffected, the log has one line for the burst, and
  ``pacs_triage_auth_failures_total`` counts them.
- **The impersonated acknowledgement**: a reader token typing ``by: dr.chief.radiologist``: the audit
  actor is the token's name.
- **Truncated files and the SOP Instance UID conflict**, on both doors: 422 / 0xC000 and 409 / 0xA900,
  nothing acknowledged and dropped.
- **Disk over the watermark, then 0 bytes free**: ``/healthz/ready`` 503 with the reason, stores refused
  (507 / 0xA700), then ready again once space is freed, without a restart (a tmpfs: needs root).
"""

from __future__ import annotations

import json
import secrets
import socket
import time
from collections.abc import Iterator
from io import BytesIO
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from pynetdicom import AE

from service.api.auth import token_line
from tests.fixtures.tmpfs import mounted_tmpfs
from tests.pydicom_files import pydicom_testdata
from tests.reliability.test_crash import Service, report, tiny_models
from tests.service.dicom_factory import chest, multipart_related

pytestmark = [pytest.mark.slow, pytest.mark.e2e]

MR_TRUNCATED = pydicom_testdata("MR_truncated.dcm")
CT_SMALL = pydicom_testdata("CT_small.dcm")
SAFETY = 60.0
"""Seconds any one wait may take before the case fails (each limit under test is a fraction of it)."""

LIMITS = {
    "PACS_TRIAGE_API__HEADER_TIMEOUT_SECONDS": "1",
    "PACS_TRIAGE_API__BODY_IDLE_SECONDS": "1",
    "PACS_TRIAGE_API__BODY_TIMEOUT_SECONDS": "3",
    "PACS_TRIAGE_API__MAX_CONCURRENT_UPLOADS": "2",
    "PACS_TRIAGE_API__MAX_BODY_BYTES": str(4 * 1024 * 1024),
}


@pytest.fixture(scope="module")
def tokens() -> dict[str, str]:
    """Made at test time: no token-shaped literal in the repository (the secrets scan)."""
    return {"admin": secrets.token_urlsafe(32), "reader": secrets.token_urlsafe(32)}


@pytest.fixture(scope="module")
def svc(tmp_path_factory: pytest.TempPathFactory, tokens: dict[str, str]) -> Iterator[Service]:
    tmp = tmp_path_factory.mktemp("redteam")
    tokens_file = tmp / "tokens"
    tokens_file.write_text(
        token_line("admin", "pacs-gateway", tokens["admin"])
        + "\n"
        + token_line("reader", "grafana", tokens["reader"])
        + "\n"
    )
    service = Service(
        tmp,
        tiny_models(tmp),
        PACS_TRIAGE_AUTH__OPEN="false",
        PACS_TRIAGE_AUTH__TOKENS_FILE=str(tokens_file),
        data_dir=None,  # the default; named so that **LIMITS cannot be taken for it
        **LIMITS,
    )
    with service.start():
        yield service


def _bearer(token: str, **headers: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}", **headers}


def _connect(port: int) -> socket.socket:
    conn = socket.create_connection(("127.0.0.1", port), timeout=SAFETY)
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return conn


def _status(answer: bytes) -> int:
    return int(answer.split(b" ", 2)[1]) if answer.startswith(b"HTTP/") else 0


def _problem(answer: bytes) -> dict[str, Any]:
    return json.loads(answer.split(b"\r\n\r\n", 1)[1])


# ---- the HTTP door -----------------------------------------------------------------------------------


def test_slowloris_connections_are_closed(svc: Service) -> None:
    conns = [_connect(svc.http_port) for _ in range(40)]
    started = time.monotonic()
    for conn in conns:
        conn.sendall(b"GET /healthz/live HTTP/1.1\r\nHost: x\r\n")
        conn.setblocking(False)
    closed: dict[int, tuple[float, int]] = {}
    answers_meanwhile = 0
    while len(closed) < len(conns) and time.monotonic() - started < SAFETY:
        for i, conn in enumerate(conns):
            if i in closed:
                continue
            try:
                conn.send(b"X")  # one more header byte: never a complete head
                data = conn.recv(4096)
            except BlockingIOError:
                continue
            except OSError:
                data = b""
            closed[i] = (time.monotonic() - started, _status(data))
        if httpx.get(f"{svc.base}/healthz/live", timeout=5).status_code == 200:
            answers_meanwhile += 1
        time.sleep(0.2)
    for conn in conns:
        conn.close()
    assert len(closed) == len(conns), f"{len(conns) - len(closed)} slowloris connections still open"
    held = sorted(t for t, _ in closed.values())
    report(
        "red team: slowloris",
        {
            "connections": len(conns),
            "closed by the server": len(closed),
            "answered 408 before closing": sum(1 for _, s in closed.values() if s == 408),
            "held s (min, max)": [round(held[0], 2), round(held[-1], 2)],
            "header timeout s": float(LIMITS["PACS_TRIAGE_API__HEADER_TIMEOUT_SECONDS"]),
            "API answers during the attack": answers_meanwhile,
        },
    )
    assert answers_meanwhile > 0


def _post_slowly(port: int, token: str, chunk: bytes, every: float, length: int) -> tuple[bytes, float, int]:
    """POST /v1/studies declaring ``length`` bytes, sending ``chunk`` every ``every`` s until the server
    answers and closes; returns (answer, seconds held, bytes sent)."""
    conn = _connect(port)
    conn.sendall(
        b"POST /v1/studies HTTP/1.1\r\nHost: x\r\nContent-Type: application/dicom\r\n"
        + f"Authorization: Bearer {token}\r\nContent-Length: {length}\r\n\r\n".encode()
    )
    started, sent = time.monotonic(), 0
    conn.settimeout(every if every > 0 else SAFETY)
    answer, closed = b"", False
    while not closed and time.monotonic() - started < SAFETY:
        try:
            if chunk:
                conn.sendall(chunk)
                sent += len(chunk)
            data = conn.recv(65536)
        except TimeoutError:
            continue
        except OSError:
            data = b""
        answer += data
        closed = not data
    conn.close()
    assert closed, f"the server held a slow body's connection for {SAFETY:g} s: {answer[:200]!r}"
    return answer, time.monotonic() - started, sent


def test_slow_and_stalled_bodies_get_408(svc: Service, tokens: dict[str, str]) -> None:
    admin = tokens["admin"]
    huge, huge_s, huge_bytes = _post_slowly(svc.http_port, admin, b"\0" * 1024, 0.5, 500_000_000)
    slow, slow_s, slow_bytes = _post_slowly(svc.http_port, admin, b"\0" * 1024, 0.5, 3_000_000)
    stalled, stalled_s, _ = _post_slowly(svc.http_port, admin, b"", 0.0, 3_000_000)
    report(
        "red team: slow bodies",
        {
            "500 MB declared at 2 KiB/s: status, held s, bytes sent": [
                _status(huge),
                round(huge_s, 2),
                huge_bytes,
            ],
            "3 MB declared at 2 KiB/s: status, held s, bytes sent": [
                _status(slow),
                round(slow_s, 2),
                slow_bytes,
            ],
            "stalled body: status, held s": [_status(stalled), round(stalled_s, 2)],
            "deadlines s (total, idle); body limit MiB": [3.0, 1.0, 4],
        },
    )
    assert _status(huge) == 413  # refused at once and the connection closed, not read on and discarded
    assert _status(slow) == 408 and "was not complete within 3 s" in _problem(slow)["detail"]
    assert _status(stalled) == 408 and "no part of the request body arrived" in _problem(stalled)["detail"]


def test_uploads_beyond_the_cap_are_refused(svc: Service, tokens: dict[str, str]) -> None:
    head = (
        b"POST /v1/studies HTTP/1.1\r\nHost: x\r\nContent-Type: application/dicom\r\n"
        + f"Authorization: Bearer {tokens['admin']}\r\nContent-Length: 2000000\r\n\r\n".encode()
    )
    holding = [_connect(svc.http_port) for _ in range(2)]
    for conn in holding:
        conn.sendall(head + b"\0" * 4096)
    assert httpx.get(f"{svc.base}/healthz/live", timeout=5).status_code == 200  # heads handled by now
    extra = _connect(svc.http_port)
    extra.sendall(head)
    answer = b""
    while chunk := extra.recv(65536):
        answer += chunk
    for conn in [*holding, extra]:
        conn.close()
    headers = answer.split(b"\r\n\r\n", 1)[0].lower()
    report(
        "red team: upload cap",
        {"cap": 2, "third upload": _status(answer), "retry-after": b"retry-after: 1" in headers},
    )
    assert _status(answer) == 503 and b"retry-after: 1" in headers


def test_oversized_and_malformed_bodies_are_refused(svc: Service, tokens: dict[str, str]) -> None:
    rss_before = svc.rss_kib()
    admin = tokens["admin"]
    dicom = _bearer(admin, **{"Content-Type": "application/dicom"})

    def streamed(n: int) -> Iterator[bytes]:
        for _ in range(n):
            yield b"\0" * 65536

    good, ctype = multipart_related([chest()])
    boundary = ctype.rsplit("=", 1)[1]
    cases: dict[str, tuple[dict[str, str], Any, int]] = {
        "chunked 400 MiB (limit 4)": (dicom, streamed(6400), 413),
        "wrong boundary": (_bearer(admin, **{"Content-Type": ctype.replace(boundary, "other")}), good, 400),
        "no close delimiter": (
            _bearer(admin, **{"Content-Type": ctype}),
            good[: good.rindex(b"--" + boundary.encode())],
            400,
        ),
        "300-byte boundary": (
            _bearer(admin, **{"Content-Type": ctype.replace(boundary, "b" * 300)}),
            good,
            400,
        ),
        "empty body": (_bearer(admin, **{"Content-Type": ctype}), b"", 400),
        "not DICOM": (dicom, b"GIF89a" + b"\0" * 1000, 415),
    }
    statuses: dict[str, int | str] = {}  # the HTTP status, or "closed"
    for what, (headers, body, expected) in cases.items():
        try:
            r = httpx.post(f"{svc.base}/v1/studies", content=body, headers=headers, timeout=SAFETY)
            statuses[what] = r.status_code
            assert r.headers["content-type"].startswith("application/problem+json"), what
        except httpx.TransportError:  # refused and closed before the whole body was sent
            statuses[what] = "closed"
        assert statuses[what] in (expected, "closed"), f"{what}: {statuses[what]}"
    rss_after = svc.rss_kib()
    report(
        "red team: oversized and malformed bodies",
        {"statuses": statuses, "RSS MiB before, after": [rss_before // 1024, rss_after // 1024]},
    )
    assert rss_after - rss_before < 64 * 1024  # nothing of the 400 MiB stream was kept


def test_an_acknowledgement_is_recorded_under_the_token_not_the_typed_name(
    svc: Service, tokens: dict[str, str]
) -> None:
    study_uid = generate_uid()
    r = httpx.post(
        f"{svc.base}/v1/studies",
        content=chest(study_uid=study_uid),
        headers=_bearer(tokens["admin"], **{"Content-Type": "application/dicom"}),
        timeout=SAFETY,
    )
    assert r.status_code == 202, r.text
    ack = httpx.post(
        f"{svc.base}/v1/studies/{study_uid}/acknowledge",
        json={"by": "dr.chief.radiologist", "note": "seen"},
        headers=_bearer(tokens["reader"]),
        timeout=SAFETY,
    )
    audit = httpx.get(f"{svc.base}/v1/studies/{study_uid}/audit", headers=_bearer(tokens["reader"])).json()
    acked = [e for e in audit["events"] if e["event"] == "acknowledged"]
    report(
        "red team: impersonated acknowledgement",
        {"typed": "dr.chief.radiologist", "acknowledged_by": ack.json()["acknowledged_by"], "audit": acked},
    )
    assert ack.json()["acknowledged_by"] == "grafana"
    assert [e["actor"] for e in acked] == ["grafana"] and acked[0]["detail"][
        "typed_by"
    ] == "dr.chief.radiologist"


# ---- both doors --------------------------------------------------------------------------------------


def _c_store(port: int, items: list[Dataset | Path], monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """C-STORE each item on one association; files go as their bytes are (a modality's truncated file)."""
    monkeypatch.setattr("pynetdicom._config.STORE_SEND_CHUNKED_DATASET", True)
    ae = AE(ae_title="REDTEAM")
    for item in items:
        ds = dcmread(item, stop_before_pixels=True) if isinstance(item, Path) else item
        ae.add_requested_context(ds.SOPClassUID, [ds.file_meta.TransferSyntaxUID])
    assoc = ae.associate("127.0.0.1", port, ae_title="PACS_TRIAGE")
    assert assoc.is_established
    try:
        return [int(assoc.send_c_store(item).Status) for item in items]
    finally:
        assoc.release()


def test_truncated_files_are_refused_on_both_doors(
    svc: Service, tokens: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cut = tmp_path / "ct-cut.dcm"
    cut.write_bytes(CT_SMALL.read_bytes()[:-1000])
    headers = _bearer(tokens["admin"], **{"Content-Type": "application/dicom"})
    http = {}
    for path in (MR_TRUNCATED, cut):
        r = httpx.post(f"{svc.base}/v1/studies", content=path.read_bytes(), headers=headers, timeout=SAFETY)
        http[path.name] = [r.status_code, r.json()["detail"]]
    dimse = _c_store(svc.dicom_port, [MR_TRUNCATED, cut], monkeypatch)
    stored = svc.query(
        "SELECT count(*) FROM instances WHERE sop_instance_uid IN (?, ?)",
        str(dcmread(MR_TRUNCATED).SOPInstanceUID),
        str(dcmread(cut, stop_before_pixels=True).SOPInstanceUID),
    )[0][0]
    report("red team: truncated files", {"HTTP": http, "C-STORE": [hex(s) for s in dimse], "stored": stored})
    assert [s for s, _ in http.values()] == [422, 422]
    assert "PixelData declares" in http["MR_truncated.dcm"][1]
    assert dimse == [0xC000, 0xC000] and stored == 0


def test_a_sop_instance_uid_in_another_study_is_refused_on_both_doors(
    svc: Service, tokens: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    sop, first, second, third = generate_uid(), generate_uid(), generate_uid(), generate_uid()
    headers = _bearer(tokens["admin"], **{"Content-Type": "application/dicom"})
    a = httpx.post(f"{svc.base}/v1/studies", content=chest(study_uid=first, sop_uid=sop), headers=headers)
    b = httpx.post(f"{svc.base}/v1/studies", content=chest(study_uid=second, sop_uid=sop), headers=headers)
    other = dcmread(BytesIO(chest(study_uid=third, sop_uid=sop, pixels=None, value=300.0)))
    dimse = _c_store(svc.dicom_port, [other], monkeypatch)
    lookups = {
        uid: httpx.get(f"{svc.base}/v1/studies/{uid}/result", headers=_bearer(tokens["reader"])).status_code
        for uid in (second, third)
    }
    report(
        "red team: SOP Instance UID conflict",
        {
            "first POST": a.status_code,
            "second study POST": b.status_code,
            "C-STORE": hex(dimse[0]),
            "later GET of the refused studies": lookups,
        },
    )
    assert a.status_code == 202 and b.status_code == 409 and b.json()["conflicting_study"] == first
    assert dimse == [0xA900]
    assert lookups == {second: 404, third: 404}  # refused, never "stored" and then unknown


# ---- wrong tokens ------------------------------------------------------------------------------------


def test_wrong_tokens_are_rate_limited(tmp_path: Path, tokens: dict[str, str]) -> None:
    service = Service(
        tmp_path,
        tiny_models(tmp_path),
        PACS_TRIAGE_AUTH__OPEN="false",
        PACS_TRIAGE_AUTH__ADMIN_TOKENS=json.dumps([tokens["admin"]]),
        PACS_TRIAGE_AUTH__FAILED_AUTH_BURST="5",
        PACS_TRIAGE_AUTH__FAILED_AUTH_PER_MINUTE="0.5",
    )
    with service.start():
        started = time.monotonic()
        with httpx.Client(base_url=service.base, timeout=SAFETY) as client:
            codes = [
                client.get("/v1/models", headers=_bearer("guess-" + secrets.token_hex(12))).status_code
                for _ in range(200)
            ]
            right_token_here = client.get("/v1/models", headers=_bearer(tokens["admin"])).status_code
            retry_after = client.get("/v1/models", headers=_bearer(tokens["admin"])).headers.get(
                "retry-after"
            )
        seconds = time.monotonic() - started
        elsewhere = httpx.Client(
            base_url=service.base, timeout=SAFETY, transport=httpx.HTTPTransport(local_address="127.0.0.2")
        )
        with elsewhere:
            other_address = elsewhere.get("/v1/models", headers=_bearer(tokens["admin"])).status_code
            metrics = elsewhere.get("/metrics", headers=_bearer(tokens["admin"])).text
    log = service.log()
    burst_lines = log.count("wrong-token attempts")
    failures = [line for line in metrics.splitlines() if line.startswith("pacs_triage_auth_failures_total")]
    report(
        "red team: wrong tokens",
        {
            "guesses": len(codes),
            "401": codes.count(401),
            "429": codes.count(429),
            "right token from the limited address": right_token_here,
            "Retry-After s": retry_after,
            "right token from another address": other_address,
            "log lines for the burst": burst_lines,
            "seconds for 200 guesses": round(seconds, 2),
            "metric": failures,
        },
    )
    assert codes[:5] == [401] * 5 and set(codes[5:]) == {429}
    assert right_token_here == 429 and other_address == 200
    assert burst_lines == 1 and "unknown bearer token" not in log
    assert 'pacs_triage_auth_failures_total{reason="invalid_token"} 5.0' in failures


# ---- the disk ----------------------------------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    mnt = tmp_path / "disk"
    with mounted_tmpfs(mnt, "24m", "tests/service/api/test_ready.py covers the logic"):
        yield mnt


def _fill(path: Path, size: int | None) -> None:
    """Write ``size`` bytes (None: until ENOSPC) to ``path``."""
    with path.open("wb") as f:
        written = 0
        try:
            while size is None or written < size:
                f.write(b"\0" * 65536)
                written += 65536
            f.flush()
        except OSError:
            pass


def test_disk_over_the_watermark_then_full_then_recovery(
    tmp_path: Path, small_disk: Path, tokens: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    service = Service(
        tmp_path,
        tiny_models(tmp_path),
        data_dir=small_disk / "var",
        PACS_TRIAGE_AUTH__OPEN="false",
        PACS_TRIAGE_AUTH__ADMIN_TOKENS=json.dumps([tokens["admin"]]),
        PACS_TRIAGE_RETENTION__DISK_HIGH_WATERMARK="0.8",
    )
    headers = _bearer(tokens["admin"], **{"Content-Type": "application/dicom"})
    figures: dict[str, Any] = {}
    with service.start():
        filler = small_disk / "filler"
        _fill(filler, 21 * 1024 * 1024)  # ~88 % of 24 MiB: over the 80 % watermark
        ready = httpx.get(f"{service.base}/healthz/ready")
        post = httpx.post(f"{service.base}/v1/studies", content=chest(), headers=headers)
        store = _c_store(service.dicom_port, [dcmread(CT_SMALL)], monkeypatch)
        figures["over the watermark"] = {
            "ready": [ready.status_code, ready.json()["detail"]],
            "POST": post.status_code,
            "C-STORE": hex(store[0]),
        }
        assert ready.status_code == 503 and "above the high watermark" in ready.json()["detail"]
        assert post.status_code == 507 and store == [0xA700]
        filler.unlink()
        recovered = httpx.get(f"{service.base}/healthz/ready")
        figures["space freed"] = {"ready": recovered.status_code}
        assert recovered.status_code == 200
    service.env["PACS_TRIAGE_RETENTION__DISK_HIGH_WATERMARK"] = "1.0"  # the real ENOSPC, no headroom
    with service.start():
        _fill(filler, None)
        ready = httpx.get(f"{service.base}/healthz/ready")
        post = httpx.post(f"{service.base}/v1/studies", content=chest(), headers=headers)
        figures["0 bytes free"] = {
            "ready": [ready.status_code, ready.json()["detail"]],
            "POST": post.status_code,
        }
        assert ready.status_code == 503 and "refuses writes" in ready.json()["detail"]
        assert post.status_code == 507
        filler.unlink()
        after = httpx.get(f"{service.base}/healthz/ready").status_code
        again = httpx.post(f"{service.base}/v1/studies", content=chest(), headers=headers).status_code
        figures["space freed again"] = {"ready": after, "POST": again}
        assert after == 200 and again == 202
    report("red team: disk", figures)
