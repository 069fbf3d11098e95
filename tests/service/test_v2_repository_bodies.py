"""The model-repository routes (POST /v2/repository/...) answer a malformed or hostile JSON body with a
400/413 naming the problem, never a 500: a body nested 100,000 deep used to raise RecursionError."""

from __future__ import annotations

import time

import pytest
from fastapi.testclient import TestClient

from service.core.settings import Settings
from service.http.app import create_app


@pytest.fixture
def client(make_fake_engine, tmp_path):
    settings = Settings(
        model=tmp_path / "unused.onnx",
        preprocess_threads=1,
        warmup_batch_sizes="1",
        model_control="explicit",
    )
    with TestClient(create_app(settings, engine=make_fake_engine(num_classes=10, image_size=32))) as client:
        deadline = time.monotonic() + 10
        while client.get("/readyz").status_code != 200:
            assert time.monotonic() < deadline, "the app never became ready"
            time.sleep(0.01)
        yield client


ROUTES = ["/v2/repository/index", "/v2/repository/models/fake_vit/unload", "/v2/repository/models/fake_vit/load"]
BODIES = [
    (b"[" * 100_000, 413, "JSON arrays"),
    (b"{" * 100_000, 413, "JSON objects"),
    (b"{", 400, "not valid JSON"),
    (b"\xc3\x28{}", 400, "not valid UTF-8"),
    (b"42", 400, "must be a JSON object"),
    (b'["ready"]', 400, "must be a JSON object"),
]


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize(("body", "status", "message"), BODIES, ids=[b[2] + f"-{len(b[0])}" for b in BODIES])
def test_a_bad_body_is_a_4xx_naming_it(client, route, body, status, message):
    response = client.post(route, content=body, headers={"Content-Type": "application/json"})
    assert response.status_code == status, response.text
    assert message in response.json()["error"], response.text
    assert client.post("/v2/repository/index").status_code == 200  # and it keeps serving


def test_a_good_body_still_works(client):
    index = client.post("/v2/repository/index", json={"ready": True})
    assert index.status_code == 200 and [m["name"] for m in index.json()] == ["fake_vit"], index.text
