"""``/docs``: Swagger UI from files shipped in the package, never from a CDN.

FastAPI's default ``/docs`` page loads Swagger UI from jsDelivr and its favicon from fastapi.tiangolo.com;
on an air-gapped hospital network that page stays blank. Here the same page points at the copy of the
``swagger-ui-dist`` npm package in ``service/web/static/swagger-ui/`` (``scripts/vendor-swagger-ui``
refreshes it; ``SHA256SUMS`` there records version and hashes), served by the ``/static`` mount of
:mod:`service.api.web`. The online validator badge (validator.swagger.io) is switched off for the same
reason. ReDoc (``/redoc``) is not offered: it too loads from a CDN. Open like ``/openapi.json``: the page
holds no data, and "Authorize" keeps the token in the browser.
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.openapi.docs import get_swagger_ui_html, get_swagger_ui_oauth2_redirect_html
from fastapi.responses import HTMLResponse

__all__ = ["ASSETS", "docs_router"]

ASSETS = "/static/swagger-ui"
"""Where the vendored Swagger UI files are served (under the app's root path)."""

docs_router = APIRouter(include_in_schema=False)


@docs_router.get("/docs", response_class=HTMLResponse)
async def swagger_ui(request: Request) -> HTMLResponse:
    root = request.scope.get("root_path", "").rstrip("/")
    return get_swagger_ui_html(
        openapi_url=f"{root}{request.app.openapi_url}",
        title=f"{request.app.title} - API",
        oauth2_redirect_url=f"{root}/docs/oauth2-redirect",
        swagger_js_url=f"{root}{ASSETS}/swagger-ui-bundle.js",
        swagger_css_url=f"{root}{ASSETS}/swagger-ui.css",
        swagger_favicon_url=f"{root}{ASSETS}/favicon-32x32.png",
        swagger_ui_parameters={"validatorUrl": None, "persistAuthorization": False},
    )


@docs_router.get("/docs/oauth2-redirect", response_class=HTMLResponse)
async def swagger_ui_redirect() -> HTMLResponse:
    return get_swagger_ui_oauth2_redirect_html()
