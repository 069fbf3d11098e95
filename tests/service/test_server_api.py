"""The /v1 API and every bad input of the issue, against a real `vitserve serve` (uvicorn) process.

One server for the module (start-up is the expensive part); each bad input is followed by the
server still answering, and the module ends with SIGTERM -> exit code 0.
"""

from __future__ import annotations

import base64
import io
import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import numpy as np
import pytest
from live_server import free_port, stop_server, wait_ready
from PIL import Image

MAX_UPLOAD_BYTES = 3 * 1024 * 1024
MAX_IMAGE_PIXELS = 4_000_000
MAX_BATCH_IMAGES = 6

pytestmark = pytest.mark.slow  # a real server process: ~5 s of start-up on 2 cores


@pytest.fixture(scope="module")
def server(tiny_onnx, tmp_path_factory):
    port = free_port()
    log_path = tmp_path_factory.mktemp("server") / "server.log"
    env = dict(
        {k: v for k, v in os.environ.items() if k != "VITSERVE_API_KEY"},  # no auth (an empty key is refused)
        VITSERVE_MAX_UPLOAD_BYTES=str(MAX_UPLOAD_BYTES),
        VITSERVE_MAX_IMAGE_PIXELS=str(MAX_IMAGE_PIXELS),
        VITSERVE_MAX_BATCH_IMAGES=str(MAX_BATCH_IMAGES),
        VITSERVE_JPEG_DRAFT="false",
    )  # exact parity with timm for any JPEG size
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "service.cli",
                "serve",
                "--model",
                str(tiny_onnx),
                "--port",
                str(port),
                "--max-batch-size",
                "4",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
        )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_ready(base, process, log_path)
        yield base, process, log_path
    finally:
        stop_server(process)


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server[0], timeout=30) as c:
        yield c


def _png(image: Image.Image, **kwargs) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "PNG", **kwargs)
    return buf.getvalue()


def _still_serving(client, photos):
    assert client.get("/healthz").status_code == 200
    r = client.post("/v1/classify", content=photos["coffee"], headers={"Content-Type": "image/jpeg"})
    assert r.status_code == 200, r.text


def _assert_error(response, status: int, code: str, *words: str):
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and body["error"]["code"] == code, body
    for word in words:
        assert word.lower() in body["error"]["message"].lower(), body


# -- the happy paths ------------------------------------------------------------------------------
def test_classify_raw_body_matches_pytorch_on_photos(client, photos, tiny_vit):
    import torch
    from timm.data import create_transform, resolve_data_config

    _, model = tiny_vit
    reference = create_transform(
        **resolve_data_config({"input_size": (3, 32, 32), "crop_pct": 32 / 36, "interpolation": "bicubic"})
    )
    for name, data in photos.items():
        r = client.post("/v1/classify?top_k=10", content=data, headers={"Content-Type": "image/jpeg"})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["model"] == "vit_test_patch8_32"
        assert set(body["timing_ms"]) == {"queue", "preprocess", "inference", "total"}
        with torch.no_grad():
            expected = torch.softmax(model(reference(Image.open(io.BytesIO(data)).convert("RGB"))[None]), -1)[0]
        got = np.zeros(10)
        for p in body["predictions"]:
            got[p["index"]] = p["probability"]
            assert p["label"] == ("zero one two three four five six seven eight nine".split())[p["index"]]
        np.testing.assert_allclose(got, expected.numpy(), atol=1e-4, err_msg=name)
        probabilities = [p["probability"] for p in body["predictions"]]
        assert probabilities == sorted(probabilities, reverse=True)


def test_classify_multipart_and_top_k(client, photos):
    r = client.post("/v1/classify", params={"top_k": 3}, files={"file": ("cat.jpg", photos["chelsea"], "image/jpeg")})
    assert r.status_code == 200, r.text
    assert len(r.json()["predictions"]) == 3


