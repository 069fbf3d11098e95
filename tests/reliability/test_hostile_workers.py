"""The multi-process server (`--workers 2`: front-end workers and one engine process) against the
hostile inputs of the one-process tests: every worker applies the same limits.

Decoding bombs behind small headers, formats outside the allow-list (a fake `gs` on PATH records
whether Ghostscript ran), a request's pixel budget, JSON bodies over the element counts or nested
too deeply, bodies over the upload limit, request heads over their limit, manifests on a server
without a job root, clients hanging up mid-body: each is sent several times on fresh connections
(they land on both workers' accepts) and gets its 4xx in our shape (v2: the protocol's); a
bystander is served throughout; every process's peak RSS stays bounded. An engine process that
restarts mid-upload leaves the upload alone (its start-up orphan clean-up runs once per server).
"""

from __future__ import annotations

import base64
import io
import json
import math
import os
import re
import signal
import socket
import threading
import time
from pathlib import Path

import hostile_files as hostile
import httpx
import pytest
from PIL import Image
from reliability_lib import Bystander, LiveServer, photo_bytes, scale, wait_job

pytestmark = pytest.mark.slow

LIMIT = scale("RELIABILITY_DECODE_LIMIT_PIXELS", 4_000_000)
SIDE = math.isqrt(LIMIT)
HEAD_LIMIT = 16 * 1024
UPLOAD_LIMIT = 2 << 20
REPEAT = 3  # each hostile request, on fresh connections: both workers get some
# A worker idles at ~120 MiB and decodes at most two limit-sized images at once (its pixel gate).
PEAK_RSS_LIMIT_MIB = 260 + 2 * 6 * LIMIT / 2**20


@pytest.fixture(scope="module")
def server(reliability_model, tmp_path_factory, fake_gs):
    live = LiveServer(
        reliability_model,
        tmp_path_factory.mktemp("workers"),
        {
            "VITSERVE_WORKERS": "2",
            "VITSERVE_MAX_IMAGE_PIXELS": str(LIMIT),
            "VITSERVE_IMAGE_FORMATS": "JPEG,PNG,WEBP,GIF,BMP,TIFF,ICO",  # ICO allowed: its members are checked
            "VITSERVE_MAX_REQUEST_PIXELS": str(8 * LIMIT),
            "VITSERVE_MAX_BATCH_IMAGES": "24",
            "VITSERVE_MAX_UPLOAD_BYTES": str(UPLOAD_LIMIT),
            "VITSERVE_MAX_REQUEST_HEAD_BYTES": str(HEAD_LIMIT),
            "VITSERVE_LOG_LEVEL": "info",
            "PATH": f"{fake_gs[0]}{os.pathsep}{os.environ['PATH']}",
        },
    )
    try:
        yield live.wait_ready()
    finally:
        live.terminate(timeout_s=60)


def _processes(server: LiveServer) -> dict[int, str]:
    """pid -> role ("engine", "worker 0", ...) of the server's live processes, from /metrics."""
    text = httpx.get(f"{server.url}/metrics", timeout=10).text
    out = {}
    for labels in re.findall(r"^vitserve_process_up\{(.*?)\} 1\.0$", text, re.M):
        fields = dict(re.findall(r'(\w+)="([^"]*)"', labels))
        out[int(fields["pid"])] = "engine" if fields["role"] == "engine" else f"worker {fields['worker']}"
    return out


def _peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmHWM for {pid}")


def _per_worker(server: LiveServer) -> dict[str, float]:
    text = httpx.get(f"{server.url}/metrics", timeout=10).text
    found = re.findall(r'^vitserve_worker_requests_total\{worker="(\d+)"\} ([0-9.e+]+)$', text, re.M)
    return {worker: float(value) for worker, value in found}


def _statuses(server: LiveServer) -> dict[str, float]:
    """HTTP status -> requests answered with it, summed over routes and processes."""
    text = httpx.get(f"{server.url}/metrics", timeout=10).text
    counts: dict[str, float] = {}
    for status, value in re.findall(r'^vitserve_requests_total\{.*status="(\d+)".*\} ([0-9.e+]+)$', text, re.M):
        counts[status] = counts.get(status, 0.0) + float(value)
    return counts


def _black_png(pixels: int) -> bytes:
    side = math.isqrt(pixels)
    buf = io.BytesIO()
    Image.new("RGB", (side, side)).save(buf, "PNG", compress_level=9)
    return buf.getvalue()


def _batch(images: list[bytes]) -> dict:
    return {"images": [{"id": str(i), "data": base64.b64encode(d).decode()} for i, d in enumerate(images)]}


