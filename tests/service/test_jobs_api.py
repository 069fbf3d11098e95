"""Scoring jobs end to end against a real `vitserve serve` (uvicorn on 127.0.0.1) with a small ONNX ViT."""

from __future__ import annotations

import csv
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
import zipfile
from pathlib import Path

import httpx
import numpy as np
import pytest
from live_server import free_port, wait_ready
from PIL import Image

from service.scoring.rows import row_from_csv

PHOTO_NAMES = ("astronaut", "coffee", "chelsea", "rocket")
BROKEN = b"\xff\xd8\xff\xe0 this is not really a JPEG"


def thumbnail(name: str, width: int = 96) -> bytes:
    """A real photo, shrunk so decoding stays cheap on a 2-core CI machine."""
    import skimage.data

    image = Image.fromarray(getattr(skimage.data, name)()).convert("RGB")
    image.thumbnail((width, width))
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=90)
    return buf.getvalue()


class ServerProcess:
    """`python -m service.cli serve` in its own session; stopped (or killed) by its PID only.

    Args:
        model: the .onnx file to serve.
        port: TCP port on 127.0.0.1.
        env: extra VITSERVE_* variables.
        log: file receiving the server's output.
    """

    def __init__(self, model: Path, port: int, env: dict[str, str], log: Path) -> None:
        self.url = f"http://127.0.0.1:{port}"
        self.command = [
            sys.executable,
            "-m",
            "service.cli",
            "serve",
            "--model",
            str(model),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--log-level",
            "warning",
        ]
        self.env = {**os.environ, **env}
        self.log = log
        self.process: subprocess.Popen | None = None

    def start(self, timeout_s: float = 90.0) -> None:
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(
                self.command, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        try:
            wait_ready(self.url, self.process, self.log, timeout_s)
        except (RuntimeError, TimeoutError):
            self.stop()
            raise

    def kill(self) -> None:
        assert self.process is not None
        os.kill(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=10)

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.kill()


def wait_for_job(client: httpx.Client, job_id: str, timeout_s: float = 60.0) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        job = client.get(f"/v1/jobs/{job_id}").json()
        if job["state"] in ("done", "cancelled", "failed"):
            return job
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} not finished after {timeout_s} s: {job}")


def jsonl_results(client: httpx.Client, job_id: str) -> list[dict]:
    response = client.get(f"/v1/jobs/{job_id}/results")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/x-ndjson")
    return [json.loads(line) for line in response.text.splitlines()]


def assert_matches_classify(client: httpx.Client, rows: list[dict], images: dict[str, bytes], top_k: int) -> None:
    """Every job row equals what POST /v1/classify answers for the same bytes."""
    for row in rows:
        reference = client.post(
            f"/v1/classify?top_k={top_k}", content=images[row["path"]], headers={"content-type": "image/jpeg"}
        ).json()["predictions"]
        assert row["labels"] == [p["label"] for p in reference], row["path"]
        np.testing.assert_allclose(row["scores"], [p["probability"] for p in reference], rtol=1e-5, atol=1e-7)


@pytest.fixture(scope="module")
def photos_small() -> dict[str, bytes]:
    return {f"{name}.jpg": thumbnail(name) for name in PHOTO_NAMES}


@pytest.fixture(scope="module")
def server(tiny_onnx, tmp_path_factory):
    base = tmp_path_factory.mktemp("jobs-server")
    root = base / "root"
    root.mkdir()
    proc = ServerProcess(
        tiny_onnx,
        free_port(),
        {"VITSERVE_DATA_DIR": str(base / "data"), "VITSERVE_JOB_ROOT": str(root)},
        base / "server.log",
    )
    proc.start()
    proc.root = root
    proc.data_dir = base / "data"
    yield proc
    proc.stop()


@pytest.fixture
def client(server):
    with httpx.Client(base_url=server.url, timeout=30.0) as c:
        yield c


