"""The engine process of a multi-process server: the ONE batcher and engine session for the device.

It runs the same service lifecycle as a single process (service/serving/lifecycle.py: the model
registry with one engine and batcher per loaded version, the job runner) and, instead of HTTP, a
Unix socket that every front-end worker connects to (service/serving/engine_wire.py). Each worker
hands over its shared-memory ring; a SUBMIT names a slot of it and a model version, and goes into
that version's batcher as a view on that memory, so batches are formed from every worker's
traffic and the pixels are copied once, when the batch is stacked. The job runner lives here, so
it runs exactly once however many workers there are; the repository extension's load and unload
calls are forwarded here, and every change of the loaded versions is sent to the workers.

It writes readiness, queue depth and the last batch time into the control block for the workers,
and refreshes its Prometheus gauges (multiprocess mode) for their /metrics.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from service.core.errors import BadRequest, ClientClosedRequest, InferenceFailed, ServiceError
from service.core.settings import Settings
from service.runtime.batcher import Batcher
from service.runtime.engine_protocol import InferenceEngine
from service.runtime.metrics import Metrics
from service.scoring.job_runner import JobRunner
from service.serving import engine_wire as wire
from service.serving import lifecycle
from service.serving.control_block import ControlBlock
from service.serving.registry import ModelLane, ModelRegistry, VersionState
from service.serving.shm_ring import ShmRing
from service.serving.state import ServiceState

log = logging.getLogger("vitserve.engine_process")

_STATUS_EVERY_S = 0.25  # gauges, control-block figures and job rates are refreshed this often
_HANDSHAKE_TIMEOUT_S = 30.0
_LAST_DRAIN_S = 0.5  # the engine's own drain when the workers used up the deadline


@dataclass(frozen=True)
class EngineProcessContext:
    """What the supervisor hands the engine process."""

    control: ControlBlock
    socket_path: Path
    metrics_dir: Path
    generation: int


class _WorkerConnection:
    """One worker's socket: SUBMITs become batcher submissions, each answered once."""

    def __init__(self, server: EngineServer, worker: int, ring: ShmRing) -> None:
        self.server = server
        self.worker = worker
        self.ring = ring
        self.protocol = wire.FrameProtocol(self._on_frame, self._on_lost)
        self.images: dict[int, asyncio.Future[np.ndarray]] = {}  # request id -> its batcher future
        self._loop = asyncio.get_running_loop()

    def _on_frame(self, payload: memoryview) -> None:
        op = payload[0]
        if op == wire.SUBMIT:
            self._submit(wire.parse_submit(payload))
        elif op == wire.CANCEL:
            future = self.images.get(wire.parse_request_id(payload))
            if future is not None:
                future.cancel()  # the batcher skips it; _answer tells the worker
        elif op == wire.JOBS_NOTIFY:
            self.server.jobs.notify()
        elif op == wire.JOBS_CANCEL:
            self.server.jobs.cancel(bytes(payload[1:]).decode())
        elif op == wire.REPO:
            self._loop.create_task(self._repository(wire.parse_json(payload)))
        else:
            log.error("worker %d sent an unknown message %d; closing its connection", self.worker, op)
            self.protocol.close()

    def _submit(self, submit: wire.Submit) -> None:
        """Queue one image in its version's batcher and answer from the future's callback: no task
        per image (a task, its coroutine and a timeout cost more than the rest of the hop)."""
        timings: dict[str, float] = {}
        try:
            lane = self.server.lane_for(submit.model, submit.version)
            size = lane.metadata.preprocessing.image_size
            try:
                pixels = self.ring.view(submit.slot, (3, size, size))
            except ValueError as exc:
                raise InferenceFailed(f"worker {self.worker}'s image does not fit its ring: {exc}") from None
            batcher = lane.batcher
            assert isinstance(batcher, Batcher)  # the engine process's lanes hold the real batchers
            if submit.lane == wire.LOW_LANE:
                future = batcher.enqueue_low(pixels)
            else:
                future = batcher.enqueue(pixels, deadline=submit.deadline, timings=timings)
        except ServiceError as exc:
            self.protocol.send(wire.error(submit.request_id, exc))
            return
        except Exception as exc:  # noqa: BLE001 - answer every SUBMIT, whatever went wrong
            log.exception("image from worker %d failed", self.worker)
            self.protocol.send(wire.error(submit.request_id, InferenceFailed(f"{type(exc).__name__}: {exc}")))
            return
        lane.leases += 1  # the registry does not unload a version under an image it holds
        self.images[submit.request_id] = future
        future.add_done_callback(functools.partial(self._answer, submit.request_id, lane, timings))
        self.server.queue_changed()

    def _answer(
        self, request_id: int, lane: ModelLane, timings: dict[str, float], future: asyncio.Future[np.ndarray]
    ) -> None:
        lane.leases -= 1
        self.images.pop(request_id, None)
        if future.cancelled():  # the worker withdrew it (client gone) or went away
            reply = wire.error(request_id, ClientClosedRequest("withdrawn by the front end"))
        elif (exc := future.exception()) is not None:
            if not isinstance(exc, ServiceError):
                log.error("image from worker %d failed: %r", self.worker, exc)
                exc = InferenceFailed(f"{type(exc).__name__}: {exc}")
            reply = wire.error(request_id, exc)
        else:
            reply = wire.result(request_id, future.result(), timings)
        self.protocol.send(reply)
        self.server.queue_changed()

    async def _repository(self, body: dict) -> None:
        try:
            await self.server.repository_call(body)
            error = None
        except ServiceError as exc:
            error = wire.error_body(exc)
        except Exception as exc:  # noqa: BLE001 - the caller gets the reason, the engine keeps running
            log.exception("repository call %s failed", body)
            error = wire.error_body(InferenceFailed(f"{type(exc).__name__}: {exc}"))
        self.server.broadcast_models()
        self.protocol.send(wire.json_frame(wire.REPO_DONE, {"id": body.get("id"), "error": error}))

    def _on_lost(self, exc: Exception | None) -> None:
        self.server.connections.discard(self)
        images = list(self.images.values())
        for future in images:
            future.cancel()
        if not self.server.stopping and not self.server.control.draining:
            log.warning("worker %d disconnected (%s); its %d image(s) withdrawn", self.worker, exc, len(images))


