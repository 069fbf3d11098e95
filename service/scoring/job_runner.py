"""The background task that scores jobs: store -> decode threads -> batcher's low lane -> store.

One asyncio task per service works through unfinished jobs oldest first (after a restart too:
the store says which items are still pending). For each job it keeps at most
``job_max_in_flight`` images decoding or queued, decodes in its own small thread pool (so job
decoding never queues in front of online requests in the online pre-processing pool), submits
pixels with ``batcher.submit_low`` (the engine serves jobs only while online traffic is quiet),
and writes results to the store in small transactions. Result writes are idempotent, so an
image in flight when the process dies is scored again after the restart and recorded once.
A full disk pauses the job (StorageFull): nothing is marked failed, the unrecorded images stay
pending, and the job resumes by itself once writes succeed again.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractAsyncContextManager, AbstractContextManager, AsyncExitStack, nullcontext
from functools import partial
from pathlib import Path
from typing import Protocol

import numpy as np

from service.core.errors import InferenceFailed, NotFound, NotReady, Overloaded, ServiceError, StorageFull
from service.core.metadata import ModelMetadata
from service.core.settings import Settings
from service.runtime.batch_queue import BatchQueue
from service.runtime.decode_limits import PixelGate
from service.runtime.preprocess import load_pixels
from service.scoring.job_store import DONE, FAILED, JobRecord, JobStore, PendingItem
from service.scoring.rows import error_row, prediction_row
from service.scoring.sources import Forbidden, read_limited, read_under_root

log = logging.getLogger("vitserve.jobs")

DB_NAME = "jobs.sqlite3"
_PAGE = 512  # pending items fetched from the store at a time
_FLUSH_ITEMS = 64  # results per store transaction...
_FLUSH_S = 0.25  # ...or at least this often
STORAGE_RETRY_S = 2.0  # a job paused by a full disk tries again this often


def job_dir(settings: Settings, job_id: str) -> Path:
    """Where a job's upload and extracted files live (removed once the job is finished)."""
    return settings.data_dir / "jobs" / job_id


def job_throughput(job: JobRecord, rate_start: tuple[float, int] | None) -> float | None:
    """Images per second of ``job``: since ``rate_start`` (monotonic, processed) while it runs, else
    over its whole run once finished; None before it started."""
    if rate_start is not None and not job.finished:
        started, processed = rate_start
        elapsed = time.monotonic() - started
        return (job.processed - processed) / elapsed if elapsed > 0 else 0.0
    if job.started_at is not None and job.finished_at is not None and job.finished_at > job.started_at:
        return job.processed / (job.finished_at - job.started_at)
    return None


class ScoringLane(Protocol):
    """One model version as a job sees it: its metadata and its batcher's low-priority lane."""

    @property
    def metadata(self) -> ModelMetadata: ...

    @property
    def batcher(self) -> BatchQueue: ...


class LaneProvider(Protocol):
    """Where a job finds the model version it is scored with (service/serving/registry.py)."""

    def lease(self, name: str | None, version: int | None) -> AbstractAsyncContextManager[ScoringLane]: ...


