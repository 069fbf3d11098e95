"""Start and stop the service's parts: engine, pre-processing pool, batcher, job runner, warm-up.

``start`` fills a ``ServiceState`` and schedules the warm-up (the front end listens at once and
answers not-ready until it is done); ``stop`` drains: jobs stop feeding, the batcher finishes what
it accepted (bounded by the shutdown grace), the pools are freed.
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor

from service.core.host import cpu_cores
from service.core.settings import Settings
from service.runtime.batcher import Batcher
from service.runtime.engine import Engine
from service.runtime.engine_protocol import InferenceEngine, ModelFacts
from service.scoring.job_runner import JobRunner
from service.serving.state import ServiceState

log = logging.getLogger("vitserve.app")

# max_batch_size when the session runs on a GPU and the setting was left at its (CPU) default.
GPU_DEFAULT_MAX_BATCH_SIZE = 32


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


def fit_settings_to_engine(settings: Settings, engine: ModelFacts) -> Settings:
    """``settings`` with the batch size adjusted to the engine (GPU default, a fixed batch axis)."""
    if engine.on_gpu and "max_batch_size" not in settings.model_fields_set:
        # The default of 8 suits a CPU (compute-bound: bigger batches only add latency); a GPU
        # needs bigger batches to fill it. An explicit setting always wins.
        log.info(
            "GPU provider: max_batch_size %d (default for GPU hosts; set VITSERVE_MAX_BATCH_SIZE to change)",
            GPU_DEFAULT_MAX_BATCH_SIZE,
        )
        settings = settings.model_copy(update={"max_batch_size": GPU_DEFAULT_MAX_BATCH_SIZE})
    fixed_batch = engine.max_batch_size  # a graph with a fixed batch axis
    if fixed_batch is not None and fixed_batch < settings.max_batch_size:
        log.warning(
            "the model takes at most %d image(s) per run: max_batch_size %d -> %d",
            fixed_batch,
            settings.max_batch_size,
            fixed_batch,
        )
        settings = settings.model_copy(update={"max_batch_size": fixed_batch})
    return settings


async def start(state: ServiceState, engine: InferenceEngine | None = None) -> None:
    """Build every part into ``state`` (``engine`` injected, or built from the settings) and
    schedule the warm-up; ``state.ready`` turns true when it is done."""
    if engine is None:
        engine = await asyncio.to_thread(build_engine, state.settings)
    state._engine = engine
    state.settings = settings = fit_settings_to_engine(state.settings, engine)
    state._preprocess_pool = ThreadPoolExecutor(
        max_workers=settings.preprocess_threads or cpu_cores(), thread_name_prefix="vitserve-preprocess"
    )
    batcher = state._batcher = Batcher(
        engine,
        max_batch_size=settings.max_batch_size,
        max_queue_delay_ms=settings.max_queue_delay_ms,
        max_queue_size=settings.max_queue_size,
        on_batch=state.metrics.observe_batch,
        low_priority_idle_ms=settings.low_priority_idle_ms,
        low_priority_batch_size=settings.job_batch_size or max(1, settings.max_batch_size // 4),
    )
    await batcher.start()
    # Scoring jobs: the runner resumes unfinished ones once the engine is warm.
    state._jobs = JobRunner(
        settings,
        state.batcher,
        state.metadata,
        is_ready=lambda: state.ready,
        decode_threads=settings.job_decode_threads or max(1, cpu_cores() // 2),
    )
    await state.jobs.start()
    state.metrics.watch_queue(lambda: batcher.queue_depth)
    state.warmup_task = asyncio.create_task(warm_up(state, engine), name="vitserve-warmup")


async def stop(state: ServiceState) -> None:
    """Drain and free everything ``start`` built (safe to call once, after ``start``)."""
    state.draining = True
    state.ready = False
    state.metrics.ready.set(0)
    if state.warmup_task is not None:
        state.warmup_task.cancel()
    await state.jobs.stop()  # jobs are durable: stop feeding, unscored images stay pending
    grace_s = state.settings.shutdown_grace_s
    try:
        await asyncio.wait_for(state.batcher.stop(drain=True), timeout=grace_s)
    except TimeoutError:
        log.warning("drain took over %.0f s; failing what is left", grace_s)
        await state.batcher.stop(drain=False)
    state.preprocess_pool.shutdown(wait=False, cancel_futures=True)
    log.info("shut down cleanly")


async def warm_up(state: ServiceState, engine: InferenceEngine) -> None:
    """Run the engine once at each warm-up batch size, then mark the service ready."""
    sizes = state.settings.warmup_sizes()
    try:
        started = time.perf_counter()
        timings = await asyncio.to_thread(engine.warmup, sizes)
        if timings:
            log.info(
                "warm-up done in %.2f s (%s)",
                time.perf_counter() - started,
                ", ".join(f"batch {n}: {t * 1000:.1f} ms" for n, t in sorted(timings.items())),
            )
    except Exception:
        log.exception("warm-up failed; the service stays not-ready")
        return
    state.ready = True
    state.metrics.ready.set(1)
    log.info("ready: %s", state.metadata.architecture)


async def wait_for_idle(state: ServiceState, timeout_s: float) -> bool:
    """Wait until no guarded request is in flight (used by the SIGTERM drain); False on timeout."""
    deadline = time.monotonic() + timeout_s
    while state.in_flight_requests > 0:
        if time.monotonic() >= deadline:
            return False
        await asyncio.sleep(0.02)
    return True
