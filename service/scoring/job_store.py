"""The durable record of scoring jobs: one SQLite file in VITSERVE_DATA_DIR (WAL mode).

Two tables. ``jobs`` holds one row per job with its state and counters; ``items`` holds one
row per input image, created with the job (so the total is fixed at submission) and written
once with its result or error. The write is ``UPDATE ... WHERE status = 'pending'`` in the same
transaction as the counter update: an image scored twice (in flight when the process died,
scored again after the restart) changes nothing the second time, so results hold every image
exactly once and the counters always equal the rows.

WAL with synchronous=NORMAL survives a killed process (SIGKILL) with every committed
transaction; a power cut may lose the last few, which are then simply scored again.
A full disk makes a write raise ``StorageFull`` (507): the transaction is rolled back whole, the
file stays intact, and the same write succeeds once there is space again.
Methods are blocking and thread-safe (one connection behind a lock); async code calls them
through ``asyncio.to_thread``.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from service.core.errors import StorageFull, is_storage_full

QUEUED, RUNNING, DONE, CANCELLED, FAILED = "queued", "running", "done", "cancelled", "failed"
FINISHED_STATES = frozenset({DONE, CANCELLED, FAILED})
PENDING, SCORED, ERROR = "pending", "scored", "error"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id          TEXT PRIMARY KEY,
    state       TEXT NOT NULL,
    kind        TEXT NOT NULL,               -- zip, tar, manifest
    top_k       INTEGER NOT NULL,
    model       TEXT NOT NULL,
    total       INTEGER NOT NULL,
    scored      INTEGER NOT NULL DEFAULT 0,  -- items with predictions
    failed      INTEGER NOT NULL DEFAULT 0,  -- items listed with an error
    created_at  REAL NOT NULL,
    started_at  REAL,
    finished_at REAL,
    error       TEXT,
    model_version INTEGER                    -- the version it is scored with (NULL: the model's current one)
);
CREATE TABLE IF NOT EXISTS items (
    job_id  TEXT NOT NULL,
    seq     INTEGER NOT NULL,                -- submission order; results are listed in it
    path    TEXT NOT NULL,                   -- the name the client gave (archive member, manifest path)
    file    TEXT NOT NULL,                   -- where the bytes are on this host
    status  TEXT NOT NULL DEFAULT 'pending',
    result  TEXT,                            -- the JSON result row, written once
    PRIMARY KEY (job_id, seq)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS items_by_status ON items (job_id, status, seq);
"""


@dataclass(frozen=True)
class JobRecord:
    id: str
    state: str
    kind: str
    top_k: int
    model: str
    total: int
    scored: int
    failed: int
    created_at: float
    started_at: float | None
    finished_at: float | None
    error: str | None
    model_version: int | None = None

    @property
    def processed(self) -> int:
        return self.scored + self.failed

    @property
    def finished(self) -> bool:
        return self.state in FINISHED_STATES


@dataclass(frozen=True)
class PendingItem:
    seq: int
    path: str
    file: str


_JOB_COLUMNS = (
    "id, state, kind, top_k, model, total, scored, failed, created_at, started_at, finished_at, error, model_version"
)


