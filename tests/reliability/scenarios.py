"""Load scenarios defined once: the reliability tests assert what a client sees in them, and
bench/overload.py runs the same scenarios and prints their rates and latencies.

Each ``run_*`` drives an already started server (``LiveServer``, configured with the scenario's
``*_ENV``) for a bounded time and returns what happened; none asserts anything.
"""

from __future__ import annotations

import io
import socket
import time
from dataclasses import dataclass

import httpx
import numpy as np
from load_generator import LoadResult, closed_loop
from PIL import Image
from reliability_lib import LiveServer, photo_bytes

# -- overload: four times more clients than the queue holds -------------------------------------------
OVERLOAD_QUEUE = 8
OVERLOAD_BATCH = 4
OVERLOAD_DEADLINE_S = 5.0
# The engine is the bottleneck (40 images/s), as a real model is: HTTP work, decoding and the
# refusals then have CPU to spare even on a shared 2-core machine.
OVERLOAD_ENGINE_DELAY_S = 0.1
OVERLOAD_ENV = {
    "VITSERVE_MAX_BATCH_SIZE": str(OVERLOAD_BATCH),
    "VITSERVE_MAX_QUEUE_SIZE": str(OVERLOAD_QUEUE),
    "VITSERVE_MAX_QUEUE_DELAY_MS": "2",
    "VITSERVE_REQUEST_TIMEOUT_S": str(OVERLOAD_DEADLINE_S),
    "RELIABILITY_ENGINE_DELAY_S": str(OVERLOAD_ENGINE_DELAY_S),
}


@dataclass
class OverloadRun:
    unloaded: LoadResult  # as many closed-loop clients as the queue holds, for half the time
    loaded: LoadResult  # four times as many
    metrics: str  # the server's /metrics afterwards


def small_jpeg() -> bytes:
    import skimage.data

    buf = io.BytesIO()
    Image.fromarray(skimage.data.astronaut()).resize((64, 64)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def run_overload(server: LiveServer, seconds: float) -> OverloadRun:
    body = small_jpeg()

    def request(_: int) -> dict:
        return {"url": "/v1/classify?top_k=1", "content": body, "headers": {"Content-Type": "image/jpeg"}}

    # Client timeout past the server's deadline: a request the server never answers shows as LOST.
    timeout_s = OVERLOAD_DEADLINE_S + 5
    clients = OVERLOAD_QUEUE
    unloaded = closed_loop(server.url, request, clients=clients, duration_s=seconds / 2, timeout_s=timeout_s)
    loaded = closed_loop(server.url, request, clients=4 * clients, duration_s=seconds, timeout_s=timeout_s)
    return OverloadRun(unloaded, loaded, httpx.get(f"{server.url}/metrics", timeout=10).text)


# -- slow clients: uploads that trickle in while others are served -----------------------------------------
SLOW_CLIENTS_ENV = {"VITSERVE_MAX_BATCH_SIZE": "4"}


@dataclass
class SlowClientsRun:
    slow_answers: list[bytes]  # the status line each slow upload got once it finished
    fast: list[tuple[int, float]]  # (status, seconds) of each request sent meanwhile


def grey_jpeg(level: int, side: int = 48) -> bytes:
    buf = io.BytesIO()
    rng = np.random.default_rng(level)
    pixels = np.clip(rng.normal(level, 30, (side, side, 3)), 0, 255).astype(np.uint8)
    Image.fromarray(pixels).save(buf, "JPEG")
    return buf.getvalue()


def classify(server: LiveServer, data: bytes, timeout: float = 30) -> httpx.Response:
    return httpx.post(
        f"{server.url}/v1/classify?top_k=1", content=data, timeout=timeout, headers={"Content-Type": "image/jpeg"}
    )


def raw_connection(server: LiveServer) -> socket.socket:
    return socket.create_connection(("127.0.0.1", server.port), timeout=10)


def request_head(path: str, length: int, content_type: str = "image/jpeg") -> bytes:
    return (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {content_type}\r\nContent-Length: {length}\r\n\r\n"
    ).encode()


def run_slow_clients(server: LiveServer, *, slow: int = 16, hold_s: float = 3.0) -> SlowClientsRun:
    """``slow`` uploads send their headers, then 64 bytes per round for ``hold_s``, while one client
    sends fast requests back to back; then the slow ones finish and read their answers.

    A fast request that is not answered within 30 s raises (httpx's timeout): nothing hangs quietly.
    """
    body = photo_bytes("coffee")
    connections = []
    for _ in range(slow):  # slowloris: headers at once, then the body a few bytes at a time
        conn = raw_connection(server)
        conn.sendall(request_head("/v1/classify?top_k=1", len(body)))
        connections.append(conn)
    fast: list[tuple[int, float]] = []
    sent = 0
    deadline = time.monotonic() + hold_s
    while time.monotonic() < deadline:
        for conn in connections:
            conn.sendall(body[sent : sent + 64])
        sent += 64
        started = time.monotonic()
        status = classify(server, grey_jpeg(100)).status_code
        fast.append((status, time.monotonic() - started))
    for conn in connections:  # the slow clients finish and are answered too
        conn.sendall(body[sent:])
    answers = []
    for conn in connections:
        conn.settimeout(30)
        data = b""
        while b"\r\n\r\n" not in data or not data.split(b"\r\n\r\n", 1)[1].endswith(b"}"):
            chunk = conn.recv(65536)
            if not chunk:
                break
            data += chunk
        answers.append(data.split(b"\r\n", 1)[0])
        conn.close()
    return SlowClientsRun(answers, fast)
