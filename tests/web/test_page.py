"""The worklist page (service/web, service/api/web.py) in a real headless Chromium, and its PNG preview route.

The browser tests run the app in a real uvicorn on a loopback port (a browser needs an HTTP server) and
drive Debian's ``chromium`` through ``chromedriver`` with selenium. Selenium Manager is never asked for
anything: the driver path is given, so nothing is downloaded. Set ``PACS_TRIAGE_SCREENSHOT_DIR`` to keep
the screenshots (they always go to the test's tmp_path).
"""

from __future__ import annotations

import os
import shutil
import socket
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from io import BytesIO
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from PIL import Image
from pydicom import dcmread
from pydicom.uid import generate_uid

from service.app import create_app
from service.config import Settings
from service.results.preview import MIN_SIDE
from tests.fixtures.tiny_models import write_tiny_models
from tests.service.conftest import running_app, wait_until_ready
from tests.service.dicom_factory import (
    SENTINEL_ID,
    SENTINEL_NAME,
    chest,
    make_dataset,
    multipart_related,
    to_bytes,
)

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
READER, ADMIN = "reader-token-for-the-page-tests", "admin-token-for-the-page-tests"
NOTICE = "Demonstration models — not for clinical use."


# ------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("models")
    write_tiny_models(path)
    return path


