"""Decoding bombs against a real server: files whose header passes the pixel limit but whose
decoder would allocate far more, formats nobody asked for, and one request trying to take every
pre-processing thread or to go on decoding after its client left.

Each input gets its 4xx in our shape (v2: the protocol's shape); a well-behaved client is served
throughout; the server's peak RSS (VmHWM from /proc) stays bounded. The pixel limit is small in CI
(RELIABILITY_DECODE_LIMIT_PIXELS, 4 Mpx) and the production default under `make fuzz` (40 Mpx).
"""

from __future__ import annotations

import base64
import io
import json
import math
import os
import socket
import threading
import time

import hostile_files as hostile
import httpx
import pytest
from PIL import Image
from reliability_lib import Bystander, metric, scale

pytestmark = pytest.mark.slow

LIMIT = scale("RELIABILITY_DECODE_LIMIT_PIXELS", 4_000_000)
SIDE = math.isqrt(LIMIT)
# Idle server ~120 MiB; at most two limit-sized decodes at once (the pixel gate's default), a few
# bytes per pixel each. Without the guards one TIFF tile bomb alone takes 2 GiB.
PEAK_RSS_LIMIT_MIB = 260 + 2 * 6 * LIMIT / 2**20
BATCH = 24


@pytest.fixture(scope="module")
def server(reliability_model, tmp_path_factory, fake_gs):
    from reliability_lib import LiveServer

    workdir = tmp_path_factory.mktemp("decoding")
    live = LiveServer(
        reliability_model,
        workdir,
        {
            "VITSERVE_MAX_IMAGE_PIXELS": str(LIMIT),
            "VITSERVE_IMAGE_FORMATS": "JPEG,PNG,WEBP,GIF,BMP,TIFF,ICO",  # ICO allowed: its members are checked
            "VITSERVE_MAX_REQUEST_PIXELS": str(8 * LIMIT),
            "VITSERVE_MAX_BATCH_IMAGES": str(BATCH),
            "PATH": f"{fake_gs[0]}{os.pathsep}{os.environ['PATH']}",
        },
    )
    try:
        yield live.wait_ready()
    finally:
        live.terminate(timeout_s=30)


def _post(server, data: bytes, content_type: str = "application/octet-stream") -> httpx.Response:
    return httpx.post(f"{server.url}/v1/classify", content=data, headers={"Content-Type": content_type}, timeout=60)


def _batch(images: list[bytes]) -> dict:
    return {"images": [{"id": str(i), "data": base64.b64encode(d).decode()} for i, d in enumerate(images)]}


def _black_png(pixels: int, mode: str = "RGB") -> bytes:
    side = math.isqrt(pixels)
    buf = io.BytesIO()
    Image.new(mode, (side, side)).save(buf, "PNG", compress_level=9)
    return buf.getvalue()


def _assert_rss_bounded(server) -> None:
    peak = server.peak_rss_kib() / 1024
    print(f"\npeak RSS {peak:.0f} MiB (limit {PEAK_RSS_LIMIT_MIB:.0f} MiB)")
    assert peak < PEAK_RSS_LIMIT_MIB