class JobRunner:
    """Scores queued jobs through the low-priority lane of the model version each job names.

    Args:
        settings: the service settings (data_dir, job_root, job limits).
        lanes: the loaded model versions; a job holds its version until it ends.
        is_ready: True once the engine has warmed up; jobs wait for it.
        decode_threads: threads decoding job images.
        decode_gate: the process-wide PixelGate job decodes share with online ones, or None.
    """

    def __init__(
        self,
        settings: Settings,
        lanes: LaneProvider,
        *,
        is_ready: Callable[[], bool],
        decode_threads: int,
        decode_gate: PixelGate | None = None,
    ) -> None:
        self.settings = settings
        self.lanes = lanes
        self.is_ready = is_ready
        self.decode_gate = decode_gate
        self.max_in_flight = settings.job_max_in_flight or 2 * settings.max_batch_size
        self._decode_pool = ThreadPoolExecutor(max_workers=decode_threads, thread_name_prefix="vitserve-job-decode")
        self._store: JobStore | None = None
        self._task: asyncio.Task | None = None
        self._wake = asyncio.Event()
        self._cancelled: set[str] = set()
        self._rate_start: dict[str, tuple[float, int]] = {}  # job id -> (monotonic, processed) when this run began
        self.paused: dict[str, str] = {}  # job id -> why it waits (storage full), until it runs again

    # -- lifecycle ---------------------------------------------------------------------------
    @property
    def db_path(self) -> Path:
        return self.settings.data_dir / DB_NAME

    @property
    def store(self) -> JobStore:
        """The jobs database, created on first use (a service that never runs a job writes nothing)."""
        if self._store is None:
            self._store = JobStore(self.db_path)
        return self._store

    async def start(self, *, remove_orphans: bool = True) -> None:
        """Resume unfinished jobs; with ``remove_orphans`` first remove the folders no job owns (only
        when the server starts: a multi-process server's restarted engine process would remove the
        folders of uploads its workers are receiving)."""
        if self.db_path.exists():
            await asyncio.to_thread(lambda: self.store)
            self._wake.set()  # unfinished jobs from before the restart
        if remove_orphans:
            await asyncio.to_thread(self.remove_orphan_folders)
        self._task = asyncio.create_task(self._main(), name="vitserve-jobs")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        # Not waiting: a decode already running finishes on its own; nothing reads its result.
        self._decode_pool.shutdown(wait=False, cancel_futures=True)
        if self._store is not None:
            self._store.close()
            self._store = None

    def remove_orphan_folders(self) -> int:
        """Remove the job folders that no unfinished job owns; returns how many.

        Run at start-up, before any upload is accepted: a folder left by an upload cut short by
        SIGKILL (or a crash before a finished job's clean-up) belongs to nothing and would stay
        for ever. One server per data dir is assumed (a second one starting would remove the
        first one's uploads in progress).
        """
        jobs = self.settings.data_dir / "jobs"
        if not jobs.is_dir():
            return 0
        keep = {job.id for job in self.store.unfinished_jobs()} if self.db_path.exists() else set()
        removed = 0
        for folder in jobs.iterdir():
            if folder.name in keep:
                continue
            if folder.is_dir() and not folder.is_symlink():
                shutil.rmtree(folder, ignore_errors=True)
            else:
                folder.unlink(missing_ok=True)
            removed += 1
        if removed:
            log.info("removed %d orphan job folder(s) from %s", removed, jobs)
        return removed

    def notify(self) -> None:
        """A job was submitted."""
        self._wake.set()

    def cancel(self, job_id: str) -> None:
        """Stop scoring ``job_id`` (the store already says cancelled); in-flight images are dropped."""
        # Always flagged: the job may be between its last state check and its first image right now.
        # The job loop stops, drops in-flight images and cleans up; a queued job is skipped when reached.
        self._cancelled.add(job_id)
        if job_id not in self._rate_start:
            shutil.rmtree(job_dir(self.settings, job_id), ignore_errors=True)  # not running: files go now

    def images_per_second(self, job: JobRecord) -> float | None:
        """Throughput of the job since this process started it (None before it started)."""
        return job_throughput(job, self._rate_start.get(job.id))

    @property
    def rate_starts(self) -> dict[str, tuple[float, int]]:
        """Running jobs: job id -> (time.monotonic(), images processed) when this process started it."""
        return dict(self._rate_start)

    # -- the loop ----------------------------------------------------------------------------
    async def _main(self) -> None:
        while not self.is_ready():
            await asyncio.sleep(0.05)
        while True:
            self._wake.clear()
            try:
                # The database may have been created by another process (a front-end worker) since.
                has_store = self._store is not None or self.db_path.exists()
                jobs = await asyncio.to_thread(self.store.unfinished_jobs) if has_store else []
            except Exception:  # noqa: BLE001 - e.g. a full disk: keep the service up, try again
                log.exception("cannot read the jobs database %s; retrying in 5 s", self.db_path)
                await asyncio.sleep(5)
                continue
            if not jobs:
                await self._wake.wait()
                continue
            for job in jobs:
                try:
                    await self._run_job(job)
                except asyncio.CancelledError:
                    raise
                except NotReady:
                    return  # shutting down: what is pending stays pending for the next start
                except StorageFull as exc:
                    # Nothing is lost (the failed transaction rolled back; its images stay pending):
                    # wait for space, then go through the unfinished jobs again.
                    self.paused[job.id] = exc.message
                    log.warning("job %s paused: %s; retrying in %.0f s", job.id, exc.message, STORAGE_RETRY_S)
                    await asyncio.sleep(STORAGE_RETRY_S)
                    break
                except Exception as exc:  # noqa: BLE001 - one broken job must not stop the others
                    log.exception("job %s failed", job.id)
                    await asyncio.to_thread(self.store.finish, job.id, FAILED, f"{type(exc).__name__}: {exc}")
                    self._cleanup(job.id)

    async def _run_job(self, job: JobRecord) -> None:
        store = self.store
        current = await asyncio.to_thread(store.get_job, job.id)
        if current is None or current.finished or job.id in self._cancelled:
            self._cleanup(job.id)  # cancelled while it waited behind another job
            return
        job = current
        async with AsyncExitStack() as stack:
            try:
                # The job holds its version until it ends, even if a newer one takes online traffic.
                lane = await stack.enter_async_context(self.lanes.lease(job.model, job.model_version))
            except (NotFound, NotReady) as exc:
                # Restarted without that model (version): finishing with another would mix two
                # models' answers in one job.
                version = f" version {job.model_version}" if job.model_version is not None else ""
                await asyncio.to_thread(
                    store.finish,
                    job.id,
                    FAILED,
                    f"the job was submitted to model {job.model!r}{version}; this server does not serve it "
                    f"now ({exc.message}; resubmit the job)",
                )
                self._cleanup(job.id)
                return
            await self._run_leased(job, lane)

    async def _run_leased(self, job: JobRecord, lane: ScoringLane) -> None:
        store = self.store
        await asyncio.to_thread(store.mark_running, job.id)  # a write: StorageFull here pauses the job
        self.paused.pop(job.id, None)
        self._rate_start[job.id] = (time.monotonic(), job.processed)
        log.info("job %s: scoring %d of %d images", job.id, job.total - job.processed, job.total)
        slots = asyncio.Semaphore(self.max_in_flight)
        buffer: list[tuple[int, dict]] = []
        tasks: set[asyncio.Task] = set()
        last_flush = time.monotonic()

        async def flush() -> None:
            nonlocal last_flush
            if buffer:
                batch = buffer[:]
                buffer.clear()
                await asyncio.to_thread(store.record_results, job.id, batch)
            last_flush = time.monotonic()

        stopping: list[NotReady] = []  # set when the batcher shuts down under us

        async def one(item: PendingItem) -> None:
            try:
                row = await self._score(job, lane, item)
            except NotReady as exc:
                stopping.append(exc)  # the image stays pending and is scored after the next start
                return
            except Exception as exc:  # noqa: BLE001 - list the image with the error rather than lose it
                log.exception("job %s: scoring %s failed", job.id, item.path)
                row = error_row(item.path, "internal_error", f"{type(exc).__name__}: {exc}")
            finally:
                slots.release()
            buffer.append((item.seq, row))

        def halted() -> bool:
            return job.id in self._cancelled or bool(stopping)

        try:
            # Passes over the pending items until none is left: one pass, unless an image was skipped.
            while not halted():
                after = -1
                while not halted():
                    page = await asyncio.to_thread(store.pending_items, job.id, after, _PAGE)
                    if not page:
                        break
                    for item in page:
                        await slots.acquire()
                        if halted():
                            slots.release()
                            break
                        task = asyncio.create_task(one(item))
                        tasks.add(task)
                        task.add_done_callback(tasks.discard)
                        if len(buffer) >= _FLUSH_ITEMS or time.monotonic() - last_flush >= _FLUSH_S:
                            await flush()
                    after = page[-1].seq
                if job.id in self._cancelled:
                    for task in tasks:
                        task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
                await flush()
                if not await asyncio.to_thread(store.pending_items, job.id, -1, 1):
                    break
            if stopping:
                raise stopping[0]
        except BaseException:
            for task in tasks:
                task.cancel()
            if buffer:
                try:
                    store.record_results(job.id, buffer)  # keep what was scored; a plain blocking write here
                except StorageFull:
                    pass  # those images stay pending and are scored again when the job resumes
            raise
        if job.id in self._cancelled:
            log.info("job %s cancelled", job.id)
        elif await asyncio.to_thread(store.finish, job.id, DONE):
            done = store.get_job(job.id)
            log.info(
                "job %s done: %d scored, %d failed", job.id, done.scored if done else -1, done.failed if done else -1
            )
        self._rate_start.pop(job.id, None)
        self._cleanup(job.id)

    async def _score(self, job: JobRecord, lane: ScoringLane, item: PendingItem) -> dict:
        """One image -> its result row (predictions, or the error that image has)."""
        loop = asyncio.get_running_loop()
        try:
            pixels = await loop.run_in_executor(
                self._decode_pool, partial(self._load, lane.metadata, job.kind, item.file)
            )
        except ServiceError as exc:
            return error_row(item.path, exc.code, exc.message)
        except OSError as exc:
            return error_row(item.path, "unreadable", f"cannot read {item.path}: {exc.strerror or exc}")
        while True:
            try:
                logits = await lane.batcher.submit_low(pixels)
                break
            except Overloaded:
                await asyncio.sleep(0.05)  # the low lane is bounded; wait for room
            except InferenceFailed as exc:
                return error_row(item.path, exc.code, exc.message)
        meta = lane.metadata
        return prediction_row(item.path, logits, meta.labels, min(job.top_k, meta.num_classes))

    def _load(self, metadata: ModelMetadata, kind: str, file: str) -> np.ndarray:
        settings = self.settings
        if kind == "manifest":
            if settings.job_root is None:
                raise Forbidden("manifest jobs are disabled (VITSERVE_JOB_ROOT is not set)")
            # Opened beneath the root, component by component: a symlink swapped in since the job was
            # submitted (or while this very file is opened) is refused, and only regular files are read.
            data = read_under_root(file, settings.job_root, settings.max_image_file_bytes)
        else:
            data = read_limited(Path(file), settings.max_image_file_bytes, follow_symlinks=False)
        return load_pixels(
            data,
            metadata.preprocessing,
            max_pixels=settings.max_image_pixels,
            formats=settings.decode_formats(),
            admit=self._admit,
        )

    def _admit(self, pixels: int) -> AbstractContextManager:
        return self.decode_gate.hold(pixels) if self.decode_gate is not None else nullcontext()

    def _cleanup(self, job_id: str) -> None:
        """Remove a finished job's upload and extracted files; its results live in the store."""
        self._cancelled.discard(job_id)
        shutil.rmtree(job_dir(self.settings, job_id), ignore_errors=True)
