"""Faults against real servers (tests/reliability/fault_server.py): the engine raising on one batch,
slow clients, clients leaving mid-upload and mid-wait, SIGTERM under load, SIGKILL during a
scoring job. In every case no accepted request is lost: each gets an answer, or (SIGKILL) its
work is redone after the restart, exactly once.
"""

from __future__ import annotations

import io
import json
import threading
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from load_generator import LOST, REFUSED, closed_loop
from reliability_lib import STACK_TRACE, metric, photo_bytes
from scenarios import SLOW_CLIENTS_ENV, classify, grey_jpeg, raw_connection, request_head, run_slow_clients

pytestmark = pytest.mark.slow


def metrics(server) -> str:
    return httpx.get(f"{server.url}/metrics", timeout=10).text


def test_engine_failing_on_one_batch_fails_only_that_batch(start_server):
    server = start_server(
        VITSERVE_MAX_BATCH_SIZE=4,
        VITSERVE_MAX_QUEUE_DELAY_MS=20,
        RELIABILITY_ENGINE_DELAY_S=0.05,
        RELIABILITY_FAIL_BATCHES="3",
    )
    images = [grey_jpeg(level) for level in range(0, 240, 10)]  # 24 requests, ~6+ batches
    with ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(lambda data: classify(server, data), images))
    statuses = [r.status_code for r in responses]
    failed = [r for r in responses if r.status_code != 200]
    assert set(statuses) <= {200, 500} and 1 <= len(failed) <= 4, statuses  # exactly one batch's requests
    for r in failed:
        body = r.json()["error"]
        assert body["code"] == "inference_failed" and "injected fault on batch 3" in body["message"]
        assert not STACK_TRACE.search(r.text)
    text = metrics(server)
    # Every image ran exactly once: the successful batches hold all the others.
    assert metric(text, "vitserve_batch_size_sum") == len(images) - len(failed)
    assert all(classify(server, data).status_code == 200 for data in images[:4])  # and it keeps serving


def test_slow_clients_do_not_hold_up_the_others(start_server):
    # Slow uploads hold their connections for 3 s while fast requests are sent one after another;
    # each fast one must be answered 200 meanwhile (within its 30 s client timeout), and the slow
    # ones too once they finish. How long the fast ones took: bench/overload.py.
    run = run_slow_clients(start_server(**SLOW_CLIENTS_ENV))
    print(f"\n16 slow uploads held open 3 s: {len(run.fast)} fast requests answered meanwhile")
    assert run.fast and {status for status, _ in run.fast} == {200}, run.fast
    assert run.slow_answers == [b"HTTP/1.1 200 OK"] * 16