def _bombs() -> dict[str, tuple[bytes, str]]:
    """name -> (file, a word the refusal names); sizes relative to the limit, several per class."""
    over = [SIDE + 1, 4 * SIDE, 46336]
    cases: dict[str, tuple[bytes, str]] = {}
    for side in over:
        for compression in ("deflate", "lzw", "none"):
            data = hostile.tiff_blocks(16, 16, tile=(side, side), compression=compression, complete=False)
            cases[f"16x16 TIFF, {side}x{side} {compression} tile"] = (data, "tile")
        cases[f"ICO with a {side}x{side} PNG member"] = (hostile.ico_embedding(hostile.png_claiming(side, side)), "ICO")
        if side <= 16384:
            cases[f"WebP, {side}x{side} canvas"] = (hostile.webp_with_canvas(side, side), "canvas")
        if side <= 65535:
            cases[f"GIF, first frame {side}x{side}"] = (hostile.gif_first_frame_claiming(side, side), "limit")
    cases["TIFF, one 1 x 65536*64 tile row"] = (
        hostile.tiff_blocks(1, 1, tile=(65536, LIMIT // 65536 + 64), complete=False),
        "tile",
    )
    return cases


def test_memory_bombs_behind_small_headers_are_refused_before_decoding(server):
    cases = _bombs()
    with Bystander(server.url) as bystander:
        for name, (data, word) in cases.items():
            response = _post(server, data)
            assert response.status_code == 422, f"{name}: {response.text[:300]}"
            error = response.json()["error"]
            assert error["code"] == "invalid_image" and word in error["message"], f"{name}: {error}"
        # Six copies of each class in one small batch request: each refused on its own.
        for name, (data, _) in list(cases.items())[::4]:
            response = httpx.post(f"{server.url}/v1/classify/batch", json=_batch([data] * 6), timeout=60)
            assert response.status_code == 200, response.text[:300]
            assert [r["error"]["code"] for r in response.json()["results"]] == ["invalid_image"] * 6, name
        # The Open Inference Protocol's route refuses in its own shape.
        tiff = cases["16x16 TIFF, 46336x46336 deflate tile"][0]
        v2 = {
            "inputs": [
                {"name": "images", "shape": [2], "datatype": "BYTES", "data": [base64.b64encode(tiff).decode()] * 2}
            ]
        }
        response = httpx.post(f"{server.url}/v2/models/{_model(server)}/infer", json=v2, timeout=60)
        assert response.status_code == 422 and isinstance(response.json()["error"], str), response.text
        assert "tile" in response.json()["error"]
    bystander.assert_served()
    _assert_rss_bounded(server)


def _model(server) -> str:
    return httpx.get(f"{server.url}/v1/models", timeout=10).json()["name"]


NOT_ALLOWED = ["EPS", "JPEG2000", "ICNS", "AVIF", "PCX", "PPM", "SGI", "TGA", "DDS", "QOI"]


def test_formats_outside_the_allow_list_are_refused_and_never_decoded(server, fake_gs):
    _, marker = fake_gs
    with Bystander(server.url) as bystander:
        for image_format in NOT_ALLOWED:
            for side in (8, 300):
                response = _post(server, hostile.encoded(image_format, side))
                assert response.status_code == 422, f"{image_format}: {response.text}"
                message = response.json()["error"]["message"]
                assert "not accepted" in message or "no format" in message, f"{image_format}: {message}"
    bystander.assert_served()
    assert not marker.exists(), f"Ghostscript ran on an upload: {marker.read_text()}"


def _decoded(server) -> float:
    return metric(httpx.get(f"{server.url}/metrics", timeout=10).text, "vitserve_preprocess_seconds_count")


def _wait_for(condition, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


def test_one_batch_never_holds_every_decode_thread(server):
    # 24 images that together fill the request's pixel budget (8 x the limit): they decode one at a
    # time (half of the 2 threads), so another client's image is decoded between them, not after them.
    image = _black_png(LIMIT // 3)
    body = _batch([image] * BATCH)
    before = _decoded(server)
    outcome: dict[str, httpx.Response] = {}
    attacker = threading.Thread(
        target=lambda: outcome.setdefault("r", httpx.post(f"{server.url}/v1/classify/batch", json=body, timeout=120))
    )
    attacker.start()
    _wait_for(lambda: _decoded(server) > before)
    bystander = _post(server, hostile.encoded("PNG", 32), "image/png")
    decoded_by_then = _decoded(server) - before - 1  # minus the bystander's own image
    attacker.join(120)
    assert bystander.status_code == 200, bystander.text
    results = outcome["r"].json()["results"]
    assert all("predictions" in r for r in results), [r.get("error") for r in results]
    print(f"\nthe bystander was answered after {decoded_by_then:.0f} of the batch's {BATCH} images")
    # Behaviour, not timing: had the batch held every thread, the bystander would be decoded after all
    # of its images. How many come first depends on the machine's load (16 of 24 seen under CI load).
    assert decoded_by_then < BATCH
    _assert_rss_bounded(server)


def test_a_request_decodes_no_more_than_its_pixel_budget(server):
    # 12 limit-sized images; the request may decode 8 x the limit: 8 are classified, 4 refused.
    response = httpx.post(f"{server.url}/v1/classify/batch", json=_batch([_black_png(LIMIT)] * 12), timeout=120)
    assert response.status_code == 200, response.text[:300]
    results = response.json()["results"]
    refused = [r for r in results if "error" in r]
    assert sum("predictions" in r for r in results) == 8 and len(refused) == 4, results
    assert all(r["error"]["code"] == "payload_too_large" for r in refused)
    assert all("max_request_pixels" in r["error"]["message"] for r in refused)
    _assert_rss_bounded(server)


def test_decoding_stops_when_the_client_leaves(server):
    image = _black_png(LIMIT // 3)
    raw = json.dumps(_batch([image] * BATCH)).encode()
    before = _decoded(server)
    with socket.create_connection(("127.0.0.1", server.port)) as conn:
        head = (
            "POST /v1/classify/batch HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(raw)}\r\n\r\n"
        )
        conn.sendall(head.encode() + raw)
        _wait_for(lambda: _decoded(server) > before)
    # Gone after the first decode: at most the decodes already running finish.
    time.sleep(2.0)
    decoded = _decoded(server) - before
    print(f"\n{decoded:.0f} of {BATCH} images decoded for a client that left after the first")
    assert decoded <= 4
    assert _post(server, hostile.encoded("PNG", 32), "image/png").status_code == 200