class JobStore:
    """SQLite-backed jobs and items.

    Args:
        path: the database file (its directory is created).
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=30)
        try:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(_SCHEMA)
            columns = {row[1] for row in self._db.execute("PRAGMA table_info(jobs)")}
            if "model_version" not in columns:  # a database made before models had versions
                self._db.execute("ALTER TABLE jobs ADD COLUMN model_version INTEGER")
        except sqlite3.Error as exc:
            self._db.close()
            if is_storage_full(exc):
                raise StorageFull(f"cannot create the jobs database {self.path.name}: the disk is full") from None
            raise

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextmanager
    def _transaction(self) -> Iterator[None]:
        """One write transaction under the lock; a full disk is StorageFull, and the database is left as it was.

        SQLite may already have rolled back on its own (SQLITE_FULL does): a second ROLLBACK would
        raise "no transaction is active" and hide the real error, so it is only sent when one is open.
        """
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
                yield
                self._db.execute("COMMIT")
            except BaseException as exc:
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                if is_storage_full(exc):
                    raise StorageFull(
                        f"storage full: the jobs database could not be written ({exc}); "
                        "nothing was lost, retry once there is space",
                        retry_after_s=30,
                    ) from None
                raise

    # -- jobs --------------------------------------------------------------------------------
    def create_job(
        self,
        job_id: str,
        *,
        kind: str,
        top_k: int,
        model: str,
        items: Sequence[tuple[str, str]],
        model_version: int | None = None,
    ) -> JobRecord:
        """Insert a queued job and its items ((path, file) in scoring order) in one transaction."""
        with self._transaction():
            self._db.execute(
                "INSERT INTO jobs (id, state, kind, top_k, model, model_version, total, created_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (job_id, QUEUED, kind, top_k, model, model_version, len(items), time.time()),
            )
            self._db.executemany(
                "INSERT INTO items (job_id, seq, path, file) VALUES (?, ?, ?, ?)",
                ((job_id, seq, path, file) for seq, (path, file) in enumerate(items)),
            )
        record = self.get_job(job_id)
        assert record is not None
        return record

    def get_job(self, job_id: str) -> JobRecord | None:
        with self._lock:
            row = self._db.execute(f"SELECT {_JOB_COLUMNS} FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return JobRecord(*row) if row else None

    def unfinished_jobs(self) -> list[JobRecord]:
        """Queued and running jobs, oldest first: what the runner works through (also after a restart)."""
        with self._lock:
            rows = self._db.execute(
                f"SELECT {_JOB_COLUMNS} FROM jobs WHERE state IN (?, ?) ORDER BY created_at, id", (QUEUED, RUNNING)
            ).fetchall()
        return [JobRecord(*row) for row in rows]

    def counts(self) -> dict[str, dict[str, int]]:
        """{"jobs": {state: n}, "images": {"scored", "failed", "pending": n}} over every job held."""
        with self._lock:
            rows = self._db.execute(
                "SELECT state, COUNT(*), SUM(scored), SUM(failed), SUM(total) FROM jobs GROUP BY state"
            ).fetchall()
        jobs = {state: n for state, n, _, _, _ in rows}
        images = {
            "scored": sum(s for _, _, s, _, _ in rows),
            "failed": sum(f for _, _, _, f, _ in rows),
            # Only unfinished jobs still have images to score: a cancelled job's rest never will be.
            "pending": sum(t - s - f for state, _, s, f, t in rows if state not in FINISHED_STATES),
        }
        return {"jobs": jobs, "images": images}

    def mark_running(self, job_id: str) -> None:
        with self._transaction():
            self._db.execute(
                "UPDATE jobs SET state = ?, started_at = COALESCE(started_at, ?) WHERE id = ? AND state IN (?, ?)",
                (RUNNING, time.time(), job_id, QUEUED, RUNNING),
            )

    def finish(self, job_id: str, state: str = DONE, error: str | None = None) -> bool:
        """Move an unfinished job to a final state; False when it had already finished (e.g. cancelled)."""
        assert state in FINISHED_STATES
        with self._transaction():
            cursor = self._db.execute(
                "UPDATE jobs SET state = ?, finished_at = ?, error = ? WHERE id = ? AND state IN (?, ?)",
                (state, time.time(), error, job_id, QUEUED, RUNNING),
            )
        return cursor.rowcount == 1

    # -- items -------------------------------------------------------------------------------
    def pending_items(self, job_id: str, after_seq: int, limit: int) -> list[PendingItem]:
        with self._lock:
            rows = self._db.execute(
                "SELECT seq, path, file FROM items WHERE job_id = ? AND status = ? AND seq > ? ORDER BY seq LIMIT ?",
                (job_id, PENDING, after_seq, limit),
            ).fetchall()
        return [PendingItem(*row) for row in rows]

    def record_results(self, job_id: str, results: Iterable[tuple[int, dict]]) -> int:
        """Write (seq, row) results, each only if that item is still pending; returns how many were new.

        A row with an "error" key counts as failed, any other as scored.
        """
        scored = failed = 0
        with self._transaction():
            for seq, row in results:
                status = ERROR if "error" in row else SCORED
                cursor = self._db.execute(
                    "UPDATE items SET status = ?, result = ? WHERE job_id = ? AND seq = ? AND status = ?",
                    (status, json.dumps(row, ensure_ascii=False), job_id, seq, PENDING),
                )
                if cursor.rowcount == 1:
                    if status == ERROR:
                        failed += 1
                    else:
                        scored += 1
            if scored or failed:
                self._db.execute(
                    "UPDATE jobs SET scored = scored + ?, failed = failed + ? WHERE id = ?",
                    (scored, failed, job_id),
                )
        return scored + failed

    def results(self, job_id: str, after_seq: int, limit: int) -> list[tuple[int, str]]:
        """(seq, JSON result row) of finished items after ``after_seq``, in submission order."""
        with self._lock:
            return self._db.execute(
                "SELECT seq, result FROM items WHERE job_id = ? AND seq > ? AND status != ? ORDER BY seq LIMIT ?",
                (job_id, after_seq, PENDING, limit),
            ).fetchall()