def test_batch_multipart_each_image_its_result(client, photos):
    files = [("files", (f"{n}.jpg", d, "image/jpeg")) for n, d in photos.items()]
    files.append(("files", ("junk.jpg", b"not an image", "image/jpeg")))
    r = client.post("/v1/classify/batch", params={"top_k": 2}, files=files)
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert [x["id"] for x in results] == [f"{n}.jpg" for n in photos] + ["junk.jpg"]
    assert all(len(x["predictions"]) == 2 for x in results[:-1])
    assert results[-1]["error"]["code"] == "invalid_image"


def test_batch_json_with_ids_and_one_bad_image(client, photos):
    images = [{"id": f"img-{n}", "data": base64.b64encode(d).decode()} for n, d in photos.items()]
    images.insert(1, {"id": "broken", "data": "%%% not base64 %%%"})
    r = client.post("/v1/classify/batch", json={"images": images, "top_k": 1})
    assert r.status_code == 200, r.text
    results = {x["id"]: x for x in r.json()["results"]}
    assert results["broken"]["error"]["code"] == "bad_request" and "base64" in results["broken"]["error"]["message"]
    single = client.post("/v1/classify?top_k=1", content=photos["rocket"], headers={"Content-Type": "image/jpeg"})
    assert results["img-rocket"]["predictions"][0]["index"] == single.json()["predictions"][0]["index"]
    assert results["img-rocket"]["predictions"][0]["probability"] == pytest.approx(
        single.json()["predictions"][0]["probability"], abs=1e-6
    )


def test_models_health_metrics(client):
    models = client.get("/v1/models").json()
    assert models["architecture"] == "vit_test_patch8_32" and models["num_classes"] == 10
    assert models["labels"][3] == "three" and models["image_size"] == 32 and models["precision"] == "fp32"
    assert models["providers"] == ["CPUExecutionProvider"] and models["batching"]["max_batch_size"] == 4
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").json() == {"status": "ready"}
    metrics = client.get("/metrics")
    assert metrics.headers["content-type"].startswith("text/plain")
    text = metrics.text
    assert 'vitserve_requests_total{method="POST",route="/v1/classify",status="200"}' in text
    for name in (
        "vitserve_request_duration_seconds_bucket",
        "vitserve_queue_depth",
        "vitserve_batch_size_bucket",
        "vitserve_inference_seconds_count",
        "vitserve_preprocess_seconds_count",
        "vitserve_images_total",
        "vitserve_images_per_second",
    ):
        assert name in text, name
    assert client.get("/docs").status_code == 200 and "/v1/classify" in client.get("/openapi.json").text


# -- the issue's bad inputs, each a JSON error naming the problem, server still serving -------------
def test_empty_body(client, photos):
    _assert_error(
        client.post("/v1/classify", content=b"", headers={"Content-Type": "image/png"}), 422, "invalid_image", "empty"
    )
    _still_serving(client, photos)


def test_not_an_image(client, photos):
    _assert_error(
        client.post("/v1/classify", content=b"GIF89a but not really" * 10, headers={"Content-Type": "image/gif"}),
        422,
        "invalid_image",
        "not an image",
    )
    _still_serving(client, photos)