class EngineServer:
    """The engine side of the workers' sockets.

    Args:
        state: the engine process's started service state (registry, job runner).
        registry: the state's model registry (one batcher per loaded version).
        jobs: the state's job runner.
        context: the supervisor's control block, socket path and generation.
    """

    def __init__(
        self, state: ServiceState, registry: ModelRegistry, jobs: JobRunner, context: EngineProcessContext
    ) -> None:
        self.state = state
        self.registry = registry
        self.jobs = jobs
        self.context = context
        self.control = context.control
        self.connections: set[_WorkerConnection] = set()
        self.stopping = False
        self._listener: socket.socket | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._last_rates: dict = {}  # the last job figures sent (nothing to send while both stay empty)
        self._last_models: wire.RegistrySnapshot | None = None
        self._depth_scheduled = False

    async def start(self) -> None:
        path = self.context.socket_path
        path.unlink(missing_ok=True)  # left by a killed predecessor
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(str(path))
        listener.listen(256)
        listener.setblocking(False)
        self._listener = listener
        self._last_models = self.snapshot()
        self._tasks = [
            asyncio.create_task(self._accept_forever(), name="vitserve-engine-accept"),
            asyncio.create_task(self._status_forever(), name="vitserve-engine-status"),
        ]

    # -- the registry, as workers see it -------------------------------------------------------------
    def lane_for(self, name: str, version: int) -> ModelLane:
        """The lane a worker resolved; if it was swapped out since, the model's current version."""
        lane = self.registry.lanes.get((name, version))
        if lane is None or lane.state not in (VersionState.READY, VersionState.UNLOADING) or not lane.batcher.accepting:
            lane = self.registry.resolve(name or None)
        return lane

    def snapshot(self) -> wire.RegistrySnapshot:
        registry = self.registry
        lanes = tuple(
            wire.LaneFacts(
                name=lane.name,
                version=lane.version,
                path=lane.path,
                state=lane.state.value,
                metadata=lane.metadata,
                describe=lane.engine.describe(),
                on_gpu=lane.engine.on_gpu,
                max_batch_size=lane.engine.max_batch_size,
                fitted_max_batch_size=lane.settings.max_batch_size,
            )
            for lane in registry.lanes.values()
        )
        return wire.RegistrySnapshot(
            lanes=lanes,
            current=dict(registry.current),
            failures=dict(registry.failures),
            known=dict(registry.known),
            default_model_setting=registry.default_model_setting,
        )

    def slot_capacity(self) -> int:
        """Elements per ring slot: the largest input of the loaded versions (224 x 224 at least)."""
        sides = [lane.metadata.preprocessing.image_size for lane in self.registry.lanes.values()]
        return 3 * max([224, *sides]) ** 2

    def broadcast_models(self) -> None:
        snapshot = self.snapshot()
        if snapshot == self._last_models:
            return
        self._last_models = snapshot
        message = wire.pickle_frame(wire.MODELS, snapshot)
        for connection in list(self.connections):
            connection.protocol.send(message)

    async def repository_call(self, body: dict) -> None:
        """A worker's repository extension call (load or unload), run on the registry here."""
        name = str(body.get("name", ""))
        if body.get("action") == "unload":
            await self.registry.unload(name, force=bool(body.get("force", False)))
            return
        scan = lifecycle.repository_scanner(self.state.settings)
        if scan is None:
            raise BadRequest("this server serves one model file (--model); start it with --model-repository DIR")
        await self.registry.load(name, await asyncio.to_thread(scan))

    # -- connections --------------------------------------------------------------------------------
    async def _accept_forever(self) -> None:
        loop = asyncio.get_running_loop()
        assert self._listener is not None
        while True:
            conn, _ = await loop.sock_accept(self._listener)
            asyncio.create_task(self._adopt(conn))

    async def _adopt(self, conn: socket.socket) -> None:
        try:
            conn.setblocking(True)
            conn.settimeout(_HANDSHAKE_TIMEOUT_S)
            hello = wire.EngineHello(
                snapshot=self.snapshot(),
                slot_capacity=self.slot_capacity(),
                max_queue_size=self.state.settings.max_queue_size,
                generation=self.context.generation,
            )
            worker, ring = await asyncio.to_thread(self._handshake, conn, hello)
            conn.setblocking(False)
            connection = _WorkerConnection(self, worker, ring)
            await asyncio.get_running_loop().connect_accepted_socket(lambda: connection.protocol, conn)
        except Exception:  # noqa: BLE001 - a worker that died mid-handshake must not stop the engine
            log.exception("a worker's handshake failed")
            conn.close()
            return
        self.connections.add(connection)
        if self._last_models != hello.snapshot:  # the versions changed during the handshake
            connection.protocol.send(wire.pickle_frame(wire.MODELS, self._last_models))
        log.info("worker %d connected (ring of %d slots)", worker, ring.slots)

    def _handshake(self, conn: socket.socket, hello: wire.EngineHello) -> tuple[int, ShmRing]:
        payload, _ = wire.recv_blocking(conn)
        if not payload or payload[0] != wire.HELLO:
            raise ConnectionError("expected HELLO")
        worker = int(json.loads(payload[1:])["worker"])
        wire.send_blocking(conn, wire.engine_hello_frame(hello))
        payload, fds = wire.recv_blocking(conn, max_fds=1)
        if not payload or payload[0] != wire.RING or len(fds) != 1:
            for fd in fds:
                os.close(fd)
            raise ConnectionError("expected RING with one file descriptor")
        spec = json.loads(payload[1:])
        ring = ShmRing(int(spec["slots"]), int(spec["capacity"]), fd=fds[0])
        ring.close()  # the mapping stays; the descriptor is no longer needed
        wire.send_blocking(conn, wire.frame(bytes([wire.RING_OK])))
        return worker, ring

    # -- figures for the workers and /metrics ---------------------------------------------------------
    def queue_changed(self) -> None:
        """An image was queued or answered: publish the depth once, at the end of this loop turn."""
        if not self._depth_scheduled:
            self._depth_scheduled = True
            asyncio.get_running_loop().call_soon(self.publish_queue_depth)

    def publish_queue_depth(self) -> None:
        self._depth_scheduled = False
        # One figure for every lane: the fullest queue (each lane's own bound still decides for good).
        self.control.queue_depth = max((lane.batcher.queue_depth for lane in self.registry.lanes.values()), default=0)

    async def _status_forever(self) -> None:
        while True:
            lanes = list(self.registry.lanes.values())
            self.publish_queue_depth()
            self.control.last_batch_s = max((lane.batcher.last_batch_s for lane in lanes), default=0.0)
            self.control.set_batching(
                self.state.settings.max_queue_size,
                max((lane.settings.max_batch_size for lane in lanes), default=self.state.settings.max_batch_size),
            )
            self.state.metrics.refresh()
            self.broadcast_models()
            rates: dict[str, dict[str, Any]] = {"job_rates": self.jobs.rate_starts, "paused": dict(self.jobs.paused)}
            if rates["job_rates"] or rates["paused"] or self._last_rates:
                message = wire.status(rates)
                for connection in list(self.connections):
                    connection.protocol.send(message)
                self._last_rates = rates["job_rates"] or rates["paused"]
            await asyncio.sleep(_STATUS_EVERY_S)

    async def stop(self) -> None:
        """Stop accepting workers (the ones connected keep being served until ``close``)."""
        self.stopping = True
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        self.context.socket_path.unlink(missing_ok=True)

    def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        for connection in list(self.connections):
            connection.protocol.close()


