"""A front-end worker's side of the engine process: the model registry, its batchers and the job
runner as the routes know them, backed by one Unix socket and one shared-memory ring.

``RemoteRegistry`` is the engine process's ``ModelRegistry`` as last reported (the same lookups,
leases and statuses; load and unload are forwarded). Each of its lanes has an ``EngineLane`` as
its batcher, a ``BatchQueue`` (service/runtime/batch_queue.py): ``submit`` puts the image's
pixels in a ring slot (one copy, microseconds), sends the slot number and the model version, and
resolves when the engine answers. ``check_room`` reads the engine's queue depth from the shared
control block, so a full queue is refused before decoding, as in one process; the engine's own
bounded queue decides for good. If the engine process dies, every image in flight fails at once
with 503 (``EngineUnavailable``) and the client reconnects to its replacement.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from service.core.errors import DeadlineExceeded, NotReady, Overloaded
from service.core.metadata import ModelMetadata
from service.core.repository import ModelEntry
from service.core.settings import Settings
from service.runtime.batcher import overloaded
from service.runtime.metrics import Metrics
from service.scoring.job_runner import DB_NAME, job_throughput
from service.scoring.job_store import JobRecord, JobStore
from service.serving import engine_wire as wire
from service.serving.control_block import ControlBlock
from service.serving.registry import ModelLane, ModelRegistry, VersionState
from service.serving.shm_ring import ShmRing, SlotPool

log = logging.getLogger("vitserve.worker")

_RECONNECT_S = 0.05
_HANDSHAKE_TIMEOUT_S = 30.0


class EngineUnavailable(NotReady):
    """The engine process stopped while this image was queued or running (it is being restarted)."""

    code = "engine_unavailable"


@dataclass(frozen=True)
class RemoteModel:
    """The served model's facts (``ModelFacts``) as the engine process reported them."""

    metadata: ModelMetadata
    on_gpu: bool
    max_batch_size: int | None
    facts: dict[str, Any]

    def describe(self) -> dict[str, Any]:
        return self.facts


@dataclass(eq=False)
class _Pending:
    future: asyncio.Future[np.ndarray]
    slot: int
    timings: dict | None


