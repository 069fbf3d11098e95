"""A front-end worker's service state: everything a route needs, with the engine in another process.

``start_worker`` fills a ``ServiceState`` like ``lifecycle.start`` does, but with the engine
process's stand-ins (service/serving/engine_client.py): a ``RemoteRegistry`` whose lanes' batchers
forward to the engine process, and ``RemoteJobs`` as the job runner. The worker
keeps its own pre-processing pool: decoding happens here, in parallel across workers.

Readiness (``state.ready``): connected to the engine, the engine warm, every worker of the server
up, and the server not draining.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from service.core.host import cpu_cores
from service.runtime.decode_limits import PixelGate
from service.serving.cache import ResponseCache
from service.serving.control_block import ControlBlock
from service.serving.engine_client import EngineClient, RemoteJobs, RemoteRegistry
from service.serving.state import ServiceState

log = logging.getLogger("vitserve.worker")

_READINESS_EVERY_S = 0.05
# The supervisor starts workers once the engine listens, so this only covers a restarting engine.
_CONNECT_TIMEOUT_S = 600.0


@dataclass(frozen=True)
class WorkerContext:
    """What the supervisor hands each front-end worker."""

    index: int
    workers: int
    control: ControlBlock
    socket_path: Path
    metrics_dir: Path
    listener: socket.socket


def preprocess_threads(requested: int, workers: int) -> int:
    """Decode threads per worker: the setting, else the cores shared out (at least 2, so decoding
    overlaps the worker's own HTTP work: Pillow releases the GIL while it decodes and resizes)."""
    return requested or max(2, cpu_cores() // workers)


async def start_worker(state: ServiceState, context: WorkerContext) -> EngineClient:
    """Connect to the engine process and build the worker's parts into ``state``."""
    client = EngineClient(context.socket_path, context.index, context.control)
    await client.connect(timeout_s=_CONNECT_TIMEOUT_S)
    registry = RemoteRegistry(state.settings, state.metrics, client)
    registry.follow()
    state._models = registry
    state.cache = ResponseCache(
        state.settings.cache_entries, on_event=lambda e: state.metrics.cache_events.labels(e).inc()
    )
    state.preprocess_threads = preprocess_threads(state.settings.preprocess_threads, context.workers)
    state._preprocess_pool = ThreadPoolExecutor(
        max_workers=state.preprocess_threads, thread_name_prefix="vitserve-preprocess"
    )
    state._pixel_gate = PixelGate(state.settings.decoding_pixel_capacity())
    state._jobs = RemoteJobs(state.settings.data_dir, client)

    def refresh() -> None:
        registry.follow()
        control = context.control
        ready = client.connected and control.engine_ready and control.all_workers_up() and not control.draining
        state.ready = ready
        state.metrics.ready.set(int(ready))

    client.on_change = refresh
    context.control.set_worker_up(context.index, True)
    refresh()

    async def watch() -> None:
        while True:
            refresh()
            await asyncio.sleep(_READINESS_EVERY_S)

    state.warmup_task = asyncio.create_task(watch(), name="vitserve-readiness")
    return client


async def stop_worker(state: ServiceState, context: WorkerContext, client: EngineClient) -> None:
    """Drain what this worker sent to the engine (within what is left of the drain deadline), then free its parts."""
    state.draining = True
    if state.warmup_task is not None:
        state.warmup_task.cancel()
    state.ready = False
    state.metrics.ready.set(0)
    context.control.set_worker_up(context.index, False)
    left_s = state.drain_time_left()
    try:
        await asyncio.wait_for(client.stop(drain=True), timeout=left_s)
    except TimeoutError:
        log.warning("worker %d: the engine did not answer within %.1f s; failing what is left", context.index, left_s)
        await client.stop(drain=False)
    await state.jobs.stop()
    state.preprocess_pool.shutdown(wait=False, cancel_futures=True)
