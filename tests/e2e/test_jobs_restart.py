"""A scoring job survives SIGKILL: after a restart on the same data dir it resumes, and its results
hold every image exactly once (none scored twice into the results, none lost)."""

from __future__ import annotations

import io
import json
import os
import signal
import time

import httpx
import numpy as np
import pytest
from PIL import Image

IMAGES = 400
BROKEN_EVERY = 50  # every 50th file is not an image: errors must be recorded exactly once too


def wait_for_job(client: httpx.Client, job_id: str, timeout_s: float) -> dict:
    deadline = time.monotonic() + timeout_s
    while (job := client.get(f"/v1/jobs/{job_id}").json())["state"] not in ("done", "cancelled", "failed"):
        assert time.monotonic() < deadline, f"job not finished after {timeout_s} s: {job}"
        time.sleep(0.05)
    return job


@pytest.mark.slow
def test_sigkill_mid_job_then_restart_scores_every_image_exactly_once(e2e_model, start_service, tmp_path):
    import skimage.data

    root = tmp_path / "root"
    (root / "imgs").mkdir(parents=True)
    photo = io.BytesIO()
    Image.fromarray(skimage.data.astronaut()).save(photo, "PNG")  # 512 x 512: a few ms to decode each
    source = root / "source.png"
    source.write_bytes(photo.getvalue())
    broken = root / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    paths = []
    for i in range(IMAGES):
        name = f"imgs/{i:04d}.png"
        os.link(broken if i % BROKEN_EVERY == 7 else source, root / name)  # hard links: no disk per copy
        paths.append(name)

    env = {
        "VITSERVE_DATA_DIR": str(tmp_path / "data"),
        "VITSERVE_JOB_ROOT": str(root),
        "VITSERVE_JOB_DECODE_THREADS": "1",
        "VITSERVE_JOB_MAX_IN_FLIGHT": "8",
    }
    first = start_service(e2e_model, **env)
    with httpx.Client(base_url=first.url, timeout=30) as client:
        created = client.post("/v1/jobs?top_k=3", json={"paths": paths})
        assert created.status_code == 202, created.text
        job_id = created.json()["id"]
        deadline = time.monotonic() + 60
        while client.get(f"/v1/jobs/{job_id}").json()["done"] < 40:
            assert time.monotonic() < deadline, "the job made no progress"
            time.sleep(0.01)
    os.kill(first.process.pid, signal.SIGKILL)  # no shutdown code runs; in-flight images are lost mid-way
    first.process.wait(timeout=10)

    second = start_service(e2e_model, **env)
    with httpx.Client(base_url=second.url, timeout=30) as client:
        resumed = client.get(f"/v1/jobs/{job_id}").json()
        assert 40 <= resumed["done"] < IMAGES, f"the kill did not land mid-job: {resumed}"
        job = wait_for_job(client, job_id, timeout_s=120)
        response = client.get(f"/v1/jobs/{job_id}/results")
        rows = [json.loads(line) for line in response.text.splitlines()]
        reference = client.post(
            "/v1/classify?top_k=3", content=source.read_bytes(), headers={"content-type": "image/png"}
        ).json()["predictions"]
    second.stop()

    broken_count = sum(1 for i in range(IMAGES) if i % BROKEN_EVERY == 7)
    assert (job["state"], job["total"], job["done"]) == ("done", IMAGES, IMAGES)
    assert (job["scored"], job["failed"]) == (IMAGES - broken_count, broken_count)
    assert [row["path"] for row in rows] == paths  # every image once, in submission order
    for row in rows:
        if row["path"] in {paths[i] for i in range(IMAGES) if i % BROKEN_EVERY == 7}:
            assert row["error"]["code"] == "invalid_image"
        else:
            assert row["labels"] == [p["label"] for p in reference]
            np.testing.assert_allclose(row["scores"], [p["probability"] for p in reference], rtol=1e-5, atol=1e-7)
