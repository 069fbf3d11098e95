"""`serve` with several front-end workers and one engine process (service/serving/supervisor.py), on
real sockets: every route works, batches mix the workers' traffic, jobs run once, /metrics sums the
processes, a killed worker or engine is replaced with only its own requests failing, SIGTERM drains
everything, a full shared queue answers 429, and slow clients are cut off while others are served.

The engine is a fake (its top-1 class is the image's grey level / 25) that takes DELAY_S per
batch, so requests pile up and batch; it is handed to ``serve`` and inherited by the engine process.
"""

from __future__ import annotations

import io
import json
import os
import re
import select
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
from live_server import free_port, wait_ready
from PIL import Image

pytestmark = pytest.mark.slow

SERVER_SCRIPT = textwrap.dedent("""
    import sys, time
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
            time.sleep(self.delay_s)
            level = batch.reshape(batch.shape[0], -1).mean(axis=1) * 255 / 25  # (N,)
            return -np.abs(level[:, None] - np.arange(11)[None, :]).astype(np.float32) * 10

    delay_s, settings = float(sys.argv[1]), Settings(**dict(arg.split("=", 1) for arg in sys.argv[2:]))
    sys.exit(serve(settings, engine=SlowEngine(delay_s)))
""")
REPO = Path(__file__).resolve().parents[2]


class Server:
    def __init__(self, base: str, process: subprocess.Popen, log_path: Path) -> None:
        self.base, self.process, self.log_path = base, process, log_path
        self.port = int(base.rsplit(":", 1)[1])

    def metrics(self) -> str:
        return httpx.get(f"{self.base}/metrics", timeout=10).text

    def pids(self, role: str) -> dict[str, int]:
        """worker index (or "" for the engine) -> pid, from vitserve_process_up."""
        out = {}
        for labels, value in samples(self.metrics(), "vitserve_process_up"):
            if labels["role"] == role and value == 1:
                out[labels["worker"]] = int(labels["pid"])
        return out


@contextmanager
def multiprocess_server(tmp_path: Path, delay_s: float, workers: int = 2, **settings):
    port = free_port()
    script = tmp_path / "mp_server.py"
    script.write_text(SERVER_SCRIPT)
    log_path = tmp_path / f"server-{port}.log"
    settings = dict(
        {"workers": workers, "preprocess_threads": 1, "data_dir": tmp_path / "data"},
        **settings,
        port=port,
        log_level="warning",
    )
    args = [f"{k}={v}" for k, v in settings.items()]
    env = {key: value for key, value in os.environ.items() if key != "VITSERVE_API_KEY"}
    env["PYTHONPATH"] = str(REPO)
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [sys.executable, str(script), str(delay_s), *args], stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO
        )
    server = Server(f"http://127.0.0.1:{port}", process, log_path)
    try:
        wait_ready(server.base, process, log_path)
        yield server
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def samples(text: str, name: str) -> list[tuple[dict[str, str], float]]:
    out = []
    for match in re.finditer(rf"^{re.escape(name)}(?:\{{(.*?)\}})? ([0-9.e+-]+)$", text, re.MULTILINE):
        labels = dict(re.findall(r'(\w+)="([^"]*)"', match.group(1) or ""))
        out.append((labels, float(match.group(2))))
    return out


def total(text: str, name: str, **labels: str) -> float:
    return sum(v for got, v in samples(text, name) if all(got.get(k) == want for k, want in labels.items()))


def grey_png(level: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (20, 20), (level, level, level)).save(buf, "PNG")
    return buf.getvalue()


def classify(base: str, level: int, timeout: float = 30) -> httpx.Response:
    # A connection per request (no keep-alive pool): requests spread over the workers' accepts.
    return httpx.post(
        f"{base}/v1/classify?top_k=1",
        content=grey_png(level),
        headers={"Content-Type": "image/png", "Connection": "close"},
        timeout=timeout,
    )


