"""Soak: a long run of mixed good and bad requests against one real server, in ten rounds.

Every request gets the status its input deserves (no 5xx, none lost); after a warm-up round,
RSS grows less than 50 MB, and open file descriptors and threads come back to the warm-up level
after every round (no leak). CI runs RELIABILITY_SOAK_REQUESTS=1500; `make fuzz` runs 10,000.
"""

from __future__ import annotations

import base64
import io
import itertools

import hostile_files as hostile
import httpx
import pytest
from load_generator import closed_loop
from PIL import Image
from reliability_lib import PHOTOS, photo_bytes, scale

pytestmark = pytest.mark.slow

REQUESTS = scale("RELIABILITY_SOAK_REQUESTS", 1500)
ROUNDS = 10
CLIENTS = 8
RSS_GROWTH_LIMIT_MIB = 50


def _resized(name: str, side: int, fmt: str) -> bytes:
    image = Image.open(io.BytesIO(photo_bytes(name))).convert("RGB")
    buf = io.BytesIO()
    image.resize((side, side * image.height // image.width)).save(buf, fmt)
    return buf.getvalue()


def mixed_requests(model: str) -> list[tuple[dict, int]]:
    """(request kwargs, the status it must get): good photos, batches, v2, jobs, and bad inputs."""
    jpegs = [_resized(name, 160, "JPEG") for name in PHOTOS]
    png = _resized("coffee", 120, "PNG")
    image = {"headers": {"Content-Type": "image/jpeg"}}
    v2 = {
        "inputs": [{"name": "images", "shape": [1], "datatype": "BYTES", "data": [base64.b64encode(jpegs[1]).decode()]}]
    }
    batch = {
        "images": [
            {"id": "good", "data": base64.b64encode(jpegs[2]).decode()},
            {"id": "bad", "data": base64.b64encode(b"not an image").decode()},
        ]
    }
    return [
        ({"url": "/v1/classify", "content": jpegs[0], **image}, 200),
        ({"url": "/v1/classify?top_k=3", "content": png, "headers": {"Content-Type": "image/png"}}, 200),
        ({"url": "/v1/classify/batch", "json": batch}, 200),
        ({"url": f"/v2/models/{model}/infer", "json": v2}, 200),
        ({"url": "/v1/classify", "content": jpegs[3][: len(jpegs[3]) // 2], **image}, 422),  # truncated
        ({"url": "/v1/classify", "content": b"\x00garbage" * 50, **image}, 422),
        ({"url": "/v1/classify", "content": b"", **image}, 422),
        ({"url": "/v1/classify", "content": hostile.png_claiming(50_000, 50_000), **image}, 422),  # bomb header
        ({"url": "/v1/classify", "content": jpegs[0], "headers": {"Content-Type": "text/plain"}}, 415),
        ({"url": "/v1/classify?top_k=0", "content": jpegs[0], **image}, 400),
        ({"url": "/v1/classify/batch", "content": b"{not json", "headers": {"Content-Type": "application/json"}}, 400),
        ({"url": "/v1/nothing-here", "content": b"x"}, 404),
        ({"method": "GET", "url": "/v1/models"}, 200),
        ({"url": "/v1/jobs", "json": {"paths": ["astronaut.jpg", "missing.jpg"]}}, 202),  # a small scoring job
        ({"url": "/v1/jobs", "json": {"paths": ["../escape.jpg"]}}, 403),
    ]


def test_mixed_requests_soak_without_leaks(start_server, tmp_path):
    job_root = tmp_path / "root"
    job_root.mkdir()
    (job_root / "astronaut.jpg").write_bytes(_resized("astronaut", 200, "JPEG"))
    server = start_server(VITSERVE_JOB_ROOT=str(job_root), VITSERVE_MAX_BATCH_SIZE=8)
    model = httpx.get(f"{server.url}/v1/models", timeout=10).json()["name"]
    kinds = mixed_requests(model)
    sequence = itertools.count()
    expected: dict[int, int] = {}  # request number -> status it must get

    def request(_: int) -> dict:
        n = next(sequence)
        kwargs, expected[n] = kinds[n % len(kinds)]
        return {**kwargs, "headers": {**kwargs.get("headers", {}), "X-Soak-Seq": str(n)}}

    per_round = max(len(kinds), REQUESTS // ROUNDS)
    samples = []  # (requests so far, RSS MiB, fds, threads) after each round
    mismatches, sent = [], 0
    for _ in range(ROUNDS):
        first = sent
        result = closed_loop(server.url, request, clients=CLIENTS, duration_s=600, total=per_round)
        sent += len(result.outcomes)
        statuses = sorted(o.status for o in result.outcomes)
        wanted = sorted(expected[n] for n in range(first, sent))
        if statuses != wanted:
            mismatches.append((statuses, wanted))
        samples.append(
            (sent, server.rss_kib() / 1024, server.settled_fds(samples[0][2] if samples else 0), server.threads())
        )
    jobs = httpx.get(f"{server.url}/metrics", timeout=10).text
    print(f"\nsoak: {sent} requests ({len(kinds)} kinds, {CLIENTS} clients); (sent, RSS MiB, fds, threads) per round:")
    for sample in samples:
        print(f"  {sample[0]:6d} {sample[1]:7.1f} {sample[2]:4d} {sample[3]:4d}")
    assert not mismatches, mismatches[0]  # every request got the status its input deserves; none lost
    warm_rss, warm_fds = samples[0][1], samples[0][2]
    growth = max(s[1] for s in samples[1:]) - warm_rss
    print(f"RSS growth after warm-up: {growth:.1f} MiB; threads at the end: {server.thread_names()}")
    assert growth < RSS_GROWTH_LIMIT_MIB
    assert all(s[2] <= warm_fds for s in samples[1:]), samples  # fds back to the warm-up level
    # Thread pools start threads lazily up to fixed sizes (asyncio's default executor adds one only
    # when none is idle), so the count may creep by a couple before it plateaus; a thread leaked per
    # request or per job (100+ jobs here) would add hundreds.
    half = ROUNDS // 2
    assert max(s[3] for s in samples[half:]) <= max(s[3] for s in samples[:half]) + 2, samples
    assert samples[-1][3] <= 40, server.thread_names()
    assert "vitserve_ready 1.0" in jobs
