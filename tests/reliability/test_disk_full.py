"""A real full disk under a running job: the data dir is a small tmpfs (mounted here; the test needs
root, which CI has) filled to the last byte while a job is being scored.

The job must pause, not fail (its unrecorded images stay pending), uploads must be refused with
507 storage_full, online classification must go on, and once space is freed the job must resume
by itself and finish with every image exactly once; the database stays intact.
"""

from __future__ import annotations

import errno
import io
import os
import sqlite3
import subprocess
import time
import zipfile

import httpx
import pytest
from PIL import Image
from reliability_lib import Bystander, job_rows, photo_bytes, wait_job

pytestmark = pytest.mark.slow

IMAGES = 200


@pytest.fixture
def small_disk(tmp_path):
    mount = tmp_path / "small-disk"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=12m", "tmpfs", str(mount)], capture_output=True, text=True
    )
    if done.returncode != 0:
        message = f"cannot mount a tmpfs (needs root): {done.stderr.strip()}"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def _zip(count: int) -> bytes:
    small = io.BytesIO()
    Image.open(io.BytesIO(photo_bytes("astronaut"))).resize((48, 48)).save(small, "JPEG")
    photo = small.getvalue()
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as archive:
        for i in range(count):
            archive.writestr(f"{i:03d}.jpg", photo)
    return buf.getvalue()


def _fill(folder) -> int:
    """Write until the disk refuses: the number of bytes written."""
    written = 0
    with open(folder / "filler", "wb", buffering=0) as out:
        block = b"\xff" * (64 * 1024)
        while True:
            try:
                written += out.write(block)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC, exc
                break
        while True:  # the last few bytes
            try:
                written += out.write(b"\xff" * 512)
            except OSError:
                return written


def test_a_full_disk_pauses_the_job_and_it_resumes_when_space_returns(start_server, small_disk):
    server = start_server(
        VITSERVE_DATA_DIR=str(small_disk / "data"),
        VITSERVE_MAX_BATCH_SIZE=1,
        RELIABILITY_ENGINE_DELAY_S=0.05,
    )
    headers = {"Content-Type": "application/zip"}
    created = httpx.post(f"{server.url}/v1/jobs", content=_zip(IMAGES), headers=headers, timeout=60)
    assert created.status_code == 202, created.text
    job_id = created.json()["id"]
    deadline = time.monotonic() + 60
    while httpx.get(f"{server.url}/v1/jobs/{job_id}", timeout=10).json()["done"] < 10:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    with Bystander(server.url) as bystander:
        filled = _fill(small_disk)
        deadline = time.monotonic() + 60
        while not (job := httpx.get(f"{server.url}/v1/jobs/{job_id}", timeout=10).json())["paused"]:
            assert job["state"] == "running", job  # never failed
            assert time.monotonic() < deadline, f"the job never paused on the full disk: {job}"
            time.sleep(0.1)
        print(f"\nfilled {filled} bytes; job paused at {job['done']}/{IMAGES}: {job['paused']}")
        assert "storage full" in job["paused"]
        refused = httpx.post(f"{server.url}/v1/jobs", content=_zip(5), headers=headers, timeout=60)
        assert refused.status_code == 507, refused.text
        assert refused.json()["error"]["code"] == "storage_full" and refused.headers.get("Retry-After")
        time.sleep(1.0)  # a paused job stays paused while the disk is full
        still = httpx.get(f"{server.url}/v1/jobs/{job_id}", timeout=10).json()
        assert still["state"] == "running" and still["paused"], still
        (small_disk / "filler").unlink()
        job = wait_job(server.url, job_id, timeout_s=120)
    bystander.assert_served()
    rows = job_rows(server.url, job_id)
    assert [row["path"] for row in rows] == [f"{i:03d}.jpg" for i in range(IMAGES)]  # each once, in order
    assert job["scored"] == IMAGES and job["failed"] == 0 and job["paused"] is None
    assert server.terminate(timeout_s=30) == 0
    with sqlite3.connect(small_disk / "data" / "jobs.sqlite3") as db:
        assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
