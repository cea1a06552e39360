"""The worklist page (``GET /``, ``/static``), its PNG preview (``GET /v1/studies/{uid}/preview.png``) and the
heat map (``GET /v1/studies/{uid}/heatmap.png``).

Two routers, because they are guarded differently. ``page_router`` serves the page's HTML, CSS and JS, which
hold no data: it stays open, like ``/docs``, and stays out of the OpenAPI document (it is not API). The
page reads everything else through the API with the bearer token its user typed in, so the data stays
behind :func:`service.api.auth.authorize`. ``router`` holds the PNG route and goes under ``protected``
(reader role, as every GET).

The PNG is the Secondary Capture preview of :mod:`service.results.preview`, the same picture the PACS gets:
the key image windowed to 8 bits, the boxes, the NOT FOR DIAGNOSTIC USE banner. It is rendered on request
from the stored key instance (nothing is cached: a new result, or retention removing the instance, shows at
once) in a worker thread, and sent with ``Cache-Control: no-store``: it is a patient's image. The heat map
PNG is the same picture on the image of the most likely positive finding that has a heat map (a model whose
card names a ``cam_output``), with the map blended over it and its legend in the banner; a result without
one answers 404 problem+json.
"""

from __future__ import annotations

import asyncio
import logging
from io import BytesIO
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import APIRouter
from fastapi.responses import FileResponse, Response
from PIL import Image
from pydicom import dcmread
from pydicom.errors import InvalidDicomError
from pydicom.uid import generate_uid
from starlette.staticfiles import StaticFiles

from service.api.deps import AppState, StateDep, StudyUID
from service.errors import (
    InvalidUIDError,
    PreviewNotFoundError,
    ResultNotReadyError,
    StudyNotFoundError,
)
from service.results.preview import build_preview, heatmap_finding, key_image
from service.results.schema import StudyResult
from service.store.files import is_safe_uid

__all__ = ["STATIC_DIR", "page_router", "render_preview_png", "router"]

logger = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).resolve().parent.parent / "web" / "static"
"""``index.html``, ``app.js``, ``app.css``: plain files, no build step and nothing fetched from a CDN."""

PAGE_HEADERS = {
    # Only our own files; images come from blob: URLs the script makes from authorised fetches.
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob: data:; "
        "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}

PNG_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"content": {"image/png": {}}, "description": "The key image with boxes and the warning banner"},
    202: {"description": "The study is being analysed and has no result yet (Retry-After)"},
    404: {"description": "Unknown study, a result without a key image, or the key image is no longer stored"},
}


class _StaticFiles(StaticFiles):
    """StaticFiles that asks browsers to revalidate (ETag), so an upgraded page is never served stale."""

    def file_response(self, *args: Any, **kwargs: Any) -> Response:
        response = super().file_response(*args, **kwargs)
        response.headers["Cache-Control"] = "no-cache"
        response.headers["X-Content-Type-Options"] = "nosniff"
        return response


page_router = APIRouter(include_in_schema=False)
# check_dir=False: an installation without the page's files still serves the API (the page answers 404).
page_router.mount("/static", _StaticFiles(directory=STATIC_DIR, check_dir=False), name="static")

router = APIRouter(prefix="/v1/studies", tags=["studies"])


@page_router.get("/", response_class=FileResponse)
async def page() -> FileResponse:
    """The worklist page. Open: it holds no data, only the code that asks the API with the user's token."""
    return FileResponse(STATIC_DIR / "index.html", media_type="text/html", headers=PAGE_HEADERS)


HEATMAP_RESPONSES: dict[int | str, dict[str, Any]] = {
    **PNG_RESPONSES,
    200: {"content": {"image/png": {}}, "description": "The key image with the AI heat map and its legend"},
    404: {
        "description": "Unknown study, no positive finding with a heat map, or its image is no longer stored"
    },
}