def test_truncated_jpeg(client, photos):
    data = photos["astronaut"]
    _assert_error(
        client.post("/v1/classify", content=data[: len(data) // 3], headers={"Content-Type": "image/jpeg"}),
        422,
        "invalid_image",
        "truncated",
    )
    _still_serving(client, photos)


def test_wrong_content_type(client, photos):
    _assert_error(
        client.post("/v1/classify", content=photos["coffee"], headers={"Content-Type": "text/plain"}),
        415,
        "unsupported_media_type",
        "text/plain",
    )
    _assert_error(
        client.post("/v1/classify/batch", content=b"x", headers={"Content-Type": "image/png"}),
        415,
        "unsupported_media_type",
        "image/png",
    )
    _still_serving(client, photos)


def test_decompression_bomb(client, photos):
    bomb = _png(Image.new("1", (4000, 4000)))  # 16 Mpx in a few kB
    assert len(bomb) < 10_000
    _assert_error(
        client.post("/v1/classify", content=bomb, headers={"Content-Type": "image/png"}),
        422,
        "invalid_image",
        "16000000 pixels",
        str(MAX_IMAGE_PIXELS),
    )
    _still_serving(client, photos)


def _raw_http(port: int, head: bytes, body_chunks, read_timeout_s: float = 10.0) -> bytes:
    """Send a request by hand (to control Content-Length and chunking); stop sending once answered."""
    with socket.create_connection(("127.0.0.1", port), timeout=read_timeout_s) as sock:
        sock.sendall(head)
        sock.setblocking(False)
        response = b""
        for chunk in body_chunks:
            try:
                response += sock.recv(65536)
            except BlockingIOError:
                pass
            if response:
                break
            try:
                sock.sendall(chunk)
            except (BlockingIOError, BrokenPipeError, ConnectionResetError):
                break
        sock.setblocking(True)
        sock.settimeout(read_timeout_s)
        while b"\r\n\r\n" not in response or not response.rstrip().endswith(b"}"):
            try:
                data = sock.recv(65536)
            except (ConnectionResetError, TimeoutError):
                break
            if not data:
                break
            response += data
    return response


def test_body_over_the_byte_limit_declared(server, client, photos):
    port = int(server[0].rsplit(":", 1)[1])
    claimed = 10**9  # a 1 GB upload: answered from the header, the body is never sent
    head = (
        f"POST /v1/classify HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\nContent-Length: {claimed}\r\n\r\n"
    ).encode()
    started = time.monotonic()
    response = _raw_http(port, head, [b"\xff" * 1024])
    assert time.monotonic() - started < 5
    assert response.startswith(b"HTTP/1.1 413"), response[:200]
    assert b'"payload_too_large"' in response and str(claimed).encode() in response
    _still_serving(client, photos)


def test_body_over_the_byte_limit_chunked(server, client, photos):
    port = int(server[0].rsplit(":", 1)[1])
    head = b"POST /v1/classify HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\nTransfer-Encoding: chunked\r\n\r\n"
    chunk = b"\xab" * 65536
    framed = b"%x\r\n" % len(chunk) + chunk + b"\r\n"
    # Up to 4x the limit; the server must answer 413 before reading it all.
    response = _raw_http(port, head, [framed] * (4 * MAX_UPLOAD_BYTES // len(chunk)))
    assert response.startswith(b"HTTP/1.1 413"), response[:200]
    assert b"payload_too_large" in response
    _still_serving(client, photos)


def test_odd_but_valid_images_are_classified(client, photos):
    import skimage.data

    coffee = Image.fromarray(skimage.data.coffee())
    cmyk = io.BytesIO()
    coffee.convert("CMYK").save(cmyk, "JPEG")
    palette = Image.new("P", (40, 40), 0)
    palette.putpalette([0, 0, 0, 200, 30, 30] + [0] * 762)
    palette.paste(1, (0, 0, 20, 40))
    gif = io.BytesIO()
    frames = [Image.new("RGB", (48, 48), c) for c in ((250, 0, 0), (0, 0, 250), (0, 250, 0))]
    frames[0].save(gif, "GIF", save_all=True, append_images=frames[1:], duration=40, loop=0)
    cases = {
        "cmyk jpeg": (cmyk.getvalue(), "image/jpeg"),
        "16-bit png": (_png(Image.fromarray((np.arange(64 * 64).reshape(64, 64) * 16).astype(np.uint16))), "image/png"),
        "palette png with transparency": (_png(palette, transparency=0), "image/png"),
        "animated gif": (gif.getvalue(), "image/gif"),
        "1x1": (_png(Image.new("RGB", (1, 1), (9, 99, 199))), "image/png"),
        "huge aspect ratio": (_png(Image.new("RGB", (20000, 2), (5, 5, 5))), "image/png"),
    }
    for name, (data, content_type) in cases.items():
        r = client.post("/v1/classify", content=data, headers={"Content-Type": content_type})
        assert r.status_code == 200, f"{name}: {r.text}"
        assert len(r.json()["predictions"]) == 5, name
    # The animated GIF is classified as its first (red) frame.
    red = _png(Image.new("RGB", (48, 48), (250, 0, 0)))
    first = client.post(
        "/v1/classify?top_k=10", content=cases["animated gif"][0], headers={"Content-Type": "image/gif"}
    )
    as_red = client.post("/v1/classify?top_k=10", content=red, headers={"Content-Type": "image/png"})
    assert first.json()["predictions"] == as_red.json()["predictions"]
    _still_serving(client, photos)


def test_invalid_base64_alone(client, photos):
    r = client.post("/v1/classify/batch", json={"images": [{"id": "a", "data": "@@@@"}]})
    assert r.status_code == 200 and r.json()["results"][0]["error"]["code"] == "bad_request"
    _still_serving(client, photos)


def test_malformed_json_and_shapes(client, photos):
    _assert_error(
        client.post("/v1/classify/batch", content=b"{not json", headers={"Content-Type": "application/json"}),
        400,
        "bad_request",
        "not valid json",
    )
    _assert_error(client.post("/v1/classify/batch", json={"pictures": []}), 400, "bad_request", "images")
    _assert_error(
        client.post("/v1/classify/batch", json={"images": [{"id": "a", "data": ""}], "top_k": "3"}),
        400,
        "bad_request",
        "top_k",
    )
    _still_serving(client, photos)


def test_malformed_multipart(client, photos):
    body = b'--XYZ\r\nContent-Disposition: form-data; name="file"; filename="a.jpg"\r\n\r\nabc'  # never closed
    r = client.post("/v1/classify", content=body, headers={"Content-Type": "multipart/form-data; boundary=XYZ"})
    assert 400 <= r.status_code < 500 and "error" in r.json(), r.text
    _assert_error(
        client.post("/v1/classify", files={"image": ("a.jpg", photos["coffee"], "image/jpeg")}),
        400,
        "bad_request",
        "'file'",
    )
    _assert_error(
        client.post("/v1/classify", content=b"--x\r\n", headers={"Content-Type": "multipart/form-data"}),
        400,
        "bad_request",
        "multipart",
    )
    _still_serving(client, photos)


def test_too_many_images_in_a_batch(client, photos):
    for count in (MAX_BATCH_IMAGES + 1, MAX_BATCH_IMAGES + 5):
        files = [("files", (f"{i}.jpg", photos["coffee"], "image/jpeg")) for i in range(count)]
        _assert_error(
            client.post("/v1/classify/batch", files=files),
            413,
            "payload_too_large",
            "too many images",
            str(MAX_BATCH_IMAGES),
        )
    images = [{"id": str(i), "data": base64.b64encode(photos["coffee"]).decode()} for i in range(MAX_BATCH_IMAGES + 1)]
    _assert_error(
        client.post("/v1/classify/batch", json={"images": images}), 413, "payload_too_large", "too many images"
    )
    _still_serving(client, photos)


@pytest.mark.parametrize("top_k", ["0", "-1", "101", "abc"])
def test_top_k_out_of_range(client, photos, top_k):
    r = client.post(f"/v1/classify?top_k={top_k}", content=photos["coffee"], headers={"Content-Type": "image/jpeg"})
    assert r.status_code in (400, 422) and "top_k" in r.json()["error"]["message"], r.text


def test_unknown_model_on_v2(client, photos):
    r = client.post("/v2/models/no_such_model/infer", json={"inputs": []})
    # The Open Inference Protocol's own error shape: {"error": "<message>"}.
    assert r.status_code == 404 and "no_such_model" in str(r.json()["error"]), r.text
    _still_serving(client, photos)


def test_unknown_route_and_method(client):
    _assert_error(client.get("/v1/nothing-here"), 404, "not_found")
    _assert_error(client.get("/v1/classify"), 405, "method_not_allowed")


def test_sigterm_exits_cleanly_after_printing_the_url(server):
    base, process, log_path = server
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=30) == 0, log_path.read_text()
    assert f"serving vit_test_patch8_32 on {base}" in log_path.read_text()
