"""The jobs database: results are written once per image, counters equal rows, state survives reopening."""

from __future__ import annotations

import sqlite3
import threading

from service.scoring.job_store import CANCELLED, DONE, QUEUED, RUNNING, JobStore


def items(n: int) -> list[tuple[str, str]]:
    return [(f"img{i:03d}.jpg", f"/data/img{i:03d}.jpg") for i in range(n)]


def ok(path: str) -> dict:
    return {"path": path, "labels": ["cat"], "scores": [0.9]}


def bad(path: str) -> dict:
    return {"path": path, "error": {"code": "invalid_image", "message": "not an image"}}


def test_results_are_written_once_even_when_an_image_is_scored_twice(tmp_path):
    store = JobStore(tmp_path / "jobs.sqlite3")
    job = store.create_job("j1", kind="zip", top_k=1, model="m", items=items(5))
    assert (job.state, job.total, job.processed) == (QUEUED, 5, 0)
    assert store.record_results("j1", [(0, ok("img000.jpg")), (1, bad("img001.jpg"))]) == 2
    # After a restart the in-flight images are scored again: the second write must change nothing.
    assert store.record_results("j1", [(0, ok("img000.jpg")), (1, ok("img001.jpg")), (2, ok("img002.jpg"))]) == 1
    job = store.get_job("j1")
    assert (job.scored, job.failed) == (2, 1)
    assert [item.seq for item in store.pending_items("j1", -1, 100)] == [3, 4]
    assert [item.seq for item in store.pending_items("j1", 3, 100)] == [4]
    results = store.results("j1", -1, 100)
    assert [seq for seq, _ in results] == [0, 1, 2]
    assert '"error"' in results[1][1]  # the first write (the error) is the one kept


def test_state_and_results_survive_reopening_and_concurrent_writers(tmp_path):
    path = tmp_path / "jobs.sqlite3"
    store = JobStore(path)
    store.create_job("j1", kind="manifest", top_k=1, model="m", items=items(200))
    store.mark_running("j1")

    def writer(seqs):
        for seq in seqs:
            store.record_results("j1", [(seq, ok(f"img{seq:03d}.jpg"))])

    # Two threads race over the same items (the overlap stands for double scoring).
    threads = [
        threading.Thread(target=writer, args=(range(0, 150),)),
        threading.Thread(target=writer, args=(range(50, 200),)),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    store.close()

    reopened = JobStore(path)
    job = reopened.get_job("j1")
    assert (job.state, job.scored, job.failed) == (RUNNING, 200, 0)
    assert [seq for seq, _ in reopened.results("j1", -1, 1000)] == list(range(200))
    assert sqlite3.connect(path).execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert reopened.finish("j1", DONE)
    assert not reopened.finish("j1", CANCELLED)  # a finished job stays finished
    assert reopened.get_job("j1").state == DONE
    assert reopened.unfinished_jobs() == []


def test_unfinished_jobs_are_listed_oldest_first_and_cancel_is_final(tmp_path):
    store = JobStore(tmp_path / "jobs.sqlite3")
    for job_id in ("a", "b", "c"):
        store.create_job(job_id, kind="zip", top_k=1, model="m", items=items(1))
    store.mark_running("a")
    assert store.finish("b", CANCELLED)
    store.mark_running("b")  # a late runner must not revive a cancelled job
    assert [j.id for j in store.unfinished_jobs()] == ["a", "c"]
    assert store.get_job("b").state == CANCELLED
    assert store.get_job("missing") is None