def test_clients_leaving_mid_upload_and_mid_wait_leak_nothing(start_server):
    server = start_server(VITSERVE_MAX_BATCH_SIZE=1, VITSERVE_MAX_QUEUE_DELAY_MS=0, RELIABILITY_ENGINE_DELAY_S=0.2)
    body = photo_bytes("astronaut")
    with ThreadPoolExecutor(8) as pool:  # warm up: thread pools start their threads lazily
        assert all(r.status_code == 200 for r in pool.map(lambda _: classify(server, body), range(8)))
    fds, threads = server.open_fds(), server.threads()
    before = metrics(server)
    # Mid-upload: half the body, then gone (30 times).
    for _ in range(30):
        conn = raw_connection(server)
        conn.sendall(request_head("/v1/classify", len(body)) + body[: len(body) // 2])
        conn.close()
    # Mid-wait: one request keeps the engine busy; 6 more queue behind it and leave while waiting.
    keeper = threading.Thread(target=lambda: classify(server, grey_jpeg(5)))
    keeper.start()
    time.sleep(0.05)
    leavers = []
    for level in range(6):
        conn = raw_connection(server)
        data = grey_jpeg(level * 30)
        conn.sendall(request_head("/v1/classify", len(data)) + data)
        leavers.append(conn)
    time.sleep(0.1)
    for conn in leavers:
        conn.close()
    keeper.join(timeout=30)
    time.sleep(1.0)  # let the server notice and clean up
    after = metrics(server)
    ran = metric(after, "vitserve_batch_size_sum") - metric(before, "vitserve_batch_size_sum")
    print(
        f"\n30 uploads cut in half, 6 clients gone while queued: {ran:.0f} image(s) ran; "
        f"fds {fds} -> {server.settled_fds(fds)}, threads {threads} -> {server.threads()}"
    )
    assert ran <= 2  # the keeper, and at most one leaver already taken into the engine
    assert metric(after, "vitserve_requests_in_flight") == 0
    # +2 threads at most: the pre-processing pool may still start its second thread lazily (one request
    # decodes on at most half the pool's threads), and a native library one of its own; a leak per
    # request would add 36.
    # +4 fds and libuv's worker threads: uvloop starts its thread pool (and its wake-up fds) lazily on
    # first use, once per process; 36 leaving clients leaking one fd each would show as 36.
    libuv = server.thread_names().get("libuv-worker", 0)
    assert server.settled_fds(fds) <= fds + 4, server.thread_names()
    assert server.threads() <= threads + 2 + libuv, server.thread_names()
    assert classify(server, body).status_code == 200


def test_sigterm_under_load_finishes_every_accepted_request(start_server):
    server = start_server(VITSERVE_MAX_BATCH_SIZE=4, VITSERVE_MAX_QUEUE_SIZE=64, RELIABILITY_ENGINE_DELAY_S=0.05)
    body = grey_jpeg(120)

    def request(_: int) -> dict:
        return {"url": "/v1/classify?top_k=1", "content": body, "headers": {"Content-Type": "image/jpeg"}}

    threading.Timer(1.5, server.process.terminate).start()  # SIGTERM while 16 clients keep sending
    result = closed_loop(server.url, request, clients=16, duration_s=4.0, timeout_s=30, backoff_s=0.02)
    exit_code = server.process.wait(timeout=30)
    statuses = result.statuses()
    first_503 = min((o.sent_at for o in result.outcomes if o.status == 503), default=None)
    print(f"\nSIGTERM after 1.5 s of 16 clients: statuses {statuses} (-1 = refused after exit), exit {exit_code}")
    assert exit_code == 0
    lost = [(round(o.sent_at - result.outcomes[0].sent_at, 3), o.error) for o in result.outcomes if o.status == LOST]
    assert not lost, lost  # no accepted request was dropped
    assert set(statuses) <= {200, 503, REFUSED}, statuses
    assert statuses.get(200, 0) > 0 and statuses.get(503, 0) > 0  # served, then drained with 503s
    assert all(o.status != 200 or o.sent_at < first_503 + 2.0 for o in result.outcomes)
    assert "Traceback" not in server.log()


def _zip_of(images: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as archive:
        for name, data in images.items():
            archive.writestr(name, data)
    return buf.getvalue()


def test_sigkill_during_a_scoring_job_resumes_without_loss_or_duplicates(start_server, tmp_path):
    env = {
        "VITSERVE_MAX_BATCH_SIZE": 4,
        "VITSERVE_DATA_DIR": str(tmp_path / "jobs-data"),
        "RELIABILITY_ENGINE_DELAY_S": 0.05,
    }
    images = {f"img/{i:03d}.jpg": grey_jpeg(i * 2) for i in range(120)}
    server = start_server(**env)
    created = httpx.post(
        f"{server.url}/v1/jobs?top_k=3",
        content=_zip_of(images),
        timeout=60,
        headers={"Content-Type": "application/zip"},
    )
    assert created.status_code == 202, created.text
    job_id = created.json()["id"]
    deadline = time.monotonic() + 60
    while True:  # kill it mid-job
        done = httpx.get(f"{server.url}/v1/jobs/{job_id}", timeout=10).json()["done"]
        if done >= 20:
            break
        assert time.monotonic() < deadline
        time.sleep(0.02)
    server.kill()
    assert done < len(images), "the job finished before the kill: make it longer"
    restarted = start_server(**env)
    deadline = time.monotonic() + 120
    while (job := httpx.get(f"{restarted.url}/v1/jobs/{job_id}", timeout=10).json())["state"] != "done":
        assert time.monotonic() < deadline, job
        time.sleep(0.1)
    rows = [
        json.loads(line)
        for line in httpx.get(f"{restarted.url}/v1/jobs/{job_id}/results", timeout=30).text.splitlines()
    ]
    print(
        f"\nSIGKILL at {done}/{len(images)} scored; after restart: {len(rows)} rows, state {job['state']}, "
        f"scored {job['scored']}, failed {job['failed']}"
    )
    assert [row["path"] for row in rows] == sorted(images)  # every image once, in order: none lost, none doubled
    assert job["scored"] == len(images) and job["failed"] == 0 and job["done"] == job["total"] == len(images)
    # And the resumed results are the model's answers: spot-check against /v1/classify.
    for row in rows[::30]:
        online = httpx.post(
            f"{restarted.url}/v1/classify?top_k=3",
            content=images[row["path"]],
            timeout=30,
            headers={"Content-Type": "image/jpeg"},
        ).json()["predictions"]
        assert row["labels"] == [p["label"] for p in online]
