"""GET /v1/models, /healthz/*, /metrics, and the problem+json last resort."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from service.app import create_app
from tests.service.conftest import running_app

pytestmark = pytest.mark.anyio


async def test_models_lists_cards_and_errors(make_settings) -> None:
    settings = make_settings()
    async with running_app(settings) as (_app, client):
        body = (await client.get("/v1/models")).json()
    names = {m["name"]: m for m in body["models"]}
    assert set(names) == {"cxr-pneumothorax", "cxr-nodule", "ct-hemorrhage"}
    pneumo = names["cxr-pneumothorax"]
    assert pneumo["task"] == "classification"
    assert len(pneumo["sha256"]) == 64
    assert pneumo["providers"] == ["CPUExecutionProvider"]
    assert pneumo["labels"][0]["urgency"] == "stat"
    assert body["errors"] == []


async def test_missing_models_dir_is_reported(make_settings, tmp_path) -> None:
    settings = make_settings(models_dir=tmp_path / "nowhere")
    async with running_app(settings) as (_app, client):
        body = (await client.get("/v1/models")).json()
        assert body["models"] == []
        assert body["errors"][0]["name"] == "*"


async def test_ready_is_503_until_warm(make_settings) -> None:
    app = create_app(make_settings())
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        r = await client.get("/healthz/ready")  # lifespan not started: nothing is warm
        assert r.status_code == 503
        assert r.headers["content-type"].startswith("application/problem+json")
        assert (await client.get("/healthz/live")).status_code == 200
    async with running_app(make_settings()) as (_app, client):
        r = await client.get("/healthz/ready")
        assert r.status_code == 200
        assert set(r.json()["models"]) == {"cxr-pneumothorax", "cxr-nodule", "ct-hemorrhage"}


async def test_metrics_exposition(make_settings) -> None:
    async with running_app(make_settings()) as (_app, client):
        await client.get("/v1/models")
        text = (await client.get("/metrics")).text
    assert 'pacs_triage_requests_total{method="GET",route="/v1/models",status="200"}' in text
    assert "# TYPE pacs_triage_inference_batch_size histogram" in text


async def test_unexpected_error_is_problem_500(make_settings) -> None:
    async with running_app(make_settings()) as (app, _client):

        async def explode(*_a, **_k):
            raise RuntimeError("boom")

        app.state.triage.results.status = explode
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            r = await client.get("/v1/studies/1.2.3/result")
        await asyncio.sleep(0)
    assert r.status_code == 500
    assert r.headers["content-type"].startswith("application/problem+json")
    assert r.json()["title"] == "Internal error"