def test_zip_job_runs_in_the_background_and_matches_classify(client, photos_small):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as archive:
        for name, data in photos_small.items():
            archive.writestr(f"photos/{name}", data)
        archive.writestr("photos/broken.jpg", BROKEN)
        archive.writestr("photos/README.txt", b"not an image name: skipped")
    response = client.post("/v1/jobs?top_k=3", content=buf.getvalue(), headers={"content-type": "application/zip"})
    assert response.status_code == 202, response.text
    created = response.json()
    assert response.headers["location"] == f"/v1/jobs/{created['id']}"
    assert created["total"] == 5 and created["state"] in ("queued", "running", "done")

    job = wait_for_job(client, created["id"])
    assert (job["state"], job["total"], job["done"], job["scored"], job["failed"]) == ("done", 5, 5, 4, 1)
    assert job["images_per_second"] > 0

    rows = jsonl_results(client, created["id"])
    assert [r["path"] for r in rows] == sorted(f"photos/{n}" for n in [*photos_small, "broken.jpg"])
    broken = next(r for r in rows if r["path"] == "photos/broken.jpg")
    assert broken["error"]["code"] == "invalid_image" and "labels" not in broken
    good = [r for r in rows if "error" not in r]
    assert all(len(r["labels"]) == 3 for r in good)
    assert_matches_classify(client, good, {f"photos/{n}": d for n, d in photos_small.items()}, 3)


def test_tar_gz_job_by_multipart_and_csv_results(client, photos_small):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as archive:
        for name, data in photos_small.items():
            info = tarfile.TarInfo(f"set/{name}")
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    response = client.post("/v1/jobs", files={"file": ("set.tar.gz", buf.getvalue(), "application/gzip")})
    assert response.status_code == 202, response.text
    job = wait_for_job(client, response.json()["id"])
    assert (job["state"], job["scored"], job["failed"]) == ("done", 4, 0)

    as_csv = client.get(f"/v1/jobs/{job['id']}/results", headers={"accept": "text/csv"})
    assert as_csv.headers["content-type"].startswith("text/csv")
    reader = csv.DictReader(io.StringIO(as_csv.text))
    assert reader.fieldnames[:3] == ["path", "label_1", "score_1"] and reader.fieldnames[-2:] == ["error_code", "error"]
    from_csv = [row_from_csv(row) for row in reader]
    assert from_csv == jsonl_results(client, job["id"])  # same rows, scores round-trip exactly
    assert_matches_classify(client, from_csv, {f"set/{n}": d for n, d in photos_small.items()}, 5)


def test_manifest_job_scores_files_under_the_root_and_lists_missing_ones(server, client, photos_small):
    (server.root / "m").mkdir(exist_ok=True)
    for name, data in photos_small.items():
        (server.root / "m" / name).write_bytes(data)
    lines = [json.dumps(f"m/{name}") for name in photos_small] + [
        json.dumps({"path": "m/missing.jpg"}),
        json.dumps(str(server.root / "m" / "coffee.jpg")),
    ]
    response = client.post(
        "/v1/jobs?top_k=2", content="\n".join(lines) + "\n", headers={"content-type": "application/x-ndjson"}
    )
    assert response.status_code == 202, response.text
    job = wait_for_job(client, response.json()["id"])
    assert (job["state"], job["total"], job["scored"], job["failed"]) == ("done", 6, 5, 1)
    rows = jsonl_results(client, job["id"])
    assert [r["path"] for r in rows] == [
        json.loads(line) if line.startswith('"') else json.loads(line)["path"] for line in lines
    ]
    assert rows[4]["error"]["code"] == "unreadable"
    images = {f"m/{n}": d for n, d in photos_small.items()} | {
        str(server.root / "m" / "coffee.jpg"): photos_small["coffee.jpg"]
    }
    assert_matches_classify(client, [r for r in rows if "error" not in r], images, 2)

    # the same manifest as a multipart file field
    response = client.post("/v1/jobs?top_k=2", files={"manifest": ("list.jsonl", "\n".join(lines), "text/plain")})
    assert response.status_code == 202, response.text
    assert jsonl_results(client, wait_for_job(client, response.json()["id"])["id"]) == rows