@pytest.fixture
def make_settings(tmp_path: Path, models_dir: Path) -> Callable[..., Settings]:
    """As tests/service/conftest.py's: tiny models, a quick worker, open API, no DICOM listener."""

    def build(**overrides: Any) -> Settings:
        base: dict[str, Any] = {
            "models_dir": models_dir,
            "data_dir": tmp_path / "var",
            "inference": {"providers": "cpu", "max_wait_ms": 5.0},
            "assembly": {"quiet_seconds": 0.1},
            "worker": {"poll_seconds": 0.05},
            "store": {"sqlite_synchronous": "NORMAL"},
            "auth": {"open": True},
            "dicom": {"enabled": False},
        }
        base.update(overrides)
        return Settings(**base)

    return build


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@contextmanager
def live_server(settings: Settings) -> Iterator[str]:
    """The app in a real uvicorn on a free loopback port (bound here, so no race for it); yields its URL."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(create_app(settings), log_level="warning", lifespan="on")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="uvicorn", daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until_ready(base, lambda: None if thread.is_alive() else "uvicorn thread ended")
        yield base
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()


def _with_accession(data: bytes, accession: str) -> bytes:
    ds = dcmread(BytesIO(data))
    ds.AccessionNumber = accession
    return to_bytes(ds)


def _post(base: str, data: bytes, token: str | None = None) -> dict[str, Any]:
    body, ctype = multipart_related([data])
    headers = {"Content-Type": ctype, "Prefer": "wait=30"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    r = httpx.post(f"{base}/v1/studies", content=body, headers=headers, timeout=40)
    assert r.status_code == 200, r.text
    return r.json()


def _stat_and_routine(base: str, token: str | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """A routine study first (it waits longest), then a stat one: the stat one must still be on top."""
    routine = _post(base, _with_accession(chest(pixels=None, value=0.0), "ACC-ROUTINE-1"), token)
    stat = _post(base, _with_accession(chest(), "ACC-STAT-1"), token)
    assert routine["priority"] == "routine" and stat["priority"] == "stat"
    return stat, routine


# ------------------------------------------------------------------------------------------- browser


@pytest.fixture
def browser() -> Iterator[Any]:
    if not (CHROMIUM.is_file() and CHROMEDRIVER.is_file()):
        pytest.fail(f"{CHROMIUM} and {CHROMEDRIVER} are needed: run scripts/install-peers")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for arg in (
        "--headless=new",
        "--no-sandbox",  # root in containers; the page is ours and local
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--window-size=1600,1000",
        "--no-first-run",
        "--disable-extensions",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-default-apps",
    ):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(executable_path=str(CHROMEDRIVER)))
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


def _wait(driver: Any, condition: Callable[[Any], Any], what: str, timeout: float = 15) -> Any:
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(
        driver, timeout, poll_frequency=0.05, ignored_exceptions=[StaleElementReferenceException]
    )
    return wait.until(condition, message=what)


def _rows(driver: Any) -> list[Any]:
    from selenium.webdriver.common.by import By

    return driver.find_elements(By.CSS_SELECTOR, "#worklist-body tr[data-uid]")


def _row_uids(driver: Any) -> list[str]:
    """In one script: rows replaced by a poll between two WebDriver calls would be stale."""
    script = "return [...document.querySelectorAll('#worklist-body tr[data-uid]')].map((r) => r.dataset.uid);"
    return list(driver.execute_script(script))


def _image_loaded(driver: Any) -> bool:
    return bool(
        driver.execute_script(
            "const i = document.getElementById('sv-image');"
            "return !i.hidden && i.complete && i.naturalWidth > 0 && i.src.startsWith('blob:');"
        )
    )


def _screenshot(driver: Any, tmp_path: Path, name: str) -> Path:
    path = tmp_path / name
    assert driver.save_screenshot(str(path))
    keep = os.environ.get("PACS_TRIAGE_SCREENSHOT_DIR")
    if keep:
        Path(keep).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, Path(keep) / name)
    return path


def _console_errors(driver: Any) -> list[str]:
    """SEVERE browser console entries (script errors, CSP violations, failed loads), minus expected 401s."""
    return [
        e["message"]
        for e in driver.get_log("browser")
        if e["level"] == "SEVERE"
        and "401 (Unauthorized)" not in e["message"]
        and "403 (Forbidden)" not in e["message"]
    ]


@pytest.mark.e2e
def test_urgent_first_study_view_and_acknowledge(make_settings, browser, tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    with live_server(make_settings()) as base:
        stat, routine = _stat_and_routine(base)
        browser.get(f"{base}/")
        _wait(browser, lambda d: len(_rows(d)) == 2, "two rows on the worklist")
        assert _row_uids(browser) == [stat["study_uid"], routine["study_uid"]]
        first = _rows(browser)[0]
        assert "stat" in str(first.get_attribute("class")).split()
        assert first.find_element(By.CSS_SELECTOR, ".badge").text == "STAT"
        assert "ACC-STAT-1" in first.text and "pneumothorax" in first.text
        assert NOTICE in browser.find_element(By.CSS_SELECTOR, ".notice").text
        assert "Live" in browser.find_element(By.ID, "live").text
        assert browser.find_element(By.ID, "auth").is_displayed() is False

        # Keyboard: arrows move between studies, Enter opens one.
        first.find_element(By.CSS_SELECTOR, ".open-study").send_keys(Keys.ARROW_DOWN)
        focused = browser.switch_to.active_element
        assert focused.text == "ACC-ROUTINE-1"
        focused.send_keys(Keys.ARROW_UP)
        browser.switch_to.active_element.send_keys(Keys.ENTER)

        _wait(browser, _image_loaded, "the preview image loaded")
        view = browser.find_element(By.ID, "study-view")
        assert "ACC-STAT-1" in view.find_element(By.ID, "study-title").text
        alt = str(browser.find_element(By.ID, "sv-image").get_attribute("alt"))
        assert alt.startswith("Key image of accession ACC-STAT-1") and "pneumothorax" in alt
        models = browser.find_element(By.ID, "sv-models").text
        for m in stat["models"]:
            assert m["name"] in models and m["version"] in models
        assert "card v1 · preprocessing v1" in models  # the reproducibility record, from the result
        name_cell = browser.find_element(By.CSS_SELECTOR, "#sv-models td")
        assert "intended use:" in str(name_cell.get_attribute("title"))  # the card, from /v1/models
        agree = browser.find_element(By.CSS_SELECTOR, "#sv-findings button.verdict")
        assert agree.text == "agree"
        agree.click()  # feedback on the first finding: saved, shown pressed, audited (below)
        _wait(browser, lambda d: "saved" in d.find_element(By.ID, "sv-findings").text, "feedback saved")
        assert agree.get_attribute("aria-pressed") == "true"
        findings = browser.find_element(By.ID, "sv-findings").text
        assert "POSITIVE · STAT" in findings
        _wait(browser, lambda d: "Flagged" in d.find_element(By.ID, "sv-audit").text, "the audit trail")
        _screenshot(browser, tmp_path, "worklist-study.png")

        browser.find_element(By.ID, "ack-by").send_keys("dr.test")
        browser.find_element(By.ID, "ack-note").send_keys("seen, called the ward")
        browser.find_element(By.ID, "ack-button").click()
        _wait(
            browser, lambda d: stat["study_uid"] not in _row_uids(d), "the acknowledged row leaves the list"
        )
        assert _row_uids(browser) == [routine["study_uid"]]
        done = browser.find_element(By.ID, "ack-done")
        assert done.is_displayed() and "Acknowledged by dr.test" in done.text
        _wait(browser, lambda d: "seen, called the ward" in d.find_element(By.ID, "sv-audit").text, "audited")
        _screenshot(browser, tmp_path, "worklist-acknowledged.png")

        acked = httpx.get(f"{base}/v1/worklist", params={"status": "acknowledged"}).json()["entries"]
        assert [(e["study_uid"], e["acknowledged_by"]) for e in acked] == [(stat["study_uid"], "dr.test")]

        # The acknowledged filter shows it; nothing the page shows is a patient identifier.
        browser.find_element(By.CSS_SELECTOR, ".filters button[data-status='acknowledged']").click()
        _wait(browser, lambda d: _row_uids(d) == [stat["study_uid"]], "acknowledged filter")
        page = browser.page_source
        assert SENTINEL_NAME not in page and SENTINEL_ID not in page
        assert _console_errors(browser) == []


@pytest.mark.e2e
def test_token_asked_on_401_kept_in_session_storage(make_settings, browser, tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By

    settings = make_settings(auth={"open": False, "reader_tokens": [READER], "admin_tokens": [ADMIN]})
    with live_server(settings) as base:
        stat, _ = _stat_and_routine(base, ADMIN)
        browser.get(f"{base}/")
        form = browser.find_element(By.ID, "auth")
        _wait(browser, lambda d: form.is_displayed(), "the token form after a 401")
        assert not browser.find_element(By.ID, "worklist-table").is_displayed()
        _screenshot(browser, tmp_path, "token.png")

        token_input = browser.find_element(By.ID, "token-input")
        token_input.send_keys("not-a-token")
        token_input.submit()
        error = browser.find_element(By.ID, "auth-error")
        _wait(browser, lambda d: "not accepted" in error.text, "a wrong token is refused")

        token_input.send_keys(READER)
        token_input.submit()
        _wait(browser, lambda d: len(_rows(d)) == 2, "rows with a reader token")
        assert not form.is_displayed()
        assert browser.execute_script("return sessionStorage.getItem('pacs-triage.token')") == READER
        assert READER not in browser.current_url

        _rows(browser)[0].find_element(By.CSS_SELECTOR, ".open-study").click()
        _wait(browser, _image_loaded, "the preview loads with the bearer token")
        # A reader may acknowledge (service.api.auth.READER_ACTIONS): it is what the workstation is for.
        browser.find_element(By.ID, "ack-by").send_keys("dr.reader")
        browser.find_element(By.ID, "ack-button").click()
        _wait(browser, lambda d: stat["study_uid"] not in _row_uids(d), "acknowledged with the reader token")

        browser.find_element(By.ID, "forget-token").click()
        _wait(browser, lambda d: form.is_displayed(), "the token form again")
        assert browser.execute_script("return sessionStorage.getItem('pacs-triage.token')") is None
        assert not browser.find_element(By.ID, "study-view").is_displayed()
        token_input.send_keys(ADMIN)
        token_input.submit()
        _wait(browser, lambda d: len(_rows(d)) == 1, "the one open study with an admin token")
        assert _console_errors(browser) == []


# ------------------------------------------------------------------------------------------- routes


@pytest.mark.anyio
async def test_page_and_static_files_are_open_and_locked_down(make_settings) -> None:
    settings = make_settings(auth={"open": False, "reader_tokens": [READER], "admin_tokens": [ADMIN]})
    async with running_app(settings) as (app, client):
        r = await client.get("/")
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
        assert "script-src 'self'" in r.headers["content-security-policy"]
        assert "frame-ancestors 'none'" in r.headers["content-security-policy"]
        assert NOTICE in r.text
        for name, kind in (("app.js", "javascript"), ("app.css", "text/css")):
            r = await client.get(f"/static/{name}")
            assert r.status_code == 200 and kind in r.headers["content-type"], name
            assert r.headers["cache-control"] == "no-cache"
        r = await client.get("/static/../api/web.py")
        assert r.status_code == 404
        assert (await client.get("/static/nothing.js")).headers["content-type"] == "application/problem+json"
        # Not API: out of the OpenAPI document (and so of tests/service/api/test_auth.py's walk).
        paths = app.openapi()["paths"]
        assert "/" not in paths and not any(p.startswith("/static") for p in paths)
        assert "/v1/studies/{study_uid}/preview.png" in paths
        assert (await client.get(f"/v1/studies/{generate_uid()}/preview.png")).status_code == 401


@pytest.mark.anyio
async def test_preview_png_is_the_key_image_with_banner(make_settings) -> None:
    async with running_app(make_settings()) as (app, client):
        body, ctype = multipart_related([chest()])
        r = await client.post(
            "/v1/studies", content=body, headers={"Content-Type": ctype, "Prefer": "wait=20"}
        )
        result = r.json()
        r = await client.get(f"/v1/studies/{result['study_uid']}/preview.png")
        assert r.status_code == 200, r.text
        assert r.headers["content-type"] == "image/png" and r.headers["cache-control"] == "no-store"
        image = Image.open(BytesIO(r.content))
        assert image.mode == "RGB" and image.width == MIN_SIDE  # a 64-pixel image is enlarged
        assert image.getpixel((2, 2)) == (0, 0, 0)  # the black banner on top
        assert image.height > MIN_SIDE  # the image under the banner


@pytest.mark.anyio
async def test_preview_png_problems(make_settings) -> None:
    async with running_app(make_settings()) as (app, client):
        r = await client.get(f"/v1/studies/{generate_uid()}/preview.png")
        assert r.status_code == 404 and r.json()["type"].endswith("/study-not-found")
        assert r.headers["content-type"] == "application/problem+json"
        assert (await client.get("/v1/studies/not..a-uid/preview.png")).status_code == 422

        # Not analysed (no model for a knee MR): a result, but no key image.
        knee = to_bytes(make_dataset(modality="MR", body_part="KNEE", sop_class="1.2.840.10008.5.1.4.1.1.4"))
        body, ctype = multipart_related([knee])
        r = await client.post(
            "/v1/studies", content=body, headers={"Content-Type": ctype, "Prefer": "wait=20"}
        )
        assert r.json()["status"] == "not_analysed", r.text
        r = await client.get(f"/v1/studies/{r.json()['study_uid']}/preview.png")
        assert r.status_code == 404 and r.json()["type"].endswith("/preview-not-found"), r.text

        # The key image removed from disk (retention): 404, not 500.
        body, ctype = multipart_related([chest()])
        r = await client.post(
            "/v1/studies", content=body, headers={"Content-Type": ctype, "Prefer": "wait=20"}
        )
        result = r.json()
        key = next(f["key_instance_uid"] for f in result["findings"] if f["key_instance_uid"])
        state = app.state.triage
        (await state.outbox.source_paths([key]))[key].unlink()
        r = await client.get(f"/v1/studies/{result['study_uid']}/preview.png")
        assert r.status_code == 404 and "no longer stored" in r.json()["detail"]