def _raw(server: LiveServer, request: bytes) -> tuple[int, bytes]:
    """Send raw bytes on a fresh connection; (status, body) of the answer."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as conn:
        try:
            conn.sendall(request)
        except (BrokenPipeError, ConnectionResetError):
            pass  # refused and stopped reading: the answer is still there
        data = b""
        while chunk := conn.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


def _cases(server: LiveServer) -> dict[str, tuple]:
    """name -> (send() -> httpx.Response or (status, body), status, our error code or None for v2, a word)."""
    model = httpx.get(f"{server.url}/v1/models", timeout=10).json()["name"]
    fresh = {"Connection": "close"}

    def classify(data: bytes):
        headers = {**fresh, "Content-Type": "application/octet-stream"}
        return lambda: httpx.post(f"{server.url}/v1/classify", content=data, headers=headers, timeout=60)

    def post(path: str, body: bytes, content_type: str = "application/json"):
        headers = {**fresh, "Content-Type": content_type}
        return lambda: httpx.post(f"{server.url}{path}", content=body, headers=headers, timeout=60)

    tensor = {"inputs": [{"name": "pixel_values", "shape": [1, 3, 32, 32], "datatype": "FP32", "data": [0] * 3072}]}
    digits = json.dumps(tensor).encode().replace(b"0]", b"1" * 5000 + b"]")
    head = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"v" * (HEAD_LIMIT + 1000) + b"\r\n\r\n"
    return {
        "16x16 TIFF with a 46336^2 deflate tile": (
            classify(hostile.tiff_blocks(16, 16, tile=(46336, 46336), compression="deflate", complete=False)),
            422,
            "invalid_image",
            "tile",
        ),
        "ICO saying 16x16 around a larger PNG": (
            classify(hostile.ico_embedding(hostile.png_claiming(4 * SIDE, 4 * SIDE))),
            422,
            "invalid_image",
            "ICO",
        ),
        "WebP canvas over the limit": (
            classify(hostile.webp_with_canvas(2 * SIDE, 2 * SIDE)),
            422,
            "invalid_image",
            "canvas",
        ),
        "EPS": (classify(hostile.encoded("EPS", 64)), 422, "invalid_image", "not accepted"),
        "JPEG 2000": (classify(hostile.encoded("JPEG2000", 64)), 422, "invalid_image", "not accepted"),
        "500k empty objects in a batch": (
            post("/v1/classify/batch", b'{"images": [' + b"{}," * 499_999 + b"{}]}"),
            413,
            "payload_too_large",
            "objects",
        ),
        "a batch of arrays nested 100k deep": (
            post("/v1/classify/batch", b'{"images": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"),
            413,
            "payload_too_large",
            "arrays",
        ),
        "a batch of objects nested 2000 deep": (
            post("/v1/classify/batch", b'{"images": [' + b'{"a":' * 2000 + b"1" + b"}" * 2000 + b"]}"),
            413,
            "payload_too_large",
            "objects",
        ),
        "v2 with a 5000-digit integer": (post(f"/v2/models/{model}/infer", digits), 400, None, "digits"),
        "a body over max_upload_bytes": (
            post("/v1/classify", b"\xff\xd8" + b"\x00" * UPLOAD_LIMIT, "image/jpeg"),
            413,
            "payload_too_large",
            "",
        ),
        "a manifest without a job root": (
            post("/v1/jobs", b'{"paths": ["a.jpg"]}'),
            403,
            "forbidden",
            "VITSERVE_JOB_ROOT",
        ),
        "a 17 KB request head": (lambda: _raw(server, head), 431, "request_header_fields_too_large", str(HEAD_LIMIT)),
    }


def test_every_worker_refuses_hostile_inputs_with_its_4xx(server, fake_gs):
    _, marker = fake_gs
    assert sorted(_processes(server).values()) == ["engine", "worker 0", "worker 1"]
    before = _per_worker(server)
    cases = _cases(server)
    with Bystander(server.url) as bystander:
        for name, (send, status, code, word) in cases.items():
            for _ in range(REPEAT):
                answer = send()
                got, body = (answer.status_code, answer.content) if isinstance(answer, httpx.Response) else answer
                assert got == status, f"{name}: {got} {body[:300]!r}"
                error = json.loads(body)["error"]
                if code is None:  # v2: the protocol's shape
                    assert isinstance(error, str) and word in error, f"{name}: {error}"
                else:
                    assert error["code"] == code and word in error["message"], f"{name}: {error}"
        # A request's pixel budget, in whichever worker takes it: 12 limit-sized images, 8 x the limit.
        for _ in range(2):
            response = httpx.post(
                f"{server.url}/v1/classify/batch",
                json=_batch([_black_png(LIMIT)] * 12),
                headers={"Connection": "close"},
                timeout=120,
            )
            results = response.json()["results"]
            refused = [r["error"] for r in results if "error" in r]
            assert sum("predictions" in r for r in results) == 8 and len(refused) == 4, results
            assert all(e["code"] == "payload_too_large" and "max_request_pixels" in e["message"] for e in refused)
    bystander.assert_served()
    assert not marker.exists(), f"Ghostscript ran on an upload: {marker.read_text()}"
    after = _per_worker(server)
    answered = {w: after.get(w, 0) - before.get(w, 0) for w in ("0", "1")}
    print(f"\nrequests answered per worker during the run: {answered}")
    assert all(n > 0 for n in answered.values()), answered  # both workers took hostile requests
    peaks = {role: _peak_rss_mib(pid) for pid, role in _processes(server).items()}
    print("peak RSS: " + ", ".join(f"{role} {mib:.0f} MiB" for role, mib in sorted(peaks.items())))
    assert all(mib < PEAK_RSS_LIMIT_MIB for mib in peaks.values()), peaks
    assert _statuses(server).get("500", 0) == 0


def test_clients_hanging_up_mid_body_are_499s_in_every_worker(server):
    photo = photo_bytes("astronaut")
    batch = json.dumps(_batch([photo])).encode()
    before = _statuses(server)
    for _ in range(4):
        for path, content_type, body in [
            ("/v1/classify", "image/jpeg", photo),
            ("/v1/classify/batch", "application/json", batch),
        ]:
            with socket.create_connection(("127.0.0.1", server.port), timeout=15) as conn:
                head = f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: {content_type}\r\n"
                head += f"Content-Length: {len(body)}\r\n\r\n"
                conn.sendall(head.encode() + body[: len(body) // 2])
                time.sleep(0.05)
    time.sleep(1.0)
    after = _statuses(server)
    delta = {s: after.get(s, 0) - before.get(s, 0) for s in ("499", "500")}
    print(f"\n8 uploads cut mid-body: {delta}")
    assert delta == {"499": 8, "500": 0}
    assert "Traceback" not in server.log(), server.log()[-3000:]


def test_an_engine_restart_leaves_uploads_in_progress_alone(start_server, tmp_path):
    # Orphaned job folders are removed when the server starts; an engine process that restarts
    # (killed here) while a worker is receiving an upload must not take that upload's folder.
    server = start_server(VITSERVE_WORKERS=2, VITSERVE_DATA_DIR=str(tmp_path / "data"))
    archive = hostile.zip_with({f"{i}.jpg": photo_bytes("coffee") for i in range(6)})
    outcome: dict[str, tuple[int, bytes]] = {}
    half = threading.Event()
    resume = threading.Event()

    def upload() -> None:
        with socket.create_connection(("127.0.0.1", server.port), timeout=60) as conn:
            head = "POST /v1/jobs HTTP/1.1\r\nHost: x\r\nContent-Type: application/zip\r\n"
            head += f"Content-Length: {len(archive)}\r\n\r\n"
            conn.sendall(head.encode() + archive[: len(archive) // 2])
            half.set()
            resume.wait(60)
            conn.sendall(archive[len(archive) // 2 :])
            data = b""
            while chunk := conn.recv(65536):
                data += chunk
                if b"\r\n\r\n" in data and data.endswith(b"}"):
                    break
        head_bytes, _, body = data.partition(b"\r\n\r\n")
        outcome["r"] = (int(head_bytes.split()[1]), body)

    thread = threading.Thread(target=upload, daemon=True)
    thread.start()
    assert half.wait(30)
    folders = tmp_path / "data" / "jobs"
    deadline = time.monotonic() + 30
    while not (folders.is_dir() and any(folders.iterdir())):
        assert time.monotonic() < deadline, "the upload's folder never appeared"
        time.sleep(0.02)
    engine = next(pid for pid, role in _processes(server).items() if role == "engine")
    os.kill(engine, signal.SIGKILL)
    deadline = time.monotonic() + 90
    while not (engine not in (pids := _processes(server)) and "engine" in pids.values()):
        assert time.monotonic() < deadline, "the engine process was not restarted"
        time.sleep(0.1)
    server.wait_ready()
    time.sleep(0.5)  # the new engine's start-up (and any clean-up) is done
    resume.set()
    thread.join(60)
    status, body = outcome["r"]
    assert status == 202, body[:300]
    job = wait_job(server.url, json.loads(body)["id"], timeout_s=120)
    assert job["scored"] == 6 and job["failed"] == 0, job
