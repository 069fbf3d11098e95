"""Start and stop the service's parts: models, pre-processing pool, job runner, warm-up, repository polling.

``start`` fills a ``ServiceState`` and schedules the loading of its models (each version warmed up
in service/serving/registry.py); the front end listens at once and answers not-ready until the
default model is up. ``stop`` drains: jobs stop feeding, every version's batcher finishes what it
accepted (bounded by the shutdown grace), the pools are freed.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial

from service.core.host import cpu_cores
from service.core.repository import ModelEntry, ModelVersionSource, scan_repository, single_file_repository
from service.core.settings import Settings
from service.runtime.decode_limits import PixelGate
from service.runtime.engine import Engine
from service.runtime.engine_protocol import InferenceEngine
from service.scoring.job_runner import JobRunner
from service.serving.cache import ResponseCache
from service.serving.registry import GPU_DEFAULT_MAX_BATCH_SIZE, ModelRegistry, poll_repository
from service.serving.state import ServiceState

__all__ = ["GPU_DEFAULT_MAX_BATCH_SIZE", "build_engine", "start", "stop", "wait_for_idle"]

log = logging.getLogger("vitserve.app")


def build_engine(settings: Settings) -> Engine:
    """The ONNX Runtime engine for ``settings.model``; raises EngineError naming what is wrong."""
    settings.check_model_file()
    return Engine(
        settings.model,
        spec_options=settings.spec_options(),
        providers=settings.providers or None,
        intra_op_threads=settings.intra_op_threads,
        allow_spinning=settings.ort_allow_spinning,
        gpu_options=settings.gpu_options(),
    )


def build_version_engine(settings: Settings, source: ModelVersionSource) -> Engine:
    """The engine of one repository version: described by its own metadata and sidecar, not by flags."""
    return Engine(
        source.path,
        providers=settings.providers or None,
        intra_op_threads=settings.intra_op_threads,
        allow_spinning=settings.ort_allow_spinning,
        gpu_options=settings.gpu_options(),
    )


def repository_scanner(settings: Settings) -> Callable[[], dict[str, ModelEntry]] | None:
    """Re-reads the repository (None when the service serves one --model file)."""
    if settings.model_repository is None:
        return None
    return partial(scan_repository, settings.model_repository)


async def start(state: ServiceState, engine: InferenceEngine | None = None, *, server_start: bool = True) -> None:
    """Build every part into ``state`` (``engine`` injected, or built from the settings) and
    schedule the loading of the models; ``state.ready`` turns true when the default one is up.
    ``server_start``: the server is starting (not an engine process restarting under running
    workers), so job folders no job owns are orphans and are removed."""
    settings = state.settings
    scan = repository_scanner(settings)
    if scan is not None:
        repository = await asyncio.to_thread(scan)  # a repository that cannot be read stops start-up
        factory: Callable[[ModelVersionSource], InferenceEngine] = partial(build_version_engine, settings)
    else:
        single = engine if engine is not None else await asyncio.to_thread(build_engine, settings)
        repository = single_file_repository(settings.model, settings.model_name or single.metadata.served_name)

        def factory(source: ModelVersionSource) -> InferenceEngine:
            return single

    state._models = ModelRegistry(settings, state.metrics, factory, default_model=settings.default_model)
    state.cache = ResponseCache(settings.cache_entries, on_event=lambda e: state.metrics.cache_events.labels(e).inc())
    state.preprocess_threads = settings.preprocess_threads or cpu_cores()
    state._preprocess_pool = ThreadPoolExecutor(
        max_workers=state.preprocess_threads, thread_name_prefix="vitserve-preprocess"
    )
    state._pixel_gate = PixelGate(settings.decoding_pixel_capacity())
    # Scoring jobs: the runner resumes unfinished ones once the models are up.
    state._jobs = jobs = JobRunner(
        settings,
        state.models,
        is_ready=lambda: state.ready,
        decode_threads=settings.job_decode_threads or max(1, cpu_cores() // 2),
        decode_gate=state.pixel_gate,
    )
    await jobs.start(remove_orphans=server_start)
    state.metrics.watch_queue(lambda: sum(lane.batcher.queue_depth for lane in state.models.lanes.values()))
    state.metrics.watch_jobs(lambda: state.jobs.store.counts())
    state.warmup_task = asyncio.create_task(bring_up(state, repository), name="vitserve-warmup")
    if scan is not None and settings.repository_poll_s > 0:
        state.poll_task = asyncio.create_task(
            poll_repository(state.models, scan, settings.repository_poll_s), name="vitserve-repository-poll"
        )


async def bring_up(state: ServiceState, repository: dict[str, ModelEntry]) -> None:
    """Load the models a server starts with; ready once the default model has a version up."""
    started = time.perf_counter()
    await state.models.apply(repository, golden=False)
    try:
        lane = state.default_lane()
    except Exception as exc:  # noqa: BLE001 - any failure leaves the service not-ready, logged
        log.error("no default model is up (%s); the service stays not-ready", exc)
        return
    state.ready = True
    state.metrics.ready.set(1)
    log.info(
        "ready in %.2f s: %s (default %s version %d)",
        time.perf_counter() - started,
        ", ".join(f"{name} v{version}" for name, version in sorted(state.models.current.items())),
        lane.name,
        lane.version,
    )


async def stop(state: ServiceState) -> None:
    """Drain and free everything ``start`` built (safe to call once, after ``start``)."""
    state.draining = True
    state.ready = False
    state.metrics.ready.set(0)
    for task in (state.warmup_task, state.poll_task):
        if task is not None:
            task.cancel()
    # Each step gets what is left of the one drain deadline (state.drain_deadline), never a grace of its own.
    try:
        await asyncio.wait_for(state.jobs.stop(), timeout=state.drain_time_left())
    except TimeoutError:  # jobs are durable: stop feeding, unscored images stay pending
        log.warning("the job runner did not stop before the drain deadline")
    await state.models.close(deadline=time.monotonic() + state.drain_time_left())
    state.preprocess_pool.shutdown(wait=False, cancel_futures=True)
    log.info("shut down cleanly")


async def wait_for_idle(state: ServiceState, timeout_s: float) -> bool:
    """Wait until no guarded request is in flight (used by the SIGTERM drain); False on timeout."""
    deadline = time.monotonic() + timeout_s
    while state.in_flight_requests > 0:
        if time.monotonic() >= deadline:
            return False
        await asyncio.sleep(0.02)
    return True
