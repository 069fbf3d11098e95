"""The engine process of a multi-process server: the ONE batcher and engine session for the device.

It runs the same service lifecycle as a single process (service/serving/lifecycle.py: engine,
batcher, job runner, warm-up) and, instead of HTTP, a Unix socket that every front-end worker
connects to (service/serving/engine_wire.py). Each worker hands over its shared-memory ring; a
SUBMIT names a slot of it, which goes into the batcher as a view on that memory, so batches are
formed from every worker's traffic and the pixels are copied once, when the batch is stacked.
The job runner lives here, so it runs exactly once however many workers there are.

It writes readiness, queue depth and the last batch time into the control block for the workers,
and refreshes its Prometheus gauges (multiprocess mode) for their /metrics.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import socket
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from service.core.errors import ClientClosedRequest, InferenceFailed, NotFound, ServiceError
from service.core.settings import Settings
from service.runtime.batcher import Batcher
from service.runtime.engine_protocol import InferenceEngine
from service.runtime.metrics import Metrics
from service.scoring.job_runner import JobRunner
from service.serving import engine_wire as wire
from service.serving import lifecycle
from service.serving.control_block import ControlBlock
from service.serving.shm_ring import ShmRing
from service.serving.state import ServiceState

log = logging.getLogger("vitserve.engine_process")

_STATUS_EVERY_S = 0.25  # gauges, control-block figures and job rates are refreshed this often
_HANDSHAKE_TIMEOUT_S = 30.0


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
        self.tasks: dict[int, asyncio.Task[None]] = {}
        self._loop = asyncio.get_running_loop()

    def _on_frame(self, payload: memoryview) -> None:
        op = payload[0]
        if op == wire.SUBMIT:
            submit = wire.parse_submit(payload)
            self.tasks[submit.request_id] = self._loop.create_task(self._serve(submit))
            self._loop.call_soon(self.server.publish_queue_depth)  # after the task has queued the image
        elif op == wire.CANCEL:
            task = self.tasks.get(wire.parse_request_id(payload))
            if task is not None:
                task.cancel()
        elif op == wire.JOBS_NOTIFY:
            self.server.jobs.notify()
        elif op == wire.JOBS_CANCEL:
            self.server.jobs.cancel(bytes(payload[1:]).decode())
        else:
            log.error("worker %d sent an unknown message %d; closing its connection", self.worker, op)
            if self.protocol.transport is not None:
                self.protocol.transport.close()

    async def _serve(self, submit: wire.Submit) -> None:
        batcher = self.server.batcher
        timings: dict[str, float] = {}
        try:
            served = self.server.state.metadata.architecture
            if submit.model not in ("", served):
                raise NotFound(f"unknown model {submit.model!r}; this engine serves {served!r}")
            if not 0 <= submit.slot < self.ring.slots:
                raise InferenceFailed(f"slot {submit.slot} is outside the worker's ring of {self.ring.slots}")
            pixels = self.ring.view(submit.slot)
            if submit.lane == wire.LOW_LANE:
                logits = await batcher.submit_low(pixels)
            else:
                logits = await batcher.submit(pixels, deadline=submit.deadline, timings=timings)
            reply = wire.result(submit.request_id, logits, timings)
        except asyncio.CancelledError:  # the worker withdrew it (client gone) or went away
            reply = wire.error(submit.request_id, ClientClosedRequest("withdrawn by the front end"))
        except ServiceError as exc:
            reply = wire.error(submit.request_id, exc)
        except Exception as exc:  # noqa: BLE001 - answer every SUBMIT, whatever went wrong
            log.exception("image from worker %d failed", self.worker)
            reply = wire.error(submit.request_id, InferenceFailed(f"{type(exc).__name__}: {exc}"))
        finally:
            self.tasks.pop(submit.request_id, None)
        self.protocol.send(reply)
        self.server.publish_queue_depth()

    def _on_lost(self, exc: Exception | None) -> None:
        self.server.connections.discard(self)
        for task in list(self.tasks.values()):
            task.cancel()
        if not self.server.stopping:
            log.warning("worker %d disconnected (%s); its %d image(s) withdrawn", self.worker, exc, len(self.tasks))


class EngineServer:
    """The engine side of the workers' sockets.

    Args:
        state: the engine process's started service state (batcher, job runner).
        batcher: the state's batcher (its queue depth and batch time are published).
        jobs: the state's job runner.
        context: the supervisor's control block, socket path and generation.
    """

    def __init__(self, state: ServiceState, batcher: Batcher, jobs: JobRunner, context: EngineProcessContext) -> None:
        self.state = state
        self.batcher = batcher
        self.jobs = jobs
        self.context = context
        self.control = context.control
        self.connections: set[_WorkerConnection] = set()
        self.stopping = False
        self._listener: socket.socket | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._last_rates: dict[str, tuple[float, int]] = {}

    async def start(self) -> None:
        path = self.context.socket_path
        path.unlink(missing_ok=True)  # left by a killed predecessor
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(str(path))
        listener.listen(256)
        listener.setblocking(False)
        self._listener = listener
        self._tasks = [
            asyncio.create_task(self._accept_forever(), name="vitserve-engine-accept"),
            asyncio.create_task(self._status_forever(), name="vitserve-engine-status"),
        ]

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
            worker, ring = await asyncio.to_thread(self._handshake, conn)
            conn.setblocking(False)
            connection = _WorkerConnection(self, worker, ring)
            await asyncio.get_running_loop().connect_accepted_socket(lambda: connection.protocol, conn)
        except Exception:  # noqa: BLE001 - a worker that died mid-handshake must not stop the engine
            log.exception("a worker's handshake failed")
            conn.close()
            return
        self.connections.add(connection)
        log.info("worker %d connected (ring of %d slots)", worker, ring.slots)

    def _handshake(self, conn: socket.socket) -> tuple[int, ShmRing]:
        payload, _ = wire.recv_blocking(conn)
        if not payload or payload[0] != wire.HELLO:
            raise ConnectionError("expected HELLO")
        worker = int(json.loads(payload[1:])["worker"])
        engine = self.state.engine
        settings = self.state.settings
        hello = wire.EngineHello(
            metadata=engine.metadata,
            describe=engine.describe(),
            on_gpu=engine.on_gpu,
            max_batch_size=engine.max_batch_size,
            fitted={"max_batch_size": settings.max_batch_size, "max_queue_size": settings.max_queue_size},
            generation=self.context.generation,
        )
        wire.send_blocking(conn, wire.engine_hello_frame(hello))
        payload, fds = wire.recv_blocking(conn, max_fds=1)
        if not payload or payload[0] != wire.RING or len(fds) != 1:
            for fd in fds:
                os.close(fd)
            raise ConnectionError("expected RING with one file descriptor")
        spec = json.loads(payload[1:])
        ring = ShmRing(int(spec["slots"]), tuple(spec["shape"]), fd=fds[0])
        ring.close()  # the mapping stays; the descriptor is no longer needed
        if ring.shape != (3, *(engine.metadata.preprocessing.image_size,) * 2):
            raise ConnectionError(f"worker {worker}'s ring holds {ring.shape}, not this model's input")
        wire.send_blocking(conn, bytes(wire.frame(bytes([wire.RING_OK]))))
        return worker, ring

    def publish_queue_depth(self) -> None:
        self.control.queue_depth = self.batcher.queue_depth

    async def _status_forever(self) -> None:
        while True:
            self.publish_queue_depth()
            self.control.last_batch_s = self.batcher.last_batch_s
            self.state.metrics.refresh()
            rates = self.jobs.rate_starts
            if rates or self._last_rates:
                message = wire.status({"job_rates": rates})
                for connection in list(self.connections):
                    connection.protocol.send(message)
                self._last_rates = rates
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
            if connection.protocol.transport is not None:
                connection.protocol.transport.close()


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
    return asyncio.run(_serve(settings, engine, context))


async def _serve(settings: Settings, engine: InferenceEngine, context: EngineProcessContext) -> int:
    control = context.control
    state = ServiceState(settings, metrics=Metrics(multiprocess_dir=context.metrics_dir))
    await lifecycle.start(state, engine)
    batcher, jobs = state.batcher, state.jobs
    assert isinstance(batcher, Batcher) and isinstance(jobs, JobRunner)
    control.set_batching(state.settings.max_queue_size, state.settings.max_batch_size)
    server = EngineServer(state, batcher, jobs, context)
    await server.start()
    control.engine_listening = context.generation
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    if state.warmup_task is not None:
        warm = asyncio.ensure_future(asyncio.shield(state.warmup_task))
        await asyncio.wait({warm, asyncio.ensure_future(stop.wait())}, return_when=asyncio.FIRST_COMPLETED)
    control.engine_ready = state.ready and not stop.is_set()
    await stop.wait()
    log.info("engine process: draining")
    control.engine_ready = False
    await server.stop()
    await lifecycle.stop(state)  # jobs stop feeding, the batcher answers what it accepted
    server.close()
    return 0
