"""What the DICOMweb routes share: media types, the dicom+json response, URLs, errors, the query object.

DICOMweb errors are our usual problem+json (RFC 9457), as PS3.18 8.6 leaves the error payload to the
origin server; successful answers are ``application/dicom+json`` (PS3.18 F.2) or ``multipart/related``.
"""

from __future__ import annotations

import json
from typing import Annotated, Any

from fastapi import Path, Request
from fastapi.responses import Response
from pydicom.dataset import Dataset

from service.api.deps import AppState
from service.store.dicomweb_query import DicomwebQuery

__all__ = [
    "DICOM_JSON",
    "JSON_ARRAY",
    "PREFIX",
    "DicomJSONResponse",
    "SeriesUID",
    "SopUID",
    "dicom_json",
    "query_for",
    "study_url",
]

PREFIX = "/dicomweb"
_UID_PATTERN = r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$"

SeriesUID = Annotated[
    str, Path(pattern=_UID_PATTERN, max_length=64, description="Series Instance UID (PS3.5 9.1)")
]
SopUID = Annotated[str, Path(pattern=_UID_PATTERN, max_length=64, description="SOP Instance UID (PS3.5 9.1)")]
DICOM_JSON = "application/dicom+json"
JSON_ARRAY: dict[str, Any] = {"type": "array", "items": {"type": "object"}}
"""OpenAPI schema of QIDO-RS and metadata answers: DICOM JSON Model datasets (PS3.18 F.2)."""


class DicomJSONResponse(Response):
    """A JSON body with the DICOM JSON Model media type (PS3.18 F.2)."""

    media_type = DICOM_JSON

    def render(self, content: Any) -> bytes:
        return json.dumps(content, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def dicom_json(ds: Dataset) -> dict[str, Any]:
    """``ds`` in the DICOM JSON Model (PS3.18 F.2); binary values inline (InlineBinary, base64)."""
    return ds.to_json_dict(bulk_data_threshold=1 << 30)


def study_url(request: Request, study_uid: str, *rest: str) -> str:
    """Absolute Retrieve URL (0008,1190) of a study, series or instance (PS3.18 10.4.1)."""
    base = str(request.base_url).rstrip("/")
    return "/".join([f"{base}{PREFIX}/studies/{study_uid}", *rest])


def query_for(state: AppState) -> DicomwebQuery:
    """The DICOMweb read queries on the app's store (cheap to build: it holds references only)."""
    return DicomwebQuery(state.db.read_engine, state.settings.instances_dir, state.settings.outputs_dir)
