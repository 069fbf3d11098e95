"""Hostile HTTP against a real server: oversized and unterminated request heads, connections that
send nothing or trickle, more connections than the cap, clients hanging up mid-body, and JSON
bodies built to cost memory or crash the parser (deep nesting, millions of elements, integers of
thousands of digits, invalid UTF-8).

Each gets a clear refusal (our JSON shape; the protocol's under /v2), the server's peak RSS stays
bounded and a well-behaved client is still answered. Sizes: RELIABILITY_HEAD_BOMB_BYTES (CI 8 MiB,
`make fuzz` 128 MiB), RELIABILITY_JSON_BOMB_ELEMENTS (CI 1 M, `make fuzz` 6.9 M),
RELIABILITY_IDLE_CONNECTIONS (CI 200, `make fuzz` 1000).
"""

from __future__ import annotations

import base64
import json
import re
import socket
import threading
import time

import httpx
import pytest
from reliability_lib import Bystander, LiveServer, metric, photo_bytes, scale

pytestmark = pytest.mark.slow

HEAD_BOMB_BYTES = scale("RELIABILITY_HEAD_BOMB_BYTES", 8 << 20)
JSON_BOMB_ELEMENTS = scale("RELIABILITY_JSON_BOMB_ELEMENTS", 1_000_000)
IDLE_CONNECTIONS = scale("RELIABILITY_IDLE_CONNECTIONS", 200)
MAX_CONNECTIONS = 64
HEAD_LIMIT = 16 * 1024
HEAD_TIMEOUT_S = 2.0
PEAK_RSS_LIMIT_MIB = 400


@pytest.fixture(scope="module")
def server(reliability_model, tmp_path_factory):
    live = LiveServer(
        reliability_model,
        tmp_path_factory.mktemp("http"),
        {
            "VITSERVE_MAX_CONNECTIONS": str(MAX_CONNECTIONS),
            "VITSERVE_MAX_REQUEST_HEAD_BYTES": str(HEAD_LIMIT),
            "VITSERVE_REQUEST_HEAD_TIMEOUT_S": str(HEAD_TIMEOUT_S),
            "VITSERVE_KEEP_ALIVE_TIMEOUT_S": "1",
            "VITSERVE_LOG_LEVEL": "info",
        },
    )
    try:
        yield live.wait_ready()
    finally:
        live.terminate(timeout_s=30)


def _connect(server) -> socket.socket:
    return socket.create_connection(("127.0.0.1", server.port), timeout=15)


