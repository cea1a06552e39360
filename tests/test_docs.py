"""The generated documents in docs/ (service.docs) are what the code says today."""

from __future__ import annotations

import asyncio
import fnmatch
import hashlib
import json
import re
import tomllib
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from service.dicom.ae import IMPLEMENTATION_CLASS_UID
from service.docs import (
    CARD_SCHEMA_FILE,
    CONFORMANCE_FILE,
    OPENAPI_FILE,
    card_schema_json,
    conformance_markdown,
    openapi_json,
    write_docs,
)

DOCS = Path(__file__).resolve().parent.parent / "docs"


@pytest.mark.parametrize("name", [OPENAPI_FILE, CONFORMANCE_FILE, CARD_SCHEMA_FILE])
def test_committed_docs_are_up_to_date(tmp_path: Path, name: str) -> None:
    write_docs(tmp_path)
    committed = DOCS / name
    assert committed.exists(), f"docs/{name} is missing: run scripts/gen-docs"
    assert (tmp_path / name).read_text(encoding="utf-8") == committed.read_text(encoding="utf-8"), (
        f"docs/{name} is out of date with the code: run scripts/gen-docs and commit the result"
    )


def test_generation_is_deterministic() -> None:
    assert openapi_json() == openapi_json()
    assert conformance_markdown() == conformance_markdown()
    assert card_schema_json() == card_schema_json()


def test_card_schema_validates_the_shipped_cards_and_refuses_a_bad_one() -> None:
    """docs/card.schema.json is usable on its own (an editor, a CI job): it accepts every shipped card
    (version 1, no card_version field) and refuses what the service refuses."""
    import jsonschema

    schema = json.loads((DOCS / CARD_SCHEMA_FILE).read_text(encoding="utf-8"))
    jsonschema.Draft202012Validator.check_schema(schema)
    validator = jsonschema.Draft202012Validator(schema)
    cards = sorted((DOCS.parent / "models").glob("*/card.json"))
    assert cards
    for path in cards:
        card = json.loads(path.read_text(encoding="utf-8"))
        assert not list(validator.iter_errors(card)), path
    card["card_version"] = 2
    card["activation"] = "softmax"
    card["license"] = "Apache-2.0"
    card["preprocessing"]["channels"] = 3
    card["preprocessing"]["channel_mean"] = [0.485, 0.456, 0.406]
    assert not list(validator.iter_errors(card))
    card["activation"] = "tanh"
    card["preprocessing"]["channels"] = 2
    messages = sorted(e.message for e in validator.iter_errors(card))
    assert messages == [
        "'tanh' is not one of ['probabilities', 'sigmoid', 'softmax']",
        "2 is not one of [1, 3]",
    ]


def test_openapi_documents_the_bearer_scheme() -> None:
    doc = json.loads(openapi_json())
    assert doc["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
    assert doc["paths"]["/v1/studies"]["post"]["security"] == [{"bearer": []}]
    assert "security" not in doc["paths"]["/healthz/live"]["get"]


def test_conformance_names_what_we_promise() -> None:
    text = conformance_markdown()
    for needle in (
        "`1.2.840.10008.1.1`",  # Verification
        "| CT Image Storage | `1.2.840.10008.5.1.4.1.1.2` | image |",
        "| Basic Text SR Storage | `1.2.840.10008.5.1.4.1.1.88.11` | stored only |",
        "| Explicit VR Little Endian | `1.2.840.10008.1.2.1` |",
        "`1.2.840.10008.5.1.4.1.1.88.34`",  # Comprehensive 3D SR, sent
        "`1.2.840.10008.5.1.4.1.1.7`",  # Secondary Capture, sent
        "| 0xA700 |",
        "| 0xC000 |",
        "| 0x0110 |",
        "`dicom.allowed_calling_aets`",
        "`dicom.tls_cert_file`",
        f"| Implementation Class UID | `{IMPLEMENTATION_CLASS_UID}`",
        "| Implementation Version Name | `PACSTRIAGE_",
        "### 1.2 Timeouts",
        "### 3.1 Content of the objects we create",
        "## 5. Character sets",
    ):
        assert needle in text, needle


# --- /docs: Swagger UI from the package, no internet -------------------------------------------------------

SWAGGER_DIR = Path(__file__).resolve().parent.parent / "service" / "web" / "static" / "swagger-ui"
URL_ATTRIBUTE = re.compile(r"""(?:src|href)\s*=\s*["']([^"']+)["']|url\s*:\s*["']([^"']+)["']""")


Get = Callable[[str], httpx.Response]


@pytest.fixture(scope="module")
def docs_client() -> Get:
    """GET from the app in-process; ASGITransport runs no lifespan: /docs and /static need no store."""
    from service.app import create_app
    from service.config import Settings

    app = create_app(Settings(auth={"open": False}))

    def get(url: str) -> httpx.Response:
        async def fetch() -> httpx.Response:
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://docs.test") as client:
                return await client.get(url)

        return asyncio.run(fetch())

    return get


def test_docs_page_has_no_external_urls(docs_client: Get) -> None:
    """Every URL the page loads is on this server: an air-gapped network shows the same page."""
    response = docs_client("/docs")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/html")
    html = response.text
    assert not re.search(r"https?://|//[a-z0-9.-]+\.[a-z]{2,}/", html, re.IGNORECASE), html
    urls = [a or b for a, b in URL_ATTRIBUTE.findall(html)]
    assert any(u.endswith("swagger-ui-bundle.js") for u in urls), urls
    assert '"validatorUrl": null' in html  # no badge fetched from validator.swagger.io
    for url in urls:
        assert url.startswith("/"), url
        assert docs_client(url).status_code == 200, url


def test_docs_assets_served_with_their_types(docs_client: Get) -> None:
    for name, mime in (
        ("swagger-ui-bundle.js", "javascript"),
        ("swagger-ui.css", "text/css"),
        ("favicon-32x32.png", "image/png"),
    ):
        response = docs_client(f"/static/swagger-ui/{name}")
        assert response.status_code == 200 and mime in response.headers["content-type"], name
    assert docs_client("/docs/oauth2-redirect").status_code == 200
    assert docs_client("/redoc").status_code == 404  # ReDoc would load from a CDN: not offered


def test_vendored_swagger_ui_matches_its_checksums() -> None:
    """The files are the npm package's, unmodified (scripts/vendor-swagger-ui writes SHA256SUMS)."""
    lines = (SWAGGER_DIR / "SHA256SUMS").read_text(encoding="utf-8").splitlines()
    assert lines[0].startswith("# swagger-ui-dist 5.")
    sums = {name: digest for digest, name in (line.split("  ", 1) for line in lines[1:])}
    assert set(sums) == {p.name for p in SWAGGER_DIR.iterdir()} - {"SHA256SUMS"}
    for name, digest in sums.items():
        assert hashlib.sha256((SWAGGER_DIR / name).read_bytes()).hexdigest() == digest, name


def test_swagger_ui_is_package_data() -> None:
    """A wheel (the Docker images install one) carries the files: setuptools package-data covers them."""
    pyproject = tomllib.loads((DOCS.parent / "pyproject.toml").read_text(encoding="utf-8"))
    patterns = pyproject["tool"]["setuptools"]["package-data"]["service"]
    package = DOCS.parent / "service"
    for path in SWAGGER_DIR.iterdir():
        relative = path.relative_to(package).as_posix()
        assert any(fnmatch.fnmatch(relative, p) and "/" not in relative[len(p) - 1 :] for p in patterns), path
