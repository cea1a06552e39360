"""Bearer tokens with roles (service.api.auth): every operation in the OpenAPI document is protected,
tokens files, open mode, and the ``hash-token`` command."""

from __future__ import annotations

import io
import logging
from pathlib import Path
from typing import Any

import httpx
import pytest

from service.__main__ import main
from service.api.auth import READER_ACTIONS, Principal, TokenTable, read_tokens_file, token_line
from service.errors import AuthConfigError
from tests.service.conftest import running_app

pytestmark = pytest.mark.anyio

ADMIN = "admin-token-0123456789abcdef"
READER = "reader-token-0123456789abcdef"
WRONG = "not-a-token-0123456789abcdef"
UID = "1.2.826.0.1.3680043.8.498.12345"
CHALLENGE = 'Bearer realm="pacs-triage"'


def _operations(openapi: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(method, concrete path, template) for every operation but the health probes, parameters filled in."""
    found = []
    for template, item in openapi["paths"].items():
        if template.startswith("/healthz/"):
            continue
        for method, op in item.items():
            path = template
            for param in op.get("parameters", []):
                if param["in"] == "path":
                    value = "1" if param["schema"].get("type") == "integer" else UID
                    path = path.replace("{" + param["name"] + "}", value)
            assert "{" not in path, f"unfilled path parameter in {template}"
            found.append((method.upper(), path, template))
    return found


def _bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def _assert_401(r: httpx.Response, what: str, error: str | None) -> None:
    assert r.status_code == 401, f"{what}: {r.status_code} {r.text}"
    assert r.headers["content-type"].startswith("application/problem+json"), what
    assert r.json()["status"] == 401
    expected = CHALLENGE + (f', error="{error}"' if error else "")
    assert r.headers["www-authenticate"] == expected, what


async def test_every_operation_needs_a_token_with_the_right_role(make_settings, caplog) -> None:
    caplog.set_level(logging.DEBUG, logger="service.api.auth")
    settings = make_settings(
        auth={
            "open": False,
            "admin_tokens": [ADMIN],
            "reader_tokens": [READER],
            "failed_auth_burst": 10_000,  # every route twice with a wrong token; the limit has its own tests
        }
    )
    async with running_app(settings) as (app, client):
        operations = _operations(app.openapi())
        methods = {m for m, _, _ in operations}
        # The walk is not vacuous: the resources we know are there, reads and writes alike.
        paths = {p for _, p, _ in operations}
        assert {"/metrics", "/v1/models", "/v1/deliveries", "/v1/studies"} <= paths
        assert {"GET", "POST"} <= methods
        for method, path, template in operations:
            what = f"{method} {path}"
            _assert_401(await client.request(method, path), f"{what} without a token", None)
            _assert_401(
                await client.request(method, path, headers=_bearer(WRONG)),
                f"{what} wrong token",
                "invalid_token",
            )
            assert WRONG not in (await client.request(method, path, headers=_bearer(WRONG))).text
            basic = {"Authorization": "Basic YWRtaW46YWRtaW4="}
            _assert_401(await client.request(method, path, headers=basic), f"{what} Basic", None)
            r = await client.request(method, path, headers=_bearer(READER))
            if method == "GET" or (method, template) in READER_ACTIONS:
                assert r.status_code not in (401, 403), f"{what} reader: {r.status_code} {r.text}"
            else:
                assert r.status_code == 403, f"{what} reader: {r.status_code} {r.text}"
                assert r.headers["content-type"].startswith("application/problem+json")
                assert r.headers["www-authenticate"] == CHALLENGE + ', error="insufficient_scope"'
            r = await client.request(method, path, headers=_bearer(ADMIN))
            assert r.status_code not in (401, 403), f"{what} admin: {r.status_code} {r.text}"
        # Probes and the API description stay open.
        assert (await client.get("/healthz/live")).status_code == 200
        assert (await client.get("/healthz/ready")).status_code == 200
        assert (await client.get("/openapi.json")).status_code == 200
        assert (await client.get("/docs")).status_code == 200
    logged = "\n".join(r.getMessage() for r in caplog.records)
    for token in (ADMIN, READER, WRONG):
        assert token not in logged
    assert "'auth.reader_tokens[0]' has role reader, needs admin" in logged
    assert "by 'auth.admin_tokens[0]' (admin, token)" in logged


def test_openapi_declares_the_bearer_scheme(make_settings) -> None:
    from service.app import create_app

    doc = create_app(make_settings(auth={"open": False})).openapi()
    assert doc["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
    for template, item in doc["paths"].items():
        for op in item.values():
            if template.startswith("/healthz/"):
                assert "security" not in op
            else:
                assert op["security"] == [{"bearer": []}], template
                assert {"401", "403"} <= set(op["responses"]), template


async def test_tokens_file_with_hashed_lines(make_settings, tmp_path: Path) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text(
        "# who may call the API\n"
        "\n"
        f"{token_line('admin', 'ci-bot', ADMIN)}\n"
        f"   {token_line('reader', 'grafana', READER)}   # dashboards\n",
        encoding="utf-8",
    )
    settings = make_settings(auth={"open": False, "tokens_file": tokens})
    async with running_app(settings) as (_app, client):
        assert (await client.get("/v1/models", headers=_bearer(READER))).status_code == 200
        assert (await client.post("/v1/deliveries/1/retry", headers=_bearer(READER))).status_code == 403
        assert (await client.post("/v1/deliveries/1/retry", headers=_bearer(ADMIN))).status_code == 404
        assert (await client.get("/v1/models", headers=_bearer(WRONG))).status_code == 401


@pytest.mark.parametrize(
    ("line", "why"),
    [
        (f"admin ci-bot {ADMIN}", "the third field must be a SHA-256"),  # a plain token pasted by mistake
        ("admin ci-bot", "expected 'role name sha256hex', found 2 field(s)"),
        (f"root ci-bot {'ab' * 32}", "the role must be one of reader, admin"),
        (f"admin ci/bot {'ab' * 32}", "bad name"),
        (f"admin ci-bot {'ab' * 32}", "the name 'ci-bot' is already used on line 1"),
    ],
)
def test_malformed_tokens_file_names_the_line(tmp_path: Path, line: str, why: str) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text(f"admin ci-bot {'cd' * 32}\n# comment\n{line}\n", encoding="utf-8")
    with pytest.raises(AuthConfigError, match="line 3") as info:
        read_tokens_file(tokens)
    message = str(info.value)
    assert why in message
    assert ADMIN not in message and "ab" * 32 not in message


def test_same_token_twice_and_empty_tokens_are_refused(tmp_path: Path) -> None:
    digest = "ef" * 32
    with pytest.raises(AuthConfigError, match="'a' and 'b' are the same token"):
        TokenTable([(Principal("a", "admin"), digest), (Principal("b", "reader"), digest)])
    from service.config import AuthSettings

    with pytest.raises(AuthConfigError, match=r"auth.reader_tokens\[0\] is empty"):
        TokenTable.from_settings(AuthSettings(reader_tokens=[" "]))
    with pytest.raises(AuthConfigError, match="cannot be read"):
        TokenTable.from_settings(AuthSettings(tokens_file=tmp_path / "missing"))


async def test_malformed_tokens_file_stops_the_start(make_settings, tmp_path: Path) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text(f"# header\nreader grafana {READER}\n", encoding="utf-8")
    settings = make_settings(auth={"open": False, "tokens_file": tokens})
    with pytest.raises(AuthConfigError, match="line 2") as info:
        async with running_app(settings):
            pass
    assert READER not in str(info.value)


async def test_open_mode_checks_nothing(make_settings, caplog) -> None:
    caplog.set_level(logging.WARNING, logger="service.api.auth")
    async with running_app(make_settings(auth={"open": True, "admin_tokens": [ADMIN]})) as (_app, client):
        assert (await client.get("/v1/models")).status_code == 200
        assert (await client.get("/v1/models", headers=_bearer(WRONG))).status_code == 200
        assert (await client.post("/v1/deliveries/1/retry")).status_code == 404
    assert any("the HTTP API is OPEN" in r.getMessage() for r in caplog.records)


async def test_no_tokens_configured_refuses_everything(make_settings, caplog) -> None:
    caplog.set_level(logging.WARNING, logger="service.api.auth")
    async with running_app(make_settings(auth={"open": False})) as (_app, client):
        _assert_401(await client.get("/v1/models"), "no token", None)
        _assert_401(await client.get("/v1/models", headers=_bearer(ADMIN)), "any token", "invalid_token")
        assert (await client.get("/healthz/live")).status_code == 200
    assert any("no API tokens are configured" in r.getMessage() for r in caplog.records)


async def test_hash_token_output_authenticates_the_token(
    make_settings, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("sys.stdin", io.StringIO(READER + "\n"))
    assert main(["hash-token", "reader", "grafana"]) == 0
    from_stdin = capsys.readouterr()
    assert READER not in from_stdin.out + from_stdin.err
    assert main(["hash-token", "admin", "ci-bot", "--generate"]) == 0
    generated = capsys.readouterr()
    admin_token = generated.err.rsplit(": ", 1)[1].strip()
    assert len(admin_token) >= 43 and admin_token not in generated.out  # token_urlsafe(32): 43 characters
    tokens = tmp_path / "tokens"
    tokens.write_text(from_stdin.out + generated.out, encoding="utf-8")
    async with running_app(make_settings(auth={"open": False, "tokens_file": tokens})) as (_app, client):
        assert (await client.get("/v1/models", headers=_bearer(READER))).status_code == 200
        assert (await client.post("/v1/deliveries/1/retry", headers=_bearer(READER))).status_code == 403
        assert (await client.post("/v1/deliveries/1/retry", headers=_bearer(admin_token))).status_code == 404


@pytest.mark.parametrize(
    ("stdin", "argv"), [("", ["reader", "x"]), ("a b", ["reader", "x"]), ("t", ["reader", "x/y"])]
)
def test_hash_token_refuses_bad_input(
    stdin: str, argv: list[str], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
    assert main(["hash-token", *argv]) == 1
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.startswith("hash-token: ")