def wait_until(predicate, timeout_s: float = 30.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def test_every_route_works_and_batches_mix_the_workers_traffic(tmp_path):
    with multiprocess_server(tmp_path, 0.1, max_batch_size=8, max_queue_delay_ms=20) as server:
        assert set(server.pids("worker")) == {"0", "1"} and len(server.pids("engine")) == 1
        levels = [25 * (i % 11) for i in range(24)]
        with ThreadPoolExecutor(24) as pool:
            responses = list(pool.map(lambda level: classify(server.base, level), levels))
        for level, r in zip(levels, responses, strict=True):
            assert r.status_code == 200, r.text
            assert r.json()["predictions"][0]["index"] == level // 25  # each request got its own answer

        batch = httpx.post(
            f"{server.base}/v1/classify/batch",
            json={"images": [{"id": "a", "data": _b64(grey_png(50))}, {"id": "bad", "data": _b64(b"no image")}]},
            timeout=30,
        )
        assert batch.status_code == 200, batch.text
        results = {item["id"]: item for item in batch.json()["results"]}
        assert results["a"]["predictions"][0]["index"] == 2 and results["bad"]["error"]["code"] == "invalid_image"

        infer = httpx.post(
            f"{server.base}/v2/models/slow_fake/infer",
            json={
                "inputs": [{"name": "images", "shape": [1], "datatype": "BYTES", "data": [_b64(grey_png(100))]}],
                "outputs": [{"name": "probabilities", "parameters": {"classification": 1}}],
            },
            timeout=30,
        )
        assert infer.status_code == 200, infer.text
        assert infer.json()["outputs"][0]["data"][0].endswith(":4")  # Triton's "score:index" format

        models = httpx.get(f"{server.base}/v1/models", timeout=10).json()
        assert models["name"] == "slow_fake" and models["ready"] is True
        page = httpx.get(f"{server.base}/", timeout=10)
        assert page.status_code == 200 and "text/html" in page.headers["content-type"]
        assert httpx.get(f"{server.base}/v2/health/ready", timeout=10).status_code == 200

        text = server.metrics()
        # /metrics sums every process: the 24 classify requests, whichever worker answered them...
        assert total(text, "vitserve_requests_total", route="/v1/classify", status="200") == 24
        per_worker = {labels["worker"]: v for labels, v in samples(text, "vitserve_worker_requests_total")}
        assert set(per_worker) <= {"0", "1"} and sum(per_worker.values()) >= 24 + 5
        # ...and the engine's figures: every image through the one batcher, in shared batches.
        assert total(text, "vitserve_batch_size_sum") == 24 + 1 + 1
        assert total(text, "vitserve_batch_size_count") < 24


def _b64(data: bytes) -> str:
    import base64

    return base64.b64encode(data).decode()


def test_job_is_scored_once_by_the_engine_process(tmp_path):
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as zf:
        for i in range(6):
            zf.writestr(f"img{i}.png", grey_png(25 * i))
    with multiprocess_server(tmp_path, 0.02, max_batch_size=4) as server:
        created = httpx.post(
            f"{server.base}/v1/jobs?top_k=1",
            content=archive.getvalue(),
            headers={"Content-Type": "application/zip"},
            timeout=30,
        )
        assert created.status_code == 202, created.text
        job_url = f"{server.base}/v1/jobs/{created.json()['id']}"
        wait_until(lambda: httpx.get(job_url, timeout=10).json()["state"] == "done", what="the job to finish")
        rows = [json.loads(line) for line in httpx.get(f"{job_url}/results", timeout=10).text.splitlines()]
        assert sorted(row["path"] for row in rows) == [f"img{i}.png" for i in range(6)]
        for row in rows:
            assert row["labels"][0] == str(int(row["path"][3]))
        # One runner: each image went through the engine exactly once (two runners would race).
        assert total(server.metrics(), "vitserve_batch_size_sum") == 6


def test_full_shared_queue_answers_429_at_once(tmp_path):
    with multiprocess_server(tmp_path, 0.5, max_batch_size=1, max_queue_size=2, max_queue_delay_ms=0) as server:
        with ThreadPoolExecutor(10) as pool:
            results = list(pool.map(lambda level: classify(server.base, level), [100] * 10))
        rejected = [r for r in results if r.status_code == 429]
        accepted = [r for r in results if r.status_code == 200]
        assert rejected and accepted and len(rejected) + len(accepted) == 10
        for r in rejected:
            assert r.json()["error"]["code"] == "overloaded" and int(r.headers["Retry-After"]) >= 1
        assert classify(server.base, 50).status_code == 200


def test_killed_worker_is_replaced_and_only_its_requests_fail(tmp_path):
    with multiprocess_server(tmp_path, 1.0, max_batch_size=8, max_queue_delay_ms=0) as server:
        pids = server.pids("worker")
        with ThreadPoolExecutor(8) as pool:
            futures = [pool.submit(classify, server.base, 25 * (i % 11)) for i in range(8)]
            wait_until(lambda: total(server.metrics(), "vitserve_requests_in_flight") >= 8, what="8 requests in flight")
            in_flight = {
                labels["worker"]: int(v)
                for labels, v in samples(server.metrics(), "vitserve_worker_requests_in_flight")
            }
            victim = max(in_flight, key=lambda w: in_flight[w])
            os.kill(pids[victim], signal.SIGKILL)
            outcomes = []
            for future in futures:
                try:
                    outcomes.append(future.result().status_code)
                except httpx.TransportError:
                    outcomes.append("connection lost")
        lost = outcomes.count("connection lost")
        assert lost == in_flight[victim] >= 1, (outcomes, in_flight)
        assert outcomes.count(200) == 8 - lost, outcomes
        wait_until(lambda: set(server.pids("worker")) == {"0", "1"}, what="the worker's replacement")
        assert server.pids("worker")[victim] != pids[victim]
        wait_until(lambda: httpx.get(f"{server.base}/readyz", timeout=5).status_code == 200, what="readiness")
        assert all(classify(server.base, 75).status_code == 200 for _ in range(4))


def test_killed_engine_fails_in_flight_with_503_and_is_restarted(tmp_path):
    with multiprocess_server(tmp_path, 1.0, max_batch_size=2, max_queue_delay_ms=0) as server:
        engine_pid = int(next(iter(server.pids("engine").values())))
        with ThreadPoolExecutor(4) as pool:
            futures = [pool.submit(classify, server.base, 50) for _ in range(4)]
            wait_until(lambda: total(server.metrics(), "vitserve_requests_in_flight") >= 4, what="in flight")
            os.kill(engine_pid, signal.SIGKILL)
            responses = [future.result() for future in futures]
        # Images the engine held fail as engine_unavailable; a request not yet that far finds the
        # worker not ready. Either way: 503 with Retry-After, at once.
        codes = set()
        for r in responses:
            assert r.status_code == 503 and r.headers["Retry-After"], r.text
            codes.add(r.json()["error"]["code"])
        assert "engine_unavailable" in codes and codes <= {"engine_unavailable", "not_ready"}, codes
        wait_until(lambda: server.pids("engine") and int(next(iter(server.pids("engine").values()))) != engine_pid)
        wait_until(lambda: httpx.get(f"{server.base}/readyz", timeout=5).status_code == 200, what="readiness")
        r = classify(server.base, 125)
        assert r.status_code == 200 and r.json()["predictions"][0]["index"] == 5


def test_readiness_is_false_while_the_engine_is_down(tmp_path):
    # A killed engine makes the workers say not ready until its replacement is warm.
    with multiprocess_server(tmp_path, 0.01) as server:
        engine_pid = int(next(iter(server.pids("engine").values())))
        os.kill(engine_pid, signal.SIGKILL)
        seen = []
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            status = httpx.get(f"{server.base}/readyz", timeout=5).status_code
            seen.append(status)
            if status == 200 and 503 in seen:
                break
            time.sleep(0.01)
        assert 503 in seen and seen[-1] == 200, seen


def test_sigterm_drains_every_worker_and_the_engine(tmp_path):
    with multiprocess_server(tmp_path, 0.5, max_batch_size=2, max_queue_delay_ms=0) as server:
        with ThreadPoolExecutor(8) as pool:
            accepted = [pool.submit(classify, server.base, 25 * i) for i in range(6)]  # ~1.5 s of work
            wait_until(lambda: total(server.metrics(), "vitserve_requests_in_flight") >= 6, what="6 in flight")
            server.process.send_signal(signal.SIGTERM)
            time.sleep(0.1)
            try:
                late = classify(server.base, 0, timeout=5).status_code
            except httpx.TransportError:
                late = "refused"
            results = [f.result() for f in accepted]
        assert late in (503, "refused")
        for i, r in enumerate(results):
            assert r.status_code == 200, r.text
            assert r.json()["predictions"][0]["index"] == i
        assert server.process.wait(timeout=30) == 0, server.log_path.read_text()


def test_slow_clients_are_cut_off_while_others_are_served(tmp_path):
    with multiprocess_server(
        tmp_path, 0.01, request_head_timeout_s=1, body_timeout_s=1, min_body_rate_bytes_per_s=1000
    ) as server:
        stop = threading.Event()
        answers: list[bytes] = []

        def dribble(headers_only: bool) -> None:
            # A byte every 0.2 s, well under any real client's rate; reads the answer once one comes.
            with socket.create_connection(("127.0.0.1", server.port), timeout=15) as conn:
                head = b"POST /v1/classify HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\nContent-Length: 5000\r\n"
                if headers_only:
                    data = head
                else:
                    conn.sendall(head + b"\r\n")
                    data = b"x" * 5000
                for byte in data:
                    if stop.is_set() or select.select([conn], [], [], 0.2)[0]:
                        break
                    conn.sendall(bytes([byte]))
                answer = b""
                while chunk := conn.recv(65536):  # until the server closes the connection
                    answer += chunk
                answers.append(answer)

        threads = [threading.Thread(target=dribble, args=(i % 2 == 0,)) for i in range(20)]
        for thread in threads:
            thread.start()
        try:
            started = time.monotonic()
            served = [classify(server.base, 100).status_code for _ in range(10)]
            assert served == [200] * 10  # the others are served meanwhile
            for thread in threads:
                thread.join(timeout=20)
            assert time.monotonic() - started < 20
        finally:
            stop.set()
        assert len(answers) == 20
        for answer in answers:
            assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
            assert b"request_timeout" in answer
