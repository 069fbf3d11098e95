"""Real uvicorn servers with a slow fake engine: HTTP requests batch, 429 when full, 504 when late,
and SIGTERM drains (503 for new work, every accepted request answered, exit 0)."""

from __future__ import annotations

import io
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
from live_server import free_port, wait_ready
from PIL import Image

pytestmark = pytest.mark.slow

# A server whose engine takes DELAY_S per batch and whose top-1 class is the image's grey level / 25.
# With SLOW_ENGINE_GATE set, every batch first marks that it has reached the engine (the gate's name +
# ".reached") and then waits until the gate file exists (the test opens the gate).
SERVER_SCRIPT = textwrap.dedent("""
    import os, sys, time
    import numpy as np
    from service.core.metadata import ModelMetadata, Preprocessing
    from service.http.server import serve
    from service.runtime.engine_protocol import HostEngine
    from service.core.settings import Settings

    class SlowEngine(HostEngine):
        def __init__(self, delay_s):
            self.delay_s = delay_s
            self.metadata = ModelMetadata("slow_fake", tuple(str(i) for i in range(11)),
                                          Preprocessing(16, 16, "squash", "bilinear", (0, 0, 0), (1, 1, 1)))
        def run(self, batch):
            gate = os.environ.get("SLOW_ENGINE_GATE")
            if gate:
                open(gate + ".reached", "w").close()
            while gate and not os.path.exists(gate):
                time.sleep(0.01)
            time.sleep(self.delay_s)
            level = batch.reshape(batch.shape[0], -1).mean(axis=1) * 255 / 25  # (N,)
            return -np.abs(level[:, None] - np.arange(11)[None, :]).astype(np.float32) * 10

    delay_s, settings = float(sys.argv[1]), Settings(**dict(arg.split("=", 1) for arg in sys.argv[2:]))
    sys.exit(serve(settings, engine=SlowEngine(delay_s)))
""")


@contextmanager
def slow_server(tmp_path: Path, delay_s: float, gate: Path | None = None, **settings):
    port = free_port()
    script = tmp_path / "slow_server.py"
    script.write_text(SERVER_SCRIPT)
    log_path = tmp_path / f"server-{port}.log"
    args = [f"{k}={v}" for k, v in dict(settings, port=port, log_level="warning").items()]
    repo_root = Path(__file__).resolve().parents[2]
    env = {k: v for k, v in os.environ.items() if k != "VITSERVE_API_KEY"}  # no auth (an empty key is refused)
    env.update(PYTHONPATH=str(repo_root), SLOW_ENGINE_GATE=str(gate or ""))
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [sys.executable, str(script), str(delay_s), *args],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=repo_root,
        )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_ready(base, process, log_path)
        yield base, process, log_path
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def grey_png(level: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (20, 20), (level, level, level)).save(buf, "PNG")
    return buf.getvalue()


def classify(base: str, level: int, timeout: float = 30) -> httpx.Response:
    return httpx.post(
        f"{base}/v1/classify?top_k=1", content=grey_png(level), headers={"Content-Type": "image/png"}, timeout=timeout
    )


def metric(text: str, name: str) -> float:
    match = re.search(rf"^{re.escape(name)} ([0-9.e+-]+)$", text, re.MULTILINE)
    assert match, f"{name} not in metrics"
    return float(match.group(1))


def test_concurrent_http_requests_run_as_batches(tmp_path):
    with slow_server(tmp_path, 0.1, max_batch_size=4, max_queue_delay_ms=20) as (base, _, _):
        levels = [25 * (i % 11) for i in range(12)]
        with ThreadPoolExecutor(12) as pool:
            responses = list(pool.map(lambda level: classify(base, level), levels))
        for level, r in zip(levels, responses, strict=True):
            assert r.status_code == 200, r.text
            assert r.json()["predictions"][0]["index"] == level // 25  # each request got its own answer
        text = httpx.get(f"{base}/metrics").text
        batches, images = metric(text, "vitserve_batch_size_count"), metric(text, "vitserve_batch_size_sum")
        assert images == 12  # the fake engine has no warmup(); only requests went through the batcher
        assert batches <= 6, f"12 concurrent requests ran as {batches} batches"
        assert metric(text, 'vitserve_batch_size_bucket{le="4.0"}') == batches  # never over max_batch_size