class EngineClient:
    """One worker's connection to the engine process.

    Args:
        socket_path: the engine process's Unix socket.
        worker: this worker's index (named in the handshake and the logs).
        control: the server's shared control block (queue depth, readiness).
        ring_slots: slots in this worker's ring; None = max_queue_size + 2 x max_batch_size, so the
            engine's queue fills before the ring does.
    """

    def __init__(self, socket_path: Path, worker: int, control: ControlBlock, ring_slots: int | None = None) -> None:
        self.socket_path = socket_path
        self.worker = worker
        self.control = control
        self.ring_slots = ring_slots
        self.hello: wire.EngineHello | None = None
        self.snapshot: wire.RegistrySnapshot | None = None  # the engine's registry, as last reported
        self.job_rates: dict[str, tuple[float, int]] = {}
        self.jobs_paused: dict[str, str] = {}
        self.on_change: Callable[[], None] = lambda: None  # connection state changed
        self._ring: ShmRing | None = None
        self._slots: SlotPool | None = None
        self._protocol: wire.FrameProtocol | None = None
        self._pending: dict[int, _Pending] = {}
        self._next_id = 0
        self._stopping = False
        self._reconnect: asyncio.Task[None] | None = None
        self._calls: dict[int, asyncio.Future[None]] = {}  # repository calls awaiting REPO_DONE

    # -- connection ------------------------------------------------------------------------------
    @property
    def connected(self) -> bool:
        return self._protocol is not None

    async def connect(self, timeout_s: float) -> wire.EngineHello:
        """Connect (waiting for the engine process to listen, at most ``timeout_s``) and hand over the ring."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                sock, hello = await asyncio.to_thread(self._handshake)
                break
            except (FileNotFoundError, ConnectionRefusedError, ConnectionError) as exc:
                if self._stopping or time.monotonic() >= deadline:
                    raise NotReady(f"cannot reach the engine process at {self.socket_path}: {exc}") from None
                await asyncio.sleep(_RECONNECT_S)
        loop = asyncio.get_running_loop()
        _, protocol = await loop.create_unix_connection(
            lambda: wire.FrameProtocol(self._on_frame, self._on_lost), sock=sock
        )
        self._protocol = protocol
        self.hello = hello
        self.snapshot = hello.snapshot
        log.info("worker %d: connected to engine process (generation %d)", self.worker, hello.generation)
        self.on_change()
        return hello

    def _handshake(self) -> tuple[socket.socket, wire.EngineHello]:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(_HANDSHAKE_TIMEOUT_S)
            sock.connect(str(self.socket_path))
            wire.send_blocking(sock, wire.hello_frame(self.worker))
            payload, _ = wire.recv_blocking(sock)
            hello = wire.parse_engine_hello(payload)
            if self._ring is None:
                batch = max((lane.fitted_max_batch_size for lane in hello.snapshot.lanes), default=8)
                slots = self.ring_slots or hello.max_queue_size + 2 * batch
                self._ring = ShmRing(slots, hello.slot_capacity)
                self._slots = SlotPool(slots)
            ring = self._ring
            wire.send_blocking(
                sock, wire.json_frame(wire.RING, {"slots": ring.slots, "capacity": ring.capacity}), (ring.fd,)
            )
            payload, _ = wire.recv_blocking(sock)
            if not payload or payload[0] != wire.RING_OK:
                raise ConnectionError("the engine process refused the shared-memory ring")
            sock.setblocking(False)
            return sock, hello
        except BaseException:
            sock.close()
            raise

    def _on_lost(self, exc: Exception | None) -> None:
        self._protocol = None
        pending, self._pending = self._pending, {}
        error = EngineUnavailable(
            "the engine process stopped before this image was answered; it is being restarted, retry shortly",
            retry_after_s=1,
        )
        for item in pending.values():
            self._release(item.slot)
            if not item.future.done():
                item.future.set_exception(error)
        calls, self._calls = self._calls, {}
        for call in calls.values():
            if not call.done():
                call.set_exception(error)
        self.on_change()
        if not self._stopping:
            log.warning("worker %d: lost the engine process (%s); %d image(s) failed", self.worker, exc, len(pending))
            self._reconnect = asyncio.get_event_loop().create_task(self._reconnect_forever())

    async def _reconnect_forever(self) -> None:
        while not self._stopping:
            try:
                await self.connect(timeout_s=3600.0)
                return
            except NotReady:
                await asyncio.sleep(_RECONNECT_S)
            except Exception:  # noqa: BLE001 - a half-started engine: keep trying
                log.exception("worker %d: reconnecting to the engine process failed", self.worker)
                await asyncio.sleep(1.0)

    def _on_frame(self, payload: memoryview) -> None:
        op = payload[0]
        if op == wire.RESULT:
            request_id, logits, timings = wire.parse_result(payload)
            item = self._pending.pop(request_id, None)
            if item is None:
                return
            self._release(item.slot)
            if item.timings is not None:
                item.timings.update(timings)
            if not item.future.done():
                item.future.set_result(logits)
        elif op == wire.ERROR:
            request_id, exc = wire.parse_error(payload)
            item = self._pending.pop(request_id, None)
            if item is None:
                return
            self._release(item.slot)
            if not item.future.done():
                item.future.set_exception(exc)
        elif op == wire.STATUS:
            body = wire.parse_json(payload)
            self.job_rates = {job: (float(t), int(n)) for job, (t, n) in body.get("job_rates", {}).items()}
            self.jobs_paused = dict(body.get("paused", {}))
        elif op == wire.MODELS:
            self.snapshot = wire.parse_pickle(payload)
            self.on_change()
        elif op == wire.REPO_DONE:
            body = wire.parse_json(payload)
            call = self._calls.pop(int(body["id"]), None)
            if call is not None and not call.done():
                if body.get("error"):
                    call.set_exception(wire.rebuild_error(body["error"]))
                else:
                    call.set_result(None)

    async def repository_call(self, action: str, name: str, force: bool = False) -> None:
        """Run a repository load/unload in the engine process; raises the ServiceError it raised."""
        self._next_id = call_id = (self._next_id + 1) & 0xFFFFFFFF
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._calls[call_id] = future
        if not self.send(wire.json_frame(wire.REPO, {"id": call_id, "action": action, "name": name, "force": force})):
            self._calls.pop(call_id, None)
            raise EngineUnavailable("the engine process is not connected (starting or restarting)", retry_after_s=1)
        await future

    def send(self, data: bytes) -> bool:
        """Send a control message; False when the engine is not connected right now."""
        if self._protocol is None:
            return False
        self._protocol.send(data)
        return True

    # -- images (what EngineLane forwards) --------------------------------------------------------------
    @property
    def accepting(self) -> bool:
        return self.connected and not self._stopping

    @property
    def queue_depth(self) -> int:
        return self.control.queue_depth

    def check_room(self) -> None:
        control = self.control
        if control.max_queue_size and control.queue_depth >= control.max_queue_size:
            raise overloaded(control.max_queue_size, control.max_batch_size, control.last_batch_s)
        if self._slots is not None and self._slots.free == 0:
            raise Overloaded(f"all {self._ring.slots if self._ring else 0} image slots of this worker are in use")

    def _release(self, slot: int) -> None:
        assert self._slots is not None
        self._slots.give_back(slot)

    def send_image(
        self,
        pixels: np.ndarray,
        *,
        lane: int,
        model: str,
        version: int,
        deadline: float | None = None,
        timings: dict | None = None,
    ) -> Awaitable[np.ndarray]:
        """Send one image (3, H, W) to a model version's lane; await the result for its logits (K,).

        The image is copied into a ring slot at once, and the slot freed when the engine answers, so a
        caller cancelled before awaiting leaks nothing.
        """
        ring, slots, protocol = self._ring, self._slots, self._protocol
        if protocol is None or self._stopping or ring is None or slots is None:
            raise EngineUnavailable("the engine process is not connected (starting or restarting)", retry_after_s=1)
        if pixels.size > ring.capacity:
            raise NotReady(f"an input of {pixels.shape} is larger than this worker's shared-memory slots")
        slot = slots.take()
        if slot is None:
            raise Overloaded(f"all {ring.slots} image slots of this worker are in use; retry later")
        ring.view(slot, pixels.shape)[...] = pixels
        self._next_id = request_id = (self._next_id + 1) & 0xFFFFFFFF
        future: asyncio.Future[np.ndarray] = asyncio.get_running_loop().create_future()
        self._pending[request_id] = _Pending(future, slot, timings)
        protocol.send(wire.submit(request_id, slot, lane, deadline, model, version))
        return self._wait(request_id, future, deadline)

    async def _wait(self, request_id: int, future: asyncio.Future[np.ndarray], deadline: float | None) -> np.ndarray:
        started = time.monotonic()
        try:
            if deadline is None:
                return await future
            async with asyncio.timeout(max(deadline - time.monotonic(), 0.0)):
                return await future
        except TimeoutError:
            waited_s = (deadline or started) - started
            raise DeadlineExceeded(
                f"no answer within the request deadline ({waited_s:.3f} s in the queue and engine)"
            ) from None
        finally:
            if request_id in self._pending:  # the client left or the deadline passed: withdraw it
                future.cancel()
                self.send(wire.cancel(request_id))

    async def stop(self, drain: bool = True) -> None:
        """Stop: with ``drain`` wait until every image sent has been answered, then disconnect."""
        if drain:
            while self._pending and self.connected:
                await asyncio.sleep(0.01)
        self._stopping = True
        if self._reconnect is not None:
            self._reconnect.cancel()
        if self._protocol is not None:
            self._protocol.close()
        for item in self._pending.values():
            if not item.future.done():
                item.future.set_exception(NotReady("server is shutting down"))


class EngineLane:
    """The batcher of one model version, in the engine process (a ``BatchQueue``).

    Args:
        client: the worker's link to the engine process.
        name, version: the model version its images go to.
        image_size: that version's input side.
    """

    def __init__(self, client: EngineClient, name: str, version: int, image_size: int) -> None:
        self.client = client
        self.name = name
        self.version = version
        self.shape = (3, image_size, image_size)

    @property
    def accepting(self) -> bool:
        return self.client.accepting

    @property
    def queue_depth(self) -> int:
        return self.client.queue_depth

    in_flight = 0  # the engine process runs the batches; a worker never has one running
    last_batch_s = 0.0

    def check_room(self) -> None:
        self.client.check_room()

    def submit(
        self, pixels: np.ndarray, *, deadline: float | None = None, timings: dict | None = None
    ) -> Awaitable[np.ndarray]:
        return self.client.send_image(
            pixels, lane=wire.ONLINE_LANE, model=self.name, version=self.version, deadline=deadline, timings=timings
        )

    def submit_low(self, pixels: np.ndarray) -> Awaitable[np.ndarray]:
        return self.client.send_image(pixels, lane=wire.LOW_LANE, model=self.name, version=self.version)

    async def start(self) -> None:
        return None

    async def stop(self, drain: bool = True) -> None:
        return None  # the client drains for every lane at once (EngineClient.stop)


def _not_here(source: object) -> Any:
    raise RuntimeError("a front-end worker builds no engine: models load in the engine process")


class RemoteRegistry(ModelRegistry):
    """The engine process's model registry, as it last reported it (lookups, leases, statuses).

    Args:
        settings: the service's settings (each lane gets them with its fitted batch size).
        metrics: the worker's metrics.
        client: the link to the engine process (its snapshots and repository calls).
    """

    def __init__(self, settings: Settings, metrics: Metrics, client: EngineClient) -> None:
        super().__init__(settings, metrics, _not_here, default_model=settings.default_model)
        self.client = client
        self._applied: wire.RegistrySnapshot | None = None

    def follow(self) -> None:
        """Take the client's latest snapshot (called when it changes)."""
        snapshot = self.client.snapshot
        if snapshot is None or snapshot is self._applied:
            return
        self._applied = snapshot
        lanes: dict[tuple[str, int], ModelLane] = {}
        for facts in snapshot.lanes:
            key = (facts.name, facts.version)
            lane = self.lanes.get(key)
            if lane is None or lane.metadata != facts.metadata:
                model = RemoteModel(facts.metadata, facts.on_gpu, facts.max_batch_size, facts.describe)
                batcher = EngineLane(self.client, facts.name, facts.version, facts.metadata.preprocessing.image_size)
                settings = self.settings.model_copy(update={"max_batch_size": facts.fitted_max_batch_size})
                lane = ModelLane(facts.name, facts.version, facts.path, model, batcher, settings)  # type: ignore[arg-type]
            lane.state = VersionState(facts.state)
            lanes[key] = lane
        self.lanes = lanes
        self.current = dict(snapshot.current)
        self.failures = dict(snapshot.failures)
        self.known = dict(snapshot.known)
        self.default_model_setting = snapshot.default_model_setting

    async def apply(self, repository: dict[str, ModelEntry], *, golden: bool = True) -> None:
        raise RuntimeError("a front-end worker does not load models; the engine process does")

    async def load(self, name: str, repository: dict[str, ModelEntry]) -> None:
        await self.client.repository_call("load", name)  # the engine reads the repository itself
        self.follow()

    async def unload(self, name: str, *, force: bool = False) -> None:
        await self.client.repository_call("unload", name, force)
        self.follow()

    async def close(self, *, deadline: float | None = None) -> None:
        return None  # the engine process drains the models


class RemoteJobs:
    """``JobsControl`` for a worker: the jobs database directly, the runner in the engine process.

    Args:
        data_dir: the service's data directory (the database lives there).
        client: the link to the engine process.
    """

    def __init__(self, data_dir: Path, client: EngineClient) -> None:
        self._db_path = data_dir / DB_NAME
        self._client = client
        self._store: JobStore | None = None

    @property
    def db_path(self) -> Path:
        return self._db_path

    @property
    def store(self) -> JobStore:
        if self._store is None:
            self._store = JobStore(self._db_path)  # SQLite in WAL mode: several processes share it
        return self._store

    def notify(self) -> None:
        # If the engine is restarting, its runner finds the job in the database when it starts.
        self._client.send(wire.jobs_notify())

    def cancel(self, job_id: str) -> None:
        self._client.send(wire.jobs_cancel(job_id))

    def images_per_second(self, job: JobRecord) -> float | None:
        return job_throughput(job, self._client.job_rates.get(job.id))

    @property
    def paused(self) -> dict[str, str]:
        return self._client.jobs_paused

    async def stop(self) -> None:
        if self._store is not None:
            self._store.close()
            self._store = None
