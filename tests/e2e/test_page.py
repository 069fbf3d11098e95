"""GET / and its static files, without a browser: self-contained, locked down, nothing else served.

The browser test (test_page_browser.py) proves the page works; this one proves it cannot reach
anything off the server and that the asset route serves nothing but its own files.
"""

from __future__ import annotations

import re

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from service.http import page
from service.http.errors import install_error_handlers


@pytest.fixture(scope="module")
def client() -> TestClient:
    app = FastAPI()
    install_error_handlers(app)
    app.include_router(page.router)
    return TestClient(app)


def test_index_is_html_with_a_strict_content_security_policy(client):
    response = client.get("/")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    csp = response.headers["content-security-policy"]
    assert "default-src 'none'" in csp and "script-src 'self'" in csp and "connect-src 'self'" in csp
    assert response.headers["x-content-type-options"] == "nosniff"
    html = response.text
    for needed in (
        'id="file-input"',
        'id="drop-zone"',
        'id="canvas"',
        'id="classify-drawing"',
        'id="clear-drawing"',
        'id="api-key"',
        'id="results"',
        'id="timing"',
        'id="model-name"',
    ):
        assert needed in html


@pytest.mark.parametrize(("name", "media_type"), [("app.js", "text/javascript"), ("style.css", "text/css")])
def test_assets_are_served_with_their_types(client, name, media_type):
    response = client.get(f"/static/{name}")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith(media_type)
    assert response.content == (page.STATIC_DIR / name).read_bytes()


def test_every_reference_stays_on_this_server():
    """No CDN, no font service, no absolute URL: the page works offline and behind a path prefix."""
    for path in page.STATIC_DIR.iterdir():
        text = path.read_text()
        assert not re.search(r"(https?:)?//[a-z0-9.-]+\.[a-z]{2,}", text, re.I), f"{path.name} references another host"
        assert not re.search(r"""(src|href)=["']/""", text), f"{path.name} uses a root-absolute URL"
        assert "@import" not in text and "innerHTML" not in text, path.name
    listed = {p.name for p in page.STATIC_DIR.iterdir()}
    pages = {"index.html", "docs.html", "redoc.html"}  # served by their own routes (page.py, docs.py)
    assert listed - pages == set(page._ASSETS), "a new static file must be added to page._ASSETS"


@pytest.mark.parametrize(
    "path",
    [
        "/static/index.html.bak",
        "/static/..%2Fapp.py",
        "/static/%2e%2e/settings.py",
        "/static/../routes/page.py",
        "/static/",
    ],
)
def test_nothing_else_is_served(client, path):
    response = client.get(path)
    assert response.status_code == 404
    assert "page.py" not in response.text and "import" not in response.text
