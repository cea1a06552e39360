"""The heat map over REST (``GET /v1/studies/{uid}/heatmap.png``) and the worklist page's toggle, with tiny
models whose cards name a ``cam`` output (tests/fixtures/tiny_models.py: the map follows brightness)."""

from __future__ import annotations

from io import BytesIO
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pydicom.uid import generate_uid

from service.results.heatmap import decode_heatmap
from service.results.preview import MIN_SIDE
from tests.fixtures.tiny_models import write_tiny_models
from tests.service.conftest import running_app
from tests.service.dicom_factory import chest, multipart_related
from tests.web.test_page import (  # noqa: F401  (fixtures)
    _console_errors,
    _image_loaded,
    _post,
    _rows,
    _screenshot,
    _wait,
    anyio_backend,
    browser,
    live_server,
    make_settings,
)


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("models-cam")
    write_tiny_models(path, cam=True)
    return path


def _colour_fraction(png: bytes) -> float:
    rgb = np.asarray(Image.open(BytesIO(png)).convert("RGB"), dtype=int)
    return float(((rgb.max(axis=2) - rgb.min(axis=2)) > 60).mean())


@pytest.mark.anyio
async def test_heatmap_png_of_a_positive_finding(make_settings) -> None:  # noqa: F811
    async with running_app(make_settings()) as (_, client):
        body, ctype = multipart_related([chest()])  # right half bright: positive, the map peaks there
        r = await client.post(
            "/v1/studies", content=body, headers={"Content-Type": ctype, "Prefer": "wait=20"}
        )
        result = r.json()
        (finding,) = [f for f in result["findings"] if f["model"] == "cxr-pneumothorax"]
        assert finding["positive"] and finding["heatmap"]["output"] == "cam"
        hm = finding["heatmap"]
        grid = decode_heatmap(hm["values"], hm["rows"], hm["columns"])
        assert grid[:, 40:].mean() > grid[:, :24].mean()  # brighter half, hotter map
        nodule = next(f for f in result["findings"] if f["model"] == "cxr-nodule")
        assert nodule["heatmap"] is None  # the detector has boxes, no map

        uid = result["study_uid"]
        r = await client.get(f"/v1/studies/{uid}/heatmap.png")
        assert r.status_code == 200, r.text
        assert r.headers["content-type"] == "image/png" and r.headers["cache-control"] == "no-store"
        image = Image.open(BytesIO(r.content))
        assert image.mode == "RGB" and image.width == MIN_SIDE and image.getpixel((2, 2)) == (0, 0, 0)
        preview = (await client.get(f"/v1/studies/{uid}/preview.png")).content
        assert _colour_fraction(r.content) > _colour_fraction(preview) + 0.05  # the overlay is there


@pytest.mark.anyio
async def test_heatmap_png_problems(make_settings) -> None:  # noqa: F811
    async with running_app(make_settings()) as (app, client):
        r = await client.get(f"/v1/studies/{generate_uid()}/heatmap.png")
        assert r.status_code == 404 and r.headers["content-type"] == "application/problem+json"
        assert (await client.get("/v1/studies/not..a-uid/heatmap.png")).status_code == 422

        # A negative study (dark image): no heat map kept, 404 problem+json saying so; the preview exists.
        body, ctype = multipart_related([chest(pixels=None, value=0.0)])
        r = await client.post(
            "/v1/studies", content=body, headers={"Content-Type": ctype, "Prefer": "wait=20"}
        )
        result = r.json()
        assert not any(f["positive"] for f in result["findings"]) and all(
            f["heatmap"] is None for f in result["findings"]
        )
        r = await client.get(f"/v1/studies/{result['study_uid']}/heatmap.png")
        assert r.status_code == 404 and r.json()["type"].endswith("/preview-not-found")
        assert "no heat map" in r.json()["detail"]
        assert (await client.get(f"/v1/studies/{result['study_uid']}/preview.png")).status_code == 200
        assert "/v1/studies/{study_uid}/heatmap.png" in app.openapi()["paths"]


def _click(driver, element_id: str) -> None:
    element = driver.find_element("id", element_id)
    driver.execute_script("arguments[0].scrollIntoView({block: 'center'});", element)
    element.click()


@pytest.mark.e2e
def test_page_toggles_between_preview_and_heat_map(make_settings, browser, tmp_path: Path) -> None:  # noqa: F811
    from selenium.webdriver.common.by import By

    with live_server(make_settings()) as base:
        positive = _post(base, chest())
        negative = _post(base, chest(pixels=None, value=0.0))
        browser.get(f"{base}/")
        _wait(browser, lambda d: len(_rows(d)) == 2, "two rows on the worklist")
        toggle = browser.find_element(By.ID, "sv-heat-toggle")

        row = next(r for r in _rows(browser) if r.get_attribute("data-uid") == positive["study_uid"])
        row.find_element(By.CSS_SELECTOR, ".open-study").click()
        _wait(browser, _image_loaded, "the preview image loaded")
        _wait(browser, lambda d: toggle.is_displayed(), "the heat-map toggle for a positive finding")
        image = browser.find_element(By.ID, "sv-image")
        preview_src = image.get_attribute("src")
        preview_height = int(image.get_attribute("naturalHeight"))
        _click(browser, "sv-heat")
        _wait(
            browser,
            lambda d: _image_loaded(d) and image.get_attribute("src") != preview_src,
            "the heat map replaced the preview",
        )
        assert "with the AI heat map" in str(image.get_attribute("alt"))
        # The heat map's banner carries the legend (two more lines): the picture is taller than the preview.
        assert int(image.get_attribute("naturalHeight")) > preview_height
        _screenshot(browser, tmp_path, "worklist-heatmap.png")
        heat_src = image.get_attribute("src")
        _click(browser, "sv-heat")
        _wait(browser, lambda d: _image_loaded(d) and image.get_attribute("src") != heat_src, "back to boxes")
        assert "with AI boxes" in str(image.get_attribute("alt"))

        row = next(r for r in _rows(browser) if r.get_attribute("data-uid") == negative["study_uid"])
        row.find_element(By.CSS_SELECTOR, ".open-study").click()
        _wait(browser, _image_loaded, "the negative study's preview")
        _wait(browser, lambda d: not toggle.is_displayed(), "no toggle without a heat map")
        assert _console_errors(browser) == []
