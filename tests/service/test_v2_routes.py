"""The /v2 routes in process with a fake engine: readiness, draining, body limits and encodings.

The protocol itself is tested with the official client on a real server in test_v2_server.py;
this file covers the route's own plumbing quickly.
"""

from __future__ import annotations

import gzip
import json
import time
import zlib

import numpy as np
import pytest
from fastapi.testclient import TestClient

from service.core.settings import Settings
from service.http.app import create_app

LIMIT = 512 * 1024  # JSON pixels: ~63 KB per 32x32 image


@pytest.fixture
def client(make_fake_engine, tmp_path):
    engine = make_fake_engine(num_classes=10, image_size=32)
    settings = Settings(
        model=tmp_path / "unused.onnx",
        max_upload_bytes=LIMIT,
        max_batch_images=4,
        preprocess_threads=1,
        warmup_batch_sizes="1",
    )
    with TestClient(create_app(settings, engine=engine)) as client:
        deadline = time.monotonic() + 10
        while client.get("/readyz").status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        yield client


def pixel_request(n: int = 1) -> bytes:
    pixels = np.random.default_rng(0).standard_normal((n, 3, 32, 32)).astype(np.float32)
    return json.dumps(
        {
            "inputs": [
                {
                    "name": "pixel_values",
                    "shape": list(pixels.shape),
                    "datatype": "FP32",
                    "data": pixels.ravel().tolist(),
                }
            ],
            "outputs": [{"name": "logits"}],
        }
    ).encode()


def infer(client, body: bytes, **headers):
    return client.post(
        "/v2/models/fake_vit/infer", content=body, headers={"Content-Type": "application/json", **headers}
    )


def test_pixels_are_run_through_the_batcher(client):
    response = infer(client, pixel_request(3))
    assert response.status_code == 200, response.text
    out = response.json()["outputs"][0]
    assert out["name"] == "logits" and out["shape"] == [3, 10]


def test_not_ready_and_draining(client):
    state = client.app.state.service
    state.ready = False
    response = infer(client, pixel_request())
    assert response.status_code == 503 and int(response.headers["Retry-After"]) >= 1
    assert isinstance(response.json()["error"], str)
    assert client.get("/v2/health/ready").status_code == 400
    assert client.get("/v2/models/fake_vit/ready").status_code == 400
    assert client.get("/v2/health/live").status_code == 200
    state.ready = True
    assert client.get("/v2/health/ready").status_code == 200
    state.draining = True  # a graceful shutdown in progress: out of rotation
    try:
        assert client.get("/v2/health/ready").status_code == 400
        # Model routes are behind the app's draining gate, which answers 503 before the route runs.
        assert client.get("/v2/models/fake_vit/ready").status_code == 503
    finally:
        state.draining = False


@pytest.mark.parametrize(("encoding", "compress"), [("gzip", gzip.compress), ("deflate", zlib.compress)])
def test_compressed_bodies_are_inflated(client, encoding, compress):
    response = infer(client, compress(pixel_request(2)), **{"Content-Encoding": encoding})
    assert response.status_code == 200, response.text
    assert response.json()["outputs"][0]["shape"] == [2, 10]


def test_a_small_compressed_body_cannot_inflate_past_the_limit(client):
    bomb = gzip.compress(b" " * (20 * LIMIT))  # whitespace is valid JSON padding; 20x the limit inflated
    assert len(bomb) < LIMIT
    response = infer(client, bomb, **{"Content-Encoding": "gzip"})
    assert response.status_code == 413
    assert "decompressed request body is over the limit" in response.json()["error"]


@pytest.mark.parametrize(
    ("encoding", "body", "message"),
    [
        ("br", b"{}", "unsupported Content-Encoding 'br'"),
        ("gzip", b"not gzip at all", "is not valid gzip data"),
        ("gzip", gzip.compress(b'{"inputs": []}')[:-12], "truncated gzip data"),
    ],
)
def test_bad_encodings_are_400(client, encoding, body, message):
    response = infer(client, body, **{"Content-Encoding": encoding})
    assert response.status_code == 400
    assert message in response.json()["error"]


def test_too_many_images_and_unknown_version(client):
    response = infer(client, pixel_request(5))
    assert response.status_code == 400 and "at most 4" in response.json()["error"]
    response = client.post("/v2/models/fake_vit/versions/7/infer", content=pixel_request())
    assert response.status_code == 404 and response.json() == {
        "error": "unknown version '7' of model 'fake_vit'; available: ['1']"
    }


def test_wrong_method_and_unknown_path_keep_answering_json(client):
    assert client.get("/v2/models/fake_vit/infer").status_code == 405
    assert client.get("/v2/nothing-here").status_code == 404


def test_early_refusals_use_the_v2_error_shape(make_fake_engine, tmp_path):
    # The middleware refuses before any route runs (key, body size, draining): /v2 clients still get
    # the protocol's {"error": "<message>"}, while /v1 keeps the service-wide shape.
    engine = make_fake_engine(num_classes=10, image_size=32)
    settings = Settings(
        model=tmp_path / "unused.onnx",
        max_upload_bytes=LIMIT,
        preprocess_threads=1,
        warmup_batch_sizes="1",
        api_key="secret",
    )
    with TestClient(create_app(settings, engine=engine)) as client:
        refused = infer(client, pixel_request())
        assert refused.status_code == 401
        assert isinstance(refused.json()["error"], str) and "Bearer" in refused.json()["error"]
        too_big = infer(client, b"x" * (LIMIT + 1), Authorization="Bearer secret")
        assert too_big.status_code == 413 and isinstance(too_big.json()["error"], str)
        v1 = client.post("/v1/classify", content=b"x", headers={"Content-Type": "image/png"})
        assert v1.status_code == 401 and v1.json()["error"]["code"] == "unauthorized"