def render_preview_png(result: StudyResult, path: Path, frame: int, heatmap: bool = False) -> bytes:
    """The preview of ``result`` on ``frame`` of the instance at ``path``, as PNG bytes (blocking).

    Raises
    ------
    PreviewNotFoundError
        The file is gone, is not DICOM, or cannot be rendered (not a grayscale image we can decode).
    """
    try:
        ds = dcmread(path)
        sc = build_preview(
            result,
            ds,
            frame=frame,
            sop_instance_uid=generate_uid(),
            series_instance_uid=generate_uid(),
            heatmap=heatmap,
        )
    except FileNotFoundError:
        raise PreviewNotFoundError(
            "the key image is no longer stored (removed by retention?)", part="study_uid"
        ) from None
    except (InvalidDicomError, ValueError) as exc:
        logger.warning("preview of result %s cannot be rendered: %s", result.result_id, type(exc).__name__)
        raise PreviewNotFoundError("the key image cannot be rendered as a preview", part="study_uid") from exc
    rgb = np.asarray(sc.pixel_array, dtype=np.uint8)
    buf = BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG", compress_level=3)  # (rows, columns, 3) uint8: RGB
    return buf.getvalue()


@router.get(
    "/{study_uid}/preview.png",
    response_class=Response,
    responses=PNG_RESPONSES,
    summary="Preview of the key image (PNG)",
)
async def preview_png(study_uid: StudyUID, state: StateDep) -> Response:
    """The newest result's key image with its boxes and the NOT FOR DIAGNOSTIC USE banner, as PNG.

    The same picture as the Secondary Capture sent to the PACS (:mod:`service.results.preview`).
    """
    result = await _newest_result(study_uid, state)
    key = key_image(result)
    if key is None:
        raise PreviewNotFoundError(
            f"the result has no key image (status {result.status}): nothing to show", part="study_uid"
        )
    return await _png(state, result, *key, heatmap=False)


@router.get(
    "/{study_uid}/heatmap.png",
    response_class=Response,
    responses=HEATMAP_RESPONSES,
    summary="Heat map of the positive finding (PNG)",
)
async def heatmap_png(study_uid: StudyUID, state: StateDep) -> Response:
    """Where the model looked: the preview of the most likely positive finding that has a heat map, with
    the class-activation map (Grad-CAM) blended over the image and a legend, still NOT FOR DIAGNOSTIC USE.

    Only positive findings of models whose card names a ``cam_output`` have one; otherwise 404.
    """
    result = await _newest_result(study_uid, state)
    shown = heatmap_finding(result)
    if shown is None or shown.heatmap is None:
        raise PreviewNotFoundError(
            "the result has no heat map: no positive finding of a model with a class-activation map output",
            part="study_uid",
        )
    return await _png(state, result, shown.heatmap.sop_instance_uid, shown.heatmap.frame, heatmap=True)


async def _newest_result(study_uid: str, state: AppState) -> StudyResult:
    if not is_safe_uid(study_uid):
        raise InvalidUIDError("the study UID in the path is not a valid UID", part="study_uid")
    status = await state.results.status(study_uid)
    if not status.exists:
        raise StudyNotFoundError("no instance of this study has been received", part="study_uid")
    result = status.result
    if result is None:
        raise ResultNotReadyError(
            "the study is being analysed; retry after the indicated delay", part="study_uid"
        )
    return result


async def _png(state: AppState, result: StudyResult, sop_uid: str, frame: int, *, heatmap: bool) -> Response:
    path = (await state.outbox.source_paths([sop_uid])).get(sop_uid)
    if path is None:
        raise PreviewNotFoundError("the key image is no longer stored", part="study_uid")
    png = await asyncio.to_thread(render_preview_png, result, path, frame, heatmap)
    return Response(
        png,
        media_type="image/png",
        headers={"Cache-Control": "no-store", "X-Content-Type-Options": "nosniff"},
    )
