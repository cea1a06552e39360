"""The generated documents in docs/ (service.docs) are what the code says today."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from service.docs import CONFORMANCE_FILE, OPENAPI_FILE, conformance_markdown, openapi_json, write_docs

DOCS = Path(__file__).resolve().parent.parent / "docs"


@pytest.mark.parametrize("name", [OPENAPI_FILE, CONFORMANCE_FILE])
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
    ):
        assert needle in text, needle
