"""GET /docs and /redoc: the API documentation, working on a host with no internet access.

FastAPI's own pages load Swagger UI and ReDoc from a CDN, which an offline host cannot reach (a
blank page). These pages load them from the files the ``fastapi-offline`` wheel ships (nothing
copied into this tree) and start them from our own script files: no inline script, so a strict
Content-Security-Policy keeps the pages to this origin.

The pages, their files and /openapi.json are readable without the API key (they are the same for
every vitserve); calls made from Swagger UI need it: the document declares a bearer scheme when a
key is set, and Swagger's Authorize button sends it (``openapi_with_bearer``).
"""

from __future__ import annotations

from collections.abc import Callable
from importlib.resources import files
from pathlib import Path
from typing import Any

from fastapi import APIRouter, FastAPI
from fastapi.responses import FileResponse

from service.core.errors import NotFound
from service.http.page import STATIC_DIR

# The wheel's own folder of Swagger UI and ReDoc builds.
VENDOR_DIR = Path(str(files("fastapi_offline") / "static"))
ASSETS = {
    "swagger-ui-bundle.js": "text/javascript; charset=utf-8",
    "swagger-ui.css": "text/css; charset=utf-8",
    "redoc.standalone.js": "text/javascript; charset=utf-8",
    "favicon.png": "image/png",
}
ASSET_PATHS = frozenset(f"/docs/assets/{name}" for name in ASSETS)
PAGE_PATHS = frozenset({"/docs", "/redoc", "/openapi.json", "/static/docs.js", "/static/redoc.js"})
BEARER_SCHEME = "bearerAuth"

# Swagger UI draws its icons as data: images and sets styles through the DOM (allowed by style-src
# 'self'); ReDoc adds <style> elements and runs its search in a blob: worker, so its page allows those.
_BASE_CSP = "default-src 'none'; script-src 'self'; img-src 'self' data:; connect-src 'self'; font-src 'self'; "
_CLOSED = "form-action 'none'; base-uri 'none'; frame-ancestors 'none'"
SWAGGER_CSP = _BASE_CSP + "style-src 'self'; " + _CLOSED
REDOC_CSP = _BASE_CSP + "style-src 'self' 'unsafe-inline'; worker-src blob:; " + _CLOSED
_COMMON = {"X-Content-Type-Options": "nosniff", "Cache-Control": "no-cache"}

router = APIRouter(include_in_schema=False)


@router.get("/docs")
async def swagger_ui() -> FileResponse:
    headers = {**_COMMON, "Content-Security-Policy": SWAGGER_CSP}
    return FileResponse(STATIC_DIR / "docs.html", media_type="text/html; charset=utf-8", headers=headers)


@router.get("/redoc")
async def redoc() -> FileResponse:
    headers = {**_COMMON, "Content-Security-Policy": REDOC_CSP}
    return FileResponse(STATIC_DIR / "redoc.html", media_type="text/html; charset=utf-8", headers=headers)


@router.get("/docs/assets/{name}")
async def asset(name: str) -> FileResponse:
    media_type = ASSETS.get(name)
    if media_type is None:
        raise NotFound(f"no documentation file named {name!r}")
    # The wheel's files change only with its version: let browsers keep them for a day.
    headers = {"X-Content-Type-Options": "nosniff", "Cache-Control": "public, max-age=86400"}
    return FileResponse(VENDOR_DIR / name, media_type=media_type, headers=headers)


def openapi_with_bearer(app: FastAPI, api_key_set: bool, open_paths: frozenset[str]) -> Callable[[], dict[str, Any]]:
    """``app.openapi`` that declares a bearer scheme when a key is set: every operation needs it
    but those on ``open_paths`` (probes, /metrics), which say ``security: []``."""
    plain = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = plain()
        if api_key_set:
            components = schema.setdefault("components", {})
            components.setdefault("securitySchemes", {})[BEARER_SCHEME] = {
                "type": "http",
                "scheme": "bearer",
                "description": "the server's API key (VITSERVE_API_KEY); the probes, /metrics and the page need none",
            }
            schema["security"] = [{BEARER_SCHEME: []}]
            for path, operations in schema.get("paths", {}).items():
                if path in open_paths:
                    for operation in operations.values():
                        operation["security"] = []
        app.openapi_schema = schema
        return schema

    return openapi