def test_full_queue_answers_429_at_once_and_keeps_serving(tmp_path):
    # The engine holds its first batch until the test opens the gate. Once that batch is in the
    # engine (not before: a queue the batcher has not drained yet holds only 2), the server holds
    # exactly 3 requests (1 running, 2 queued): the other 7 must be refused while nothing has
    # finished, that is without waiting for any batch; once the gate opens the 3 accepted ones are answered.
    gate = tmp_path / "gate"
    reached = tmp_path / "gate.reached"
    settings = {"max_batch_size": 1, "max_queue_size": 2, "max_queue_delay_ms": 0}
    with slow_server(tmp_path, 0.0, gate=gate, **settings) as (base, _, _):
        with ThreadPoolExecutor(10) as pool:
            futures = [pool.submit(classify, base, 100)]
            deadline = time.monotonic() + 30
            while not reached.exists():
                assert time.monotonic() < deadline and not futures[0].done(), (
                    "the first request never reached the engine"
                )
                time.sleep(0.02)
            futures += [pool.submit(classify, base, 100) for _ in range(9)]
            deadline = time.monotonic() + 30
            while sum(f.done() for f in futures) < 7:
                assert time.monotonic() < deadline, "the excess requests were not refused while the engine was busy"
                time.sleep(0.02)
            answered_early = [f for f in futures if f.done()]
            refused = [f.result() for f in answered_early]
            assert [r.status_code for r in refused] == [429] * 7
            gate.touch()
            accepted = [f.result() for f in futures if f not in answered_early]
        assert [r.status_code for r in accepted] == [200] * 3
        for r in refused:
            assert r.json()["error"]["code"] == "overloaded" and int(r.headers["Retry-After"]) >= 1
        text = httpx.get(f"{base}/metrics").text
        assert metric(text, 'vitserve_requests_total{method="POST",route="/v1/classify",status="429"}') == 7
        assert classify(base, 50).status_code == 200


def test_late_requests_get_504_and_are_not_run(tmp_path):
    with slow_server(tmp_path, 0.4, max_batch_size=1, max_queue_delay_ms=0, request_timeout_s=0.25) as (base, _, _):
        with ThreadPoolExecutor(3) as pool:
            responses = list(pool.map(lambda level: classify(base, level), [0, 50, 100]))
        for r in responses:
            assert r.status_code == 504 and r.json()["error"]["code"] == "deadline_exceeded", r.text
        time.sleep(0.5)
        text = httpx.get(f"{base}/metrics").text
        # Only the first request reached the engine; the two queued behind it were skipped when late.
        assert metric(text, "vitserve_batch_size_count") == 1


def test_sigterm_drains_accepted_requests_and_refuses_new_ones(tmp_path):
    with slow_server(tmp_path, 0.5, max_batch_size=2, max_queue_delay_ms=0) as (base, process, log_path):
        with ThreadPoolExecutor(8) as pool:
            accepted = [pool.submit(classify, base, 25 * i) for i in range(6)]  # ~1.5 s of work
            while metric(httpx.get(f"{base}/metrics").text, "vitserve_requests_in_flight") < 6:
                time.sleep(0.01)  # all six are in the server before the signal
            process.send_signal(signal.SIGTERM)
            time.sleep(0.1)
            ready = httpx.get(f"{base}/readyz", timeout=5)
            refused = classify(base, 0, timeout=5)
            results = [f.result() for f in accepted]
        assert ready.status_code == 503 and ready.json()["status"] == "draining"
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "not_ready"
        for i, r in enumerate(results):
            assert r.status_code == 200, r.text
            assert r.json()["predictions"][0]["index"] == i
        assert process.wait(timeout=20) == 0, log_path.read_text()


def test_requests_of_clients_that_left_are_not_run(tmp_path):
    with slow_server(tmp_path, 0.4, max_batch_size=1, max_queue_delay_ms=0) as (base, _, _):
        port = int(base.rsplit(":", 1)[1])
        with ThreadPoolExecutor(1) as pool:
            busy = pool.submit(classify, base, 100)  # occupies the engine for 0.4 s
            while metric(httpx.get(f"{base}/metrics").text, "vitserve_requests_in_flight") < 1:
                time.sleep(0.01)
            time.sleep(0.05)
            for level in (0, 25, 50):  # three clients send a request and hang up while it is queued
                body = grey_png(level)
                with socket.create_connection(("127.0.0.1", port)) as sock:
                    sock.sendall(
                        b"POST /v1/classify HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
                        b"Content-Length: %d\r\n\r\n" % len(body) + body
                    )
                    time.sleep(0.05)
            assert busy.result().status_code == 200
        time.sleep(0.6)
        text = httpx.get(f"{base}/metrics").text
        assert metric(text, "vitserve_batch_size_sum") == 1  # only the client that stayed was run
        assert 'status="499"' in text


def test_sigterm_finishes_a_request_whose_body_is_still_uploading(tmp_path):
    # Admitted before SIGTERM, body completed after it: the request is accepted work and gets 200,
    # not the 503 that only requests arriving after the signal get.
    body = grey_png(75)
    with slow_server(tmp_path, 0.1) as (base, process, log_path):
        port = int(base.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port), timeout=20) as conn:
            conn.sendall(
                b"POST /v1/classify?top_k=1 HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: image/png\r\n"
                b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(body) + body[:10]
            )
            while metric(httpx.get(f"{base}/metrics").text, "vitserve_requests_in_flight") < 1:
                time.sleep(0.01)  # the server has admitted the request and waits for its body
            process.send_signal(signal.SIGTERM)
            time.sleep(0.3)
            conn.sendall(body[10:])
            response = b""
            while chunk := conn.recv(65536):
                response += chunk
        assert response.startswith(b"HTTP/1.1 200"), response[:300]
        assert b'"index":3' in response.replace(b" ", b"")
        assert process.wait(timeout=20) == 0, log_path.read_text()