def test_manifest_paths_outside_the_root_are_forbidden(server, client, tmp_path):
    secret = tmp_path / "secret.jpg"
    secret.write_bytes(b"private")
    (server.root / "escape.jpg").unlink(missing_ok=True)
    (server.root / "escape.jpg").symlink_to(secret)
    for path in ("../secret.jpg", "m/../../secret.jpg", str(secret), "/etc/passwd", "escape.jpg"):
        for body, content_type in (
            (json.dumps(path) + "\n", "application/x-ndjson"),
            (json.dumps({"paths": ["m/coffee.jpg", path]}), "application/json"),
        ):
            response = client.post("/v1/jobs", content=body, headers={"content-type": content_type})
            assert response.status_code == 403, (path, response.text)
            assert response.json()["error"]["code"] == "forbidden"


def test_archive_with_traversal_entries_is_refused_and_nothing_is_written(server, client, photos_small):
    before = set((server.data_dir / "jobs").iterdir()) if (server.data_dir / "jobs").exists() else set()
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as archive:
        archive.writestr("ok.jpg", photos_small["coffee.jpg"])
        archive.writestr("../../escaped.jpg", photos_small["coffee.jpg"])
    response = client.post("/v1/jobs", content=buf.getvalue(), headers={"content-type": "application/zip"})
    assert response.status_code == 422
    assert response.json()["error"]["code"] == "unsafe_archive"
    assert set((server.data_dir / "jobs").iterdir()) == before  # the job folder was removed again
    assert not list(server.data_dir.parent.rglob("escaped.jpg"))


def test_cancel_stops_a_running_job(server, client):
    import skimage.data

    big = io.BytesIO()
    Image.fromarray(skimage.data.astronaut()).save(big, "PNG")  # 512 x 512 PNG: a few ms each to decode
    (server.root / "many").mkdir(exist_ok=True)
    source = server.root / "many" / "source.png"
    source.write_bytes(big.getvalue())
    for i in range(400):
        target = server.root / "many" / f"{i:03d}.png"
        if not target.exists():
            os.link(source, target)
    response = client.post("/v1/jobs", json={"paths": [f"many/{i:03d}.png" for i in range(400)]})
    assert response.status_code == 202
    job_id = response.json()["id"]
    cancelled = client.delete(f"/v1/jobs/{job_id}")
    assert cancelled.status_code == 200 and cancelled.json()["state"] == "cancelled"
    # Images already scored when the cancel arrived are still written; then the count must stop moving.
    deadline = time.monotonic() + 10
    first = client.get(f"/v1/jobs/{job_id}").json()
    while True:
        time.sleep(0.5)
        later = client.get(f"/v1/jobs/{job_id}").json()
        if later["done"] == first["done"] or time.monotonic() > deadline:
            break
        first = later
    assert later["state"] == "cancelled"
    assert later["done"] == first["done"] < 400, "the job kept scoring after it was cancelled"
    assert len(jsonl_results(client, job_id)) == later["done"]
    assert client.delete(f"/v1/jobs/{job_id}").json()["state"] == "cancelled"  # idempotent


def test_unknown_job_and_unsupported_body(client):
    assert client.get("/v1/jobs/does-not-exist").status_code == 404
    assert client.get("/v1/jobs/does-not-exist/results").json()["error"]["code"] == "not_found"
    response = client.post("/v1/jobs", content=b"hello", headers={"content-type": "text/html"})
    assert response.status_code == 415
    empty = client.post("/v1/jobs", content=b"\n", headers={"content-type": "application/x-ndjson"})
    assert empty.status_code == 400