def _read_response(conn: socket.socket) -> tuple[int, dict, bytes]:
    """(status, headers, body) of one response, reading until the body is complete or the server closes."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(65536)
        if not chunk:
            raise ConnectionError(f"closed without an answer (got {data[:200]!r})")
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    length = int(headers.get("content-length", "0"))
    while len(body) < length:
        chunk = conn.recv(65536)
        if not chunk:
            break
        body += chunk
    return int(lines[0].split()[1]), headers, body


def _closed_within(conn: socket.socket, seconds: float) -> bool:
    """True when the server closes ``conn`` (recv gives b"") within ``seconds`` (reading what comes first)."""
    conn.settimeout(seconds)
    try:
        while conn.recv(65536):
            pass
        return True
    except TimeoutError:
        return False
    except ConnectionResetError:
        return True


def _refusal(status: int, headers: dict, body: bytes, expected: int, code: str) -> dict:
    assert status == expected, (status, body[:300])
    assert headers.get("content-type") == "application/json" and headers.get("connection") == "close", headers
    error = json.loads(body)["error"]
    assert error["code"] == code and error["message"], error
    return error


def _send_quietly(conn: socket.socket, data: bytes) -> None:
    """Send, ignoring the server closing the connection under us (it refused, and stopped reading)."""
    try:
        conn.sendall(data)
    except (BrokenPipeError, ConnectionResetError):
        pass


def test_oversized_and_unterminated_request_heads_get_431(server):
    cases = {
        "a 20 KB URL": b"GET /healthz?" + b"q" * 20_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
        "one 20 KB header": b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"v" * 20_000 + b"\r\n\r\n",
        "600 headers": b"GET /healthz HTTP/1.1\r\nHost: x\r\n"
        + b"X-H: vvvvvvvvvvvvvvvvvvvvvvvvvvvvvv\r\n" * 600
        + b"\r\n",
    }
    with Bystander(server.url) as bystander:
        for name, request in cases.items():
            with _connect(server) as conn:
                _send_quietly(conn, request)
                error = _refusal(*_read_response(conn), 431, "request_header_fields_too_large")
                assert str(HEAD_LIMIT) in error["message"], name
        # An unterminated header streamed as fast as the server takes it: refused at the limit.
        with _connect(server) as conn:
            sender = threading.Thread(
                target=_send_quietly,
                args=(conn, b"GET / HTTP/1.1\r\nHost: x\r\nX-Bomb: " + b"b" * HEAD_BOMB_BYTES),
                daemon=True,
            )
            sender.start()
            _refusal(*_read_response(conn), 431, "request_header_fields_too_large")
            sender.join(30)
        # Exactly at the limit is still served.
        path = "/healthz?" + "q" * (HEAD_LIMIT - 200)
        assert httpx.get(f"{server.url}{path}", timeout=10).status_code == 200
    bystander.assert_served()
    peak = server.peak_rss_kib() / 1024
    print(f"\npeak RSS {peak:.0f} MiB after a {HEAD_BOMB_BYTES >> 20} MiB unterminated header")
    assert peak < PEAK_RSS_LIMIT_MIB


def test_silent_and_trickling_connections_are_closed(server):
    # Nothing sent at all: closed after the head deadline, without an answer.
    with _connect(server) as silent:
        assert _closed_within(silent, HEAD_TIMEOUT_S + 10)
    # Header lines trickled one every 0.5 s: 408 once the deadline passes.
    with _connect(server) as trickle:
        started = time.monotonic()
        trickle.sendall(b"GET /healthz HTTP/1.1\r\n")
        while time.monotonic() - started < HEAD_TIMEOUT_S + 10:
            try:
                trickle.sendall(b"X-Slow: 1\r\n")
            except (BrokenPipeError, ConnectionResetError):
                break
            trickle.settimeout(0.5)
            try:
                if trickle.recv(1, socket.MSG_PEEK):
                    break
            except TimeoutError:
                continue
        trickle.settimeout(10)
        _refusal(*_read_response(trickle), 408, "request_timeout")
    # After an answer on a kept-alive connection: idle is closed (keep-alive timeout), and so is a
    # next request trickled too slowly.
    for follow_up in (None, b"GET /healthz HTTP/1.1\r\n"):
        with _connect(server) as kept:
            kept.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            status, _, _ = _read_response(kept)
            assert status == 200
            if follow_up is None:
                assert _closed_within(kept, 10)
                continue
            kept.sendall(follow_up)
            deadline = time.monotonic() + HEAD_TIMEOUT_S + 10
            while time.monotonic() < deadline:
                time.sleep(0.3)
                try:
                    kept.sendall(b"X-Slow: 1\r\n")
                except (BrokenPipeError, ConnectionResetError):
                    break
                kept.settimeout(0.01)
                try:
                    if kept.recv(1, socket.MSG_PEEK):
                        break
                except TimeoutError:
                    pass
            kept.settimeout(10)
            _refusal(*_read_response(kept), 408, "request_timeout")
    assert httpx.get(f"{server.url}/healthz", timeout=10).status_code == 200


def test_connections_over_the_cap_are_refused_with_503_and_idle_ones_expire(server):
    fds = server.open_fds()
    held: list[socket.socket] = []
    refused = 0
    try:
        for _ in range(IDLE_CONNECTIONS):
            conn = _connect(server)
            held.append(conn)
        time.sleep(0.5)
        for conn in held[MAX_CONNECTIONS:]:
            conn.settimeout(10)
            try:
                status, headers, body = _read_response(conn)
            except (ConnectionError, TimeoutError):
                continue
            error = _refusal(status, headers, body, 503, "overloaded")
            assert "max_connections" in error["message"] and headers.get("retry-after") == "1"
            refused += 1
        peak_fds = server.open_fds()
        print(f"\n{IDLE_CONNECTIONS} idle connections: {refused} refused with 503; server fds {fds} -> {peak_fds}")
        assert refused >= IDLE_CONNECTIONS - MAX_CONNECTIONS - 2  # the few accepted while others were closing
        assert peak_fds <= fds + MAX_CONNECTIONS + 8
        # The idle ones are closed at the head deadline; then a real client is served again.
        deadline = time.monotonic() + HEAD_TIMEOUT_S + 15
        while True:
            try:
                response = httpx.post(
                    f"{server.url}/v1/classify",
                    content=photo_bytes("coffee"),
                    headers={"Content-Type": "image/jpeg"},
                    timeout=10,
                )
                if response.status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "a real client was still refused after the idle connections expired"
            time.sleep(0.2)
    finally:
        for conn in held:
            conn.close()
    assert server.settled_fds(fds, timeout_s=10) <= fds + 2


def _cut_upload(server, path: str, content_type: str, body: bytes) -> None:
    with _connect(server) as conn:
        head = f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: {content_type}\r\nContent-Length: {len(body)}\r\n\r\n"
        conn.sendall(head.encode() + body[: len(body) // 2])
        time.sleep(0.05)


def test_a_client_hanging_up_mid_body_is_a_499_with_one_log_line(server):
    photo = photo_bytes("astronaut")
    batch = json.dumps({"images": [{"id": "a", "data": base64.b64encode(photo).decode()}]}).encode()
    model = httpx.get(f"{server.url}/v1/models", timeout=10).json()["name"]
    v2 = json.dumps({"inputs": [{"name": "images", "shape": [1], "datatype": "BYTES", "data": [batch.decode()]}]})
    uploads = [
        ("/v1/classify", "image/jpeg", photo),
        ("/v1/classify/batch", "application/json", batch),
        ("/v1/jobs", "application/zip", photo * 4),
        (f"/v2/models/{model}/infer", "application/json", v2.encode()),
    ] * 5
    before, log_before = httpx.get(f"{server.url}/metrics", timeout=10).text, server.log()
    for path, content_type, body in uploads:
        _cut_upload(server, path, content_type, body)
    time.sleep(1.0)
    after, log = httpx.get(f"{server.url}/metrics", timeout=10).text, server.log()[len(log_before) :]

    def answered(status: str) -> float:
        pattern = rf'^vitserve_requests_total\{{.*status="{status}".*\}} ([0-9.e+]+)$'  # route labels hold braces
        return sum(float(v) for v in re.findall(pattern, after, re.M)) - sum(
            float(v) for v in re.findall(pattern, before, re.M)
        )

    print(f"\n{len(uploads)} uploads cut mid-body: {answered('499'):.0f} x 499, {answered('500'):.0f} x 500")
    assert answered("499") == len(uploads) and answered("500") == 0
    assert "Traceback" not in log, log[-3000:]
    assert log.count("disconnected before its request body was complete") == len(uploads), log[-3000:]
    assert metric(after, "vitserve_requests_in_flight") == 0


def _v2(server, body: bytes) -> httpx.Response:
    model = httpx.get(f"{server.url}/v1/models", timeout=10).json()["name"]
    return httpx.post(
        f"{server.url}/v2/models/{model}/infer", content=body, headers={"Content-Type": "application/json"}, timeout=60
    )


def _batch(server, body: bytes) -> httpx.Response:
    return httpx.post(
        f"{server.url}/v1/classify/batch", content=body, headers={"Content-Type": "application/json"}, timeout=60
    )


def test_hostile_json_bodies_get_a_4xx_naming_the_problem(server):
    n = JSON_BOMB_ELEMENTS
    image = base64.b64encode(photo_bytes("coffee")).decode()
    tensor = lambda data: json.dumps(  # noqa: E731 - a one-line builder
        {"inputs": [{"name": "pixel_values", "shape": [1, 3, 32, 32], "datatype": "FP32", "data": data}]}
    ).encode()
    v1_cases = {
        "100k-deep arrays": (b'{"images": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", 413, "arrays"),
        "2000-deep objects": (b'{"images": [' + b'{"a":' * 2000 + b"1" + b"}" * 2000 + b"]}", 413, "objects"),
        f"{n} empty objects": (b'{"images": [' + b"{}," * (n - 1) + b"{}]}", 413, "objects"),
        f"{n} numbers": (b'{"images": [' + b"0," * (n - 1) + b"0]}", 413, "values"),
        "a 5000-digit top_k": (
            json.dumps({"images": [{"data": image}]}).encode()[:-1] + b', "top_k": ' + b"7" * 5000 + b"}",
            400,
            "digits",
        ),
        "a 400-digit top_k": (json.dumps({"images": [{"data": image}], "top_k": 10**400}).encode(), 400, "top_k"),
        "invalid UTF-8": (b'{"images": [{"id": "\xff\xfe", "data": "x"}]}', 400, "UTF-8"),
    }
    v2_cases = {
        "100k-deep arrays": (b'{"inputs": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", 413, "arrays"),
        "5000-deep arrays (within the count)": (
            tensor(None).replace(b"null", b"[" * 5000 + b"]" * 5000),
            400,
            "nested",
        ),
        f"{n} numbers": (tensor([0] * n), 413, "values"),
        "a 5000-digit integer": (tensor([0] * 3071 + [1]).replace(b"1]", b"1" * 5000 + b"]"), 400, "digits"),
        "a 400-digit timeout": (
            json.dumps(
                {
                    "parameters": {"timeout": 10**400},
                    "inputs": [{"name": "images", "shape": [1], "datatype": "BYTES", "data": [image]}],
                }
            ).encode(),
            400,
            "timeout",
        ),
        "a 400-digit shape": (
            json.dumps(
                {"inputs": [{"name": "images", "shape": [10**400], "datatype": "BYTES", "data": [image]}]}
            ).encode(),
            400,
            "shape",
        ),
        "invalid UTF-8": (
            b'{"inputs": [{"name": "\xff", "shape": [1], "datatype": "BYTES", "data": ["x"]}]}',
            400,
            "UTF-8",
        ),
    }
    with Bystander(server.url) as bystander:
        for name, (body, status, word) in v1_cases.items():
            response = _batch(server, body)
            assert response.status_code == status, f"v1 {name}: {response.status_code} {response.text[:300]}"
            error = response.json()["error"]
            assert word.lower() in error["message"].lower(), f"v1 {name}: {error}"
        for name, (body, status, word) in v2_cases.items():
            response = _v2(server, body)
            assert response.status_code == status, f"v2 {name}: {response.status_code} {response.text[:300]}"
            error = response.json()["error"]
            assert isinstance(error, str) and word.lower() in error.lower(), f"v2 {name}: {error}"
    bystander.assert_served()
    assert httpx.get(f"{server.url}/healthz", timeout=10).status_code == 200
    peak = server.peak_rss_kib() / 1024
    print(f"\npeak RSS {peak:.0f} MiB after JSON bodies of {n} elements")
    assert peak < PEAK_RSS_LIMIT_MIB
