"""/metrics: queue-wait and pre-processing histograms, job gauges, /docs under its own label; deadline messages."""

from __future__ import annotations

import asyncio
import io
import re
import time
import zipfile

import numpy as np
import pytest
from fastapi.testclient import TestClient

from service.core.errors import DeadlineExceeded
from service.core.settings import Settings
from service.http.app import create_app
from service.runtime.batcher import Batcher


def _wait_ready(client: TestClient) -> None:
    deadline = time.monotonic() + 10
    while client.get("/readyz").status_code != 200:
        assert time.monotonic() < deadline, "never ready"
        time.sleep(0.01)


def _value(text: str, name: str) -> float:
    match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
    assert match, f"{name} not in /metrics"
    return float(match.group(1))


def test_queue_wait_and_preprocessing_histograms_count_every_image(make_fake_engine, encode_photo):
    with TestClient(create_app(Settings(), engine=make_fake_engine())) as client:
        _wait_ready(client)
        for name in ("coffee", "rocket"):
            response = client.post("/v1/classify", content=encode_photo(name), headers={"content-type": "image/jpeg"})
            assert response.status_code == 200
        text = client.get("/metrics").text
    assert _value(text, "vitserve_queue_seconds_count") == 2 == _value(text, "vitserve_preprocess_seconds_count")
    assert _value(text, 'vitserve_queue_seconds_bucket{le="+Inf"}') == 2


def test_job_gauges_follow_the_store(make_fake_engine, encode_photo, tmp_path):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as archive:
        archive.writestr("a.jpg", encode_photo("coffee"))
        archive.writestr("b.jpg", encode_photo("rocket"))
        archive.writestr("broken.jpg", b"\xff\xd8 not a jpeg")
    settings = Settings(data_dir=tmp_path / "data")
    with TestClient(create_app(settings, engine=make_fake_engine())) as client:
        _wait_ready(client)
        before = client.get("/metrics").text
        assert _value(before, 'vitserve_jobs{state="done"}') == 0
        job = client.post("/v1/jobs", content=buf.getvalue(), headers={"content-type": "application/zip"}).json()
        deadline = time.monotonic() + 30
        while client.get(f"/v1/jobs/{job['id']}").json()["state"] != "done":
            assert time.monotonic() < deadline, "job never finished"
            time.sleep(0.05)
        text = client.get("/metrics").text
    assert _value(text, 'vitserve_jobs{state="done"}') == 1 and _value(text, 'vitserve_jobs{state="running"}') == 0
    assert _value(text, 'vitserve_job_images{outcome="scored"}') == 2
    assert _value(text, 'vitserve_job_images{outcome="failed"}') == 1
    assert _value(text, 'vitserve_job_images{outcome="pending"}') == 0


def test_docs_traffic_has_its_own_route_labels(make_fake_engine):
    with TestClient(create_app(Settings(api_key="k"), engine=make_fake_engine())) as client:
        assert client.get("/docs").status_code == 200  # open, like /openapi.json (service/http/docs.py)
        assert client.get("/docs/assets/swagger-ui.css").status_code == 200
        assert client.post("/docs").status_code == 405  # no route ran: labelled by its template all the same
        text = client.get("/metrics").text
    assert _value(text, 'vitserve_requests_total{method="GET",route="/docs",status="200"}') == 1
    assert _value(text, 'vitserve_requests_total{method="GET",route="/docs/assets/{name}",status="200"}') == 1
    assert _value(text, 'vitserve_requests_total{method="POST",route="/docs",status="405"}') == 1


def test_deadline_messages_never_show_negative_durations(make_fake_engine):
    engine = make_fake_engine(delay_s=0.2)

    async def main() -> tuple[str, str]:
        batcher = Batcher(engine, max_batch_size=1, max_queue_delay_ms=0, max_queue_size=8)
        await batcher.start()
        pixels = np.zeros((3, 4, 4), np.float32)
        with pytest.raises(DeadlineExceeded) as already:  # the deadline passed while the image was decoded
            await batcher.submit(pixels, deadline=time.monotonic() - 0.007)
        blocker = asyncio.create_task(batcher.submit(pixels))
        await asyncio.sleep(0.01)
        with pytest.raises(DeadlineExceeded) as waited:  # it passes while queued behind a busy engine
            await batcher.submit(pixels, deadline=time.monotonic() + 0.02)
        await blocker
        await batcher.stop()
        return already.value.message, waited.value.message

    already, waited = asyncio.run(main())
    for message in (already, waited):
        assert not re.search(r"-\d", message), message
    assert "passed 7 ms before the image reached the queue" in already
    assert re.search(r"\(\d+ ms in the queue and engine\)", waited), waited
    assert engine.batch_sizes == [1]  # neither late image ran


def test_a_v2_request_with_a_tiny_timeout_gets_a_clean_deadline_message(make_fake_engine):
    import json

    body = {
        "inputs": [{"name": "pixel_values", "shape": [1, 3, 32, 32], "datatype": "FP32", "data": [0.0] * 3072}],
        "parameters": {"timeout": 1},
    }
    with TestClient(create_app(Settings(), engine=make_fake_engine(delay_s=0.05))) as client:
        _wait_ready(client)
        response = client.post("/v2/models/fake_vit/infer", content=json.dumps(body))
    assert response.status_code == 504, response.text
    assert not re.search(r"-\d", response.json()["error"]), response.json()
