"""GET /: the try-the-model page, and the few static files it loads.

The files live in service/http/static/ (shipped as package data). Only the files listed in
``_ASSETS`` are served, so no request path can reach anything else on disk. A strict
Content-Security-Policy keeps the page to its own origin: no CDN, nothing fetched elsewhere,
and user-supplied label text can never run as script.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse

from service.core.errors import NotFound

STATIC_DIR = Path(__file__).resolve().parent / "static"

_ASSETS = {
    "app.js": "text/javascript; charset=utf-8",
    "style.css": "text/css; charset=utf-8",
    # The scripts that start the API docs (service/http/docs.py).
    "docs.js": "text/javascript; charset=utf-8",
    "redoc.js": "text/javascript; charset=utf-8",
}

# img-src blob: for the preview of the chosen/drawn image (an object URL).
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob: data:; "
    "connect-src 'self'; form-action 'none'; base-uri 'none'; frame-ancestors 'none'"
)
_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    # Small files: revalidate every time so a redeploy never serves a stale page/script pair.
    "Cache-Control": "no-cache",
}

router = APIRouter(include_in_schema=False)


@router.get("/")
async def index() -> FileResponse:
    return FileResponse(STATIC_DIR / "index.html", media_type="text/html; charset=utf-8", headers=_HEADERS)


@router.get("/static/{name}")
async def asset(name: str) -> FileResponse:
    media_type = _ASSETS.get(name)
    if media_type is None:
        raise NotFound(f"no static file named {name!r}")
    return FileResponse(STATIC_DIR / name, media_type=media_type, headers=_HEADERS)
