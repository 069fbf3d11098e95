"""/docs and /redoc served from this server alone (offline hosts), a bearer scheme when a key is set, CORS."""

from __future__ import annotations

import re
from urllib.parse import urljoin

from fastapi.testclient import TestClient

from service.core.settings import Settings
from service.http.app import create_app
from service.http.middleware import OPEN_PATHS

ORIGIN = "https://app.example.com"


def _client(make_fake_engine, **settings) -> TestClient:
    return TestClient(create_app(Settings(**settings), engine=make_fake_engine()))


def test_docs_pages_load_only_files_this_server_serves_and_no_inline_script(make_fake_engine):
    with _client(make_fake_engine, api_key="k") as client:  # readable without the key
        for page in ("/docs", "/redoc"):
            response = client.get(page)
            assert response.status_code == 200 and response.headers["content-type"].startswith("text/html")
            csp = response.headers["content-security-policy"]
            script_src = re.search(r"script-src ([^;]+)", csp).group(1)
            assert script_src.strip() == "'self'", csp  # no inline or remote script at all
            assert "default-src 'none'" in csp and "frame-ancestors 'none'" in csp
            html = response.text
            assert not re.search(r"<script(?![^>]*\bsrc=)[^>]*>", html), "inline <script> in the page"
            referenced = re.findall(r'(?:src|href)="([^"]+)"', html)
            # Relative to the page (/docs, /redoc), so they also work behind a path prefix.
            assert referenced and all(not ref.startswith("/") and ":" not in ref for ref in referenced)
            for ref in referenced:
                asset = client.get(urljoin(f"http://testserver{page}", ref))
                assert asset.status_code == 200 and len(asset.content) > 100, ref
        assert b"SwaggerUIBundle" in client.get("/docs/assets/swagger-ui-bundle.js").content
        key = {"Authorization": "Bearer k"}  # other paths stay guarded; with the key: only the listed files
        assert client.get("/docs/assets/../../core/settings.py", headers=key).status_code == 404
        assert client.get("/docs/assets/core.py", headers=key).status_code == 404


def test_with_a_key_the_schema_declares_a_bearer_scheme_for_swaggers_authorize_button(make_fake_engine):
    with _client(make_fake_engine, api_key="k") as client:
        schema = client.get("/openapi.json").json()  # open: the Authorize dialog is how the key gets in
        assert schema["components"]["securitySchemes"]["bearerAuth"] == {
            "type": "http",
            "scheme": "bearer",
            "description": schema["components"]["securitySchemes"]["bearerAuth"]["description"],
        }
        assert schema["security"] == [{"bearerAuth": []}]
        assert schema["paths"]["/healthz"]["get"]["security"] == []  # probes need no key
        assert "security" not in schema["paths"]["/v1/classify"]["post"]  # the global requirement applies
        assert client.get("/v1/models").status_code == 401
        assert client.get("/v1/models", headers={"Authorization": "Bearer k"}).status_code == 200
    with _client(make_fake_engine) as client:
        schema = client.get("/openapi.json").json()
        assert "security" not in schema and "securitySchemes" not in schema.get("components", {})


def test_docs_paths_are_open_and_everything_else_stays_guarded():
    assert {"/docs", "/redoc", "/openapi.json", "/docs/assets/swagger-ui-bundle.js"} <= OPEN_PATHS
    assert not any(path.startswith(("/v1/", "/v2/models", "/v2/repository")) for path in OPEN_PATHS)


def test_cors_is_off_by_default_and_on_for_the_configured_origins(make_fake_engine, encode_photo):
    preflight = {
        "Origin": ORIGIN,
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization,content-type",
    }
    with _client(make_fake_engine) as client:
        response = client.get("/healthz", headers={"Origin": ORIGIN})
        assert "access-control-allow-origin" not in response.headers
        assert "access-control-allow-origin" not in client.options("/v1/classify", headers=preflight).headers
    with _client(make_fake_engine, api_key="k", cors_origins=f"{ORIGIN}, https://other.example") as client:
        answer = client.options("/v1/classify", headers=preflight)  # a preflight carries no key: not a 401
        assert answer.status_code == 200 and answer.headers["access-control-allow-origin"] == ORIGIN
        assert "authorization" in answer.headers["access-control-allow-headers"].lower()
        refused = client.options("/v1/classify", headers={**preflight, "Origin": "https://evil.example"})
        assert "access-control-allow-origin" not in refused.headers
        ok = client.post(
            "/v1/classify",
            content=encode_photo("coffee"),
            headers={"Origin": ORIGIN, "Authorization": "Bearer k", "Content-Type": "image/jpeg"},
        )
        assert ok.headers["access-control-allow-origin"] == ORIGIN
        assert "x-request-id" in ok.headers["access-control-expose-headers"].lower()