def run_engine_process(
    settings: Settings, make_engine: Callable[[], InferenceEngine], context: EngineProcessContext
) -> int:
    """The engine process's main: build the engine, serve the workers until SIGTERM, drain. Exit code."""
    from service.runtime.engine import EngineError

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the supervisor decides when the engine stops
    try:
        engine = make_engine()
    except (EngineError, FileNotFoundError) as exc:
        print(f"vitserve serve: {exc}", file=sys.stderr, flush=True)
        return 2
    with asyncio.Runner(loop_factory=_loop_factory()) as runner:
        return runner.run(_serve(settings, engine, context))


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop where installed (as the workers' uvicorn uses it): the engine process's event loop
    handles a few messages per image, and uvloop's are several times cheaper than asyncio's."""
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


async def _serve(settings: Settings, engine: InferenceEngine, context: EngineProcessContext) -> int:
    control = context.control
    state = ServiceState(settings, metrics=Metrics(multiprocess_dir=context.metrics_dir))
    # Only the first engine process removes orphaned job folders: later ones start under workers
    # that may be receiving uploads into their folders.
    await lifecycle.start(state, engine, server_start=context.generation == 1)
    jobs = state.jobs
    assert isinstance(jobs, JobRunner)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    # Load and warm the models before the workers come: their rings are sized for the inputs.
    if state.warmup_task is not None:
        warm = asyncio.ensure_future(asyncio.shield(state.warmup_task))
        waiters: set[asyncio.Future[Any]] = {warm, asyncio.ensure_future(stop.wait())}
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
    server = EngineServer(state, state.models, jobs, context)
    await server.start()
    control.set_batching(state.settings.max_queue_size, state.settings.max_batch_size)
    control.engine_listening = context.generation
    control.engine_ready = state.ready and not stop.is_set()
    ready_watch = asyncio.create_task(_follow_readiness(state, control, stop))
    await stop.wait()
    # The server's one deadline (the supervisor's): the workers drained in most of it, this gets the
    # rest, and at least a moment to close the jobs database and answer what its batchers hold.
    shared = control.drain_deadline or time.monotonic() + settings.shutdown_grace_s
    state.drain_deadline = max(shared, time.monotonic() + _LAST_DRAIN_S)
    log.info("engine process: draining (%.1f s left)", state.drain_time_left())
    ready_watch.cancel()
    control.engine_ready = False
    await server.stop()
    await lifecycle.stop(state)  # jobs stop feeding, every version's batcher answers what it accepted
    server.close()
    return 0


async def _follow_readiness(state: ServiceState, control: ControlBlock, stop: asyncio.Event) -> None:
    while not stop.is_set():
        control.engine_ready = state.ready
        await asyncio.sleep(_STATUS_EVERY_S / 5)
