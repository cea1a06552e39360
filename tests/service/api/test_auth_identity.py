"""Identity on every write (issue 15): the actor is the authenticated principal, tokens have a minimum
length, and wrong tokens are rate limited per client address with one log line per burst."""

from __future__ import annotations

import io
import logging
from pathlib import Path

import httpx
import pytest
from pydicom.uid import generate_uid

from service.__main__ import main
from service.api.auth import TokenTable, token_line
from service.api.ratelimit import FailedAuthLimiter
from service.app import create_app
from service.config import AuthSettings
from service.errors import AuthConfigError, TooManyRequestsError
from tests.service.conftest import running_app
from tests.service.dicom_factory import chest

pytestmark = pytest.mark.anyio

ADMIN = "admin-token-0123456789abcdef"
READER = "reader-token-0123456789abcdef"
WRONG = "not-a-token-0123456789abcdef"


def _bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def _tokens_file(tmp_path: Path) -> Path:
    path = tmp_path / "tokens"
    path.write_text(
        token_line("admin", "pacs-gateway", ADMIN) + "\n" + token_line("reader", "grafana", READER) + "\n"
    )
    return path


async def _store_chest(client: httpx.AsyncClient) -> str:
    study_uid = generate_uid()
    body = chest(study_uid=study_uid)
    r = await client.post(
        "/v1/studies", content=body, headers={**_bearer(ADMIN), "Content-Type": "application/dicom"}
    )
    assert r.status_code == 202, r.text
    return study_uid


async def test_a_reader_token_cannot_acknowledge_under_another_name(make_settings, tmp_path: Path) -> None:
    settings = make_settings(auth={"open": False, "tokens_file": _tokens_file(tmp_path)})
    async with running_app(settings) as (_app, client):
        study_uid = await _store_chest(client)
        ack = await client.post(
            f"/v1/studies/{study_uid}/acknowledge",
            json={"by": "dr.chief.radiologist", "note": "seen"},
            headers=_bearer(READER),
        )
        assert ack.status_code == 200, ack.text
        assert ack.json()["acknowledged_by"] == "grafana"
        events = (await client.get(f"/v1/studies/{study_uid}/audit", headers=_bearer(READER))).json()
        acked = [e for e in events["events"] if e["event"] == "acknowledged"]
        assert [e["actor"] for e in acked] == ["grafana"]
        assert acked[0]["detail"] == {"note": "seen", "typed_by": "dr.chief.radiologist"}
        # Without a typed name the token's name is all there is.
        again = await client.post(f"/v1/studies/{study_uid}/acknowledge", json={}, headers=_bearer(ADMIN))
        assert again.status_code == 200 and again.json()["acknowledged_by"] == "pacs-gateway"


def test_short_tokens_are_refused_at_load_naming_the_entry() -> None:
    with pytest.raises(AuthConfigError, match=r"auth.admin_tokens\[1\] has 8 characters") as info:
        TokenTable.from_settings(AuthSettings(admin_tokens=[ADMIN, "short-tk"]))
    assert "short-tk" not in str(info.value)
    with pytest.raises(AuthConfigError, match=r"auth.reader_tokens\[0\] has 29 characters"):
        TokenTable.from_settings(AuthSettings(reader_tokens=[READER], min_token_length=40))
    table = TokenTable.from_settings(AuthSettings(reader_tokens=["four"], min_token_length=4))
    assert table.count("reader") == 1


def test_the_app_does_not_start_with_a_short_token(make_settings) -> None:
    with pytest.raises(AuthConfigError, match=r"auth.admin_tokens\[0\]"):
        create_app(make_settings(auth={"open": False, "admin_tokens": ["admin"]}))


def test_hash_token_refuses_a_short_token(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(ValueError, match="at least 24"):
        token_line("reader", "grafana", "x" * 23)
    monkeypatch.setattr("sys.stdin", io.StringIO("abc123\n"))
    assert main(["hash-token", "reader", "grafana"]) == 1
    captured = capsys.readouterr()
    assert captured.out == "" and "at least 24" in captured.err and "abc123" not in captured.err


async def test_wrong_tokens_are_rate_limited_per_address(make_settings, caplog) -> None:
    caplog.set_level(logging.DEBUG, logger="service.api")
    settings = make_settings(
        auth={
            "open": False,
            "admin_tokens": [ADMIN],
            "failed_auth_burst": 3,
            "failed_auth_per_minute": 0.5,  # one attempt back every 2 minutes: no refill during the test
        }
    )
    async with running_app(settings) as (app, client):
        codes = [(await client.get("/v1/models", headers=_bearer(WRONG))).status_code for _ in range(3)]
        assert codes == [401, 401, 401]
        statuses = []
        for _ in range(20):
            r = await client.get("/v1/models", headers=_bearer(WRONG))
            statuses.append(r.status_code)
        assert set(statuses) == {429}
        assert r.headers["content-type"].startswith("application/problem+json")
        assert r.json()["status"] == 429 and r.json()["part"] == "Authorization"
        assert 1 <= int(r.headers["retry-after"]) <= 120
        # The right token from the limited address waits too: the token is not even looked at.
        assert (await client.get("/v1/models", headers=_bearer(ADMIN))).status_code == 429
        # No credentials cost nothing and are not limited (nothing to guess with).
        assert (await client.get("/v1/models")).status_code == 401
        # Another address is not affected.
        other = httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app, client=("192.0.2.7", 4000)), base_url="http://test"
        )
        async with other:
            assert (await other.get("/v1/models", headers=_bearer(ADMIN))).status_code == 200
        exposition = app.state.metrics.render()[0].decode()
    assert 'pacs_triage_auth_failures_total{reason="invalid_token"} 3.0' in exposition
    assert 'pacs_triage_auth_failures_total{reason="limited"} 21.0' in exposition
    warnings = [
        r for r in caplog.records if r.levelno >= logging.WARNING and r.name.startswith("service.api")
    ]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]  # one line per burst, not per request
    assert "used up its 3 wrong-token attempts" in warnings[0].getMessage()
    assert WRONG not in caplog.text and ADMIN not in caplog.text


def test_the_bucket_refills_and_the_end_of_a_burst_is_one_line(caplog) -> None:
    caplog.set_level(logging.INFO, logger="service.api.ratelimit")
    now = [1000.0]
    limiter = FailedAuthLimiter(2, 6.0, clock=lambda: now[0])  # one attempt back every 10 s
    for _ in range(2):
        limiter.check("198.51.100.1")
        limiter.failed("198.51.100.1", "invalid_token")
    refused = 0
    for _ in range(50):
        with pytest.raises(TooManyRequestsError) as info:
            limiter.check("198.51.100.1")
        refused += 1
    assert info.value.retry_after == 10
    now[0] += 5.0
    with pytest.raises(TooManyRequestsError) as info:
        limiter.check("198.51.100.1")
    assert info.value.retry_after == 5
    now[0] += 5.0
    limiter.check("198.51.100.1")  # one attempt earned back
    assert not limiter.limited("198.51.100.1")
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2, lines
    assert "used up its 2 wrong-token attempts" in lines[0]
    assert f"{refused + 1} request(s) were refused while limited" in lines[1]
