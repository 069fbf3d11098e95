"""The job runner in-process (fake engine): resuming at start-up, refusing to mix models, cleaning up."""

from __future__ import annotations

import io
import json
import time

from fastapi.testclient import TestClient
from PIL import Image

from service.core.settings import Settings
from service.http.app import create_app
from service.scoring.job_store import JobStore


def png(color: tuple[int, int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (40, 30), color).save(buf, "PNG")
    return buf.getvalue()


def wait_state(client: TestClient, job_id: str, states=("done", "failed", "cancelled")) -> dict:
    deadline = time.monotonic() + 20
    while (job := client.get(f"/v1/jobs/{job_id}").json())["state"] not in states:
        assert time.monotonic() < deadline, job
        time.sleep(0.02)
    return job


def test_unfinished_jobs_resume_at_start_up_and_another_models_jobs_fail(make_fake_engine, tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    for i in range(3):
        (root / f"{i}.png").write_bytes(png((i * 80, 10, 200)))
    data_dir = tmp_path / "data"
    store = JobStore(data_dir / "jobs.sqlite3")  # left behind by an earlier run of the service
    items = [(f"{i}.png", str(root / f"{i}.png")) for i in range(3)]
    store.create_job("same-model", kind="manifest", top_k=2, model="fake_vit", items=items)
    store.record_results("same-model", [(0, {"path": "0.png", "labels": ["x"], "scores": [1.0]})])
    store.mark_running("same-model")
    store.create_job("other-model", kind="manifest", top_k=2, model="vit_other", items=items)
    store.close()

    engine = make_fake_engine(image_size=32)
    settings = Settings(data_dir=data_dir, job_root=root)
    with TestClient(create_app(settings, engine=engine)) as client:
        resumed = wait_state(client, "same-model")
        assert (resumed["state"], resumed["done"], resumed["scored"]) == ("done", 3, 3)
        rows = [line for line in client.get("/v1/jobs/same-model/results").text.splitlines()]
        assert len(rows) == 3 and '"labels": ["x"]' in rows[0]  # the result from before the restart is kept
        assert sum(engine.batch_sizes) == 2  # only the two pending images were scored
        other = wait_state(client, "other-model")
        assert other["state"] == "failed" and "vit_other" in other["error"] and other["done"] == 0


def test_a_queued_job_can_be_cancelled_and_its_files_are_removed(make_fake_engine, tmp_path):
    import zipfile

    engine = make_fake_engine(image_size=32, delay_s=0.05)
    settings = Settings(data_dir=tmp_path / "data", job_decode_threads=1)
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as z:
        for i in range(40):
            z.writestr(f"{i:02d}.png", png((i, i, i)))
    with TestClient(create_app(settings, engine=engine)) as client:
        first = client.post("/v1/jobs", content=archive.getvalue(), headers={"content-type": "application/zip"}).json()
        second = client.post("/v1/jobs", content=archive.getvalue(), headers={"content-type": "application/zip"}).json()
        assert client.delete(f"/v1/jobs/{second['id']}").json()["state"] == "cancelled"
        assert not (tmp_path / "data" / "jobs" / second["id"]).exists()  # queued: cleaned up at once
        done = wait_state(client, first["id"])
        assert (done["state"], done["done"]) == ("done", 40)
        assert not (tmp_path / "data" / "jobs" / first["id"]).exists()  # results live in the database
        assert client.get(f"/v1/jobs/{second['id']}").json()["done"] == 0
        assert client.get(f"/v1/jobs/{second['id']}/results").text == ""


def test_a_failing_engine_batch_lists_its_images_with_the_error_and_the_job_finishes(make_fake_engine, tmp_path):
    import zipfile

    # Batches holding the black image fail; its batch-mates fail with it, the other batches do not.
    engine = make_fake_engine(image_size=32, fail_when=lambda batch: bool((batch.max(axis=(1, 2, 3)) < -1.5).any()))
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as z:
        for i in range(12):
            z.writestr(f"{i:02d}.png", png((0, 0, 0) if i == 5 else (200, 180, 160)))
    settings = Settings(data_dir=tmp_path / "data", max_batch_size=4, job_max_in_flight=4, job_decode_threads=1)
    with TestClient(create_app(settings, engine=engine)) as client:
        job_id = client.post(
            "/v1/jobs", content=archive.getvalue(), headers={"content-type": "application/zip"}
        ).json()["id"]
        job = wait_state(client, job_id)
        rows = [json.loads(line) for line in client.get(f"/v1/jobs/{job_id}/results").text.splitlines()]
    assert (job["state"], job["done"], job["total"]) == ("done", 12, 12)
    failed = [r for r in rows if "error" in r]
    assert "05.png" in {r["path"] for r in failed} and all(r["error"]["code"] == "inference_failed" for r in failed)
    assert job["failed"] == len(failed) < 12
