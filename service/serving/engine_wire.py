"""The messages between a front-end worker and the engine process, on one Unix stream socket each.

Every frame is a 4-byte little-endian length and a payload whose first byte names it. The hot
messages are fixed ``struct`` layouts, a few dozen bytes: an image travels as the number of its
shared-memory slot (service/serving/shm_ring.py), its logits come back as raw float32. Only the
handshake (once per connection) and errors and status (rare) are JSON or pickle.

Worker -> engine:
    SUBMIT  request id, slot, lane (online / low), deadline (time.monotonic, NaN = none), model name
            and version (the registry lane the worker resolved; service/serving/registry.py)
    CANCEL  request id (its client left): the engine skips it if still queued; the answer still comes
    JOBS_NOTIFY, JOBS_CANCEL <job id>: the job runner lives in the engine process
    REPO    {"id", "action": "load" | "unload", "name", "force"}: the repository extension's calls
Engine -> worker:
    RESULT  request id, queue ms, inference ms, batch size, logits (K float32)
    ERROR   request id, {"code", "message", "headers"} of a ServiceError
    STATUS  {"job_rates": {job id: [monotonic start, processed at start]}, "paused": {job id: why}}
    MODELS  the pickled ``RegistrySnapshot``, whenever the loaded versions change
    REPO_DONE {"id", "error": null or a ServiceError's {"code", "message", "headers"}}
Every SUBMIT gets exactly one RESULT or ERROR: only then may the worker reuse the slot.

Handshake, on the blocking socket before the event loop takes it: the worker sends HELLO
{"worker": index}; the engine answers with the pickled ``EngineHello`` (the loaded versions, the
slot size their inputs need, the queue limits); the worker sends RING {"slots", "capacity"} with
the ring's file descriptor attached (SCM_RIGHTS) and waits for RING_OK.
"""

from __future__ import annotations

import array
import asyncio
import json
import math
import pickle
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from service.core import errors
from service.core.metadata import ModelMetadata

SUBMIT, CANCEL, JOBS_NOTIFY, JOBS_CANCEL, REPO = 1, 2, 3, 4, 5
RESULT, ERROR, STATUS, MODELS, REPO_DONE = 16, 17, 18, 19, 20
HELLO, ENGINE_HELLO, RING, RING_OK = 32, 33, 34, 35

ONLINE_LANE, LOW_LANE = 0, 1

_LENGTH = struct.Struct("<I")
_SUBMIT = struct.Struct("<BIIBdIB")  # op, request id, slot, lane, deadline, model version, model name length
_REQUEST_ID = struct.Struct("<BI")  # op, request id
_RESULT = struct.Struct("<BIffH")  # op, request id, queue ms, inference ms, batch size
MAX_FRAME_BYTES = 64 * 1024 * 1024  # a frame larger than this is a protocol error, not a message


@dataclass(frozen=True)
class LaneFacts:
    """One loaded model version, as a worker needs to know it (service/serving/registry.py's ModelLane)."""

    name: str
    version: int
    path: Path
    state: str  # VersionState value
    metadata: ModelMetadata
    describe: dict[str, Any]
    on_gpu: bool
    max_batch_size: int | None  # the graph's fixed batch axis (None: dynamic)
    fitted_max_batch_size: int  # the batcher's, fitted to the engine


@dataclass(frozen=True)
class RegistrySnapshot:
    """The engine process's model registry: what /v1/models, /v2 and the routes' lookups read."""

    lanes: tuple[LaneFacts, ...]
    current: dict[str, int]
    failures: dict[tuple[str, int], str]
    known: dict[str, Any]  # name -> ModelEntry
    default_model_setting: str | None


@dataclass(frozen=True)
class EngineHello:
    """What a worker learns from the engine when it connects."""

    snapshot: RegistrySnapshot
    slot_capacity: int  # float32 elements per ring slot: the largest model input
    max_queue_size: int
    generation: int = 0


# -- encoding --------------------------------------------------------------------------------------
def frame(payload: bytes) -> bytes:
    return _LENGTH.pack(len(payload)) + payload


def submit(request_id: int, slot: int, lane: int, deadline: float | None, model: str, version: int) -> bytes:
    name = model.encode()
    when = math.nan if deadline is None else deadline
    return frame(_SUBMIT.pack(SUBMIT, request_id, slot, lane, when, version, len(name)) + name)


def cancel(request_id: int) -> bytes:
    return frame(_REQUEST_ID.pack(CANCEL, request_id))


def jobs_notify() -> bytes:
    return frame(bytes([JOBS_NOTIFY]))


def jobs_cancel(job_id: str) -> bytes:
    return frame(bytes([JOBS_CANCEL]) + job_id.encode())


def result(request_id: int, logits: np.ndarray, timings: dict[str, float]) -> bytes:
    head = _RESULT.pack(
        RESULT,
        request_id,
        timings.get("queue_ms", 0.0),
        timings.get("inference_ms", 0.0),
        int(timings.get("batch_size", 0)),
    )
    return frame(head + np.ascontiguousarray(logits, dtype=np.float32).tobytes())


def error(request_id: int, exc: errors.ServiceError) -> bytes:
    return frame(_REQUEST_ID.pack(ERROR, request_id) + json.dumps(error_body(exc)).encode())


def status(body: dict[str, Any]) -> bytes:
    return frame(bytes([STATUS]) + json.dumps(body).encode())


def json_frame(op: int, body: dict[str, Any]) -> bytes:
    return frame(bytes([op]) + json.dumps(body).encode())


def pickle_frame(op: int, body: object) -> bytes:
    return frame(bytes([op]) + pickle.dumps(body))


def error_body(exc: errors.ServiceError) -> dict[str, Any]:
    return {"code": exc.code, "status": exc.status_code, "message": exc.message, "headers": exc.headers}


# -- decoding --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Submit:
    request_id: int
    slot: int
    lane: int
    deadline: float | None
    model: str
    version: int


def parse_submit(payload: memoryview) -> Submit:
    _, request_id, slot, lane, deadline, version, name_length = _SUBMIT.unpack_from(payload)
    model = bytes(payload[_SUBMIT.size : _SUBMIT.size + name_length]).decode()
    return Submit(request_id, slot, lane, None if math.isnan(deadline) else deadline, model, version)


def parse_request_id(payload: memoryview) -> int:
    return _REQUEST_ID.unpack_from(payload)[1]


def parse_result(payload: memoryview) -> tuple[int, np.ndarray, dict[str, float]]:
    _, request_id, queue_ms, inference_ms, batch_size = _RESULT.unpack_from(payload)
    logits = np.frombuffer(payload[_RESULT.size :], dtype=np.float32).copy()
    return request_id, logits, {"queue_ms": queue_ms, "inference_ms": inference_ms, "batch_size": batch_size}


_ERRORS_BY_CODE: dict[str, type[errors.ServiceError]] = {}


def _error_classes(cls: type[errors.ServiceError]) -> None:
    for sub in cls.__subclasses__():
        _ERRORS_BY_CODE.setdefault(sub.code, sub)
        _error_classes(sub)


def parse_error(payload: memoryview) -> tuple[int, errors.ServiceError]:
    """(request id, the ServiceError the engine raised, rebuilt with its class, message and headers)."""
    request_id = parse_request_id(payload)
    return request_id, rebuild_error(json.loads(bytes(payload[_REQUEST_ID.size :])))


def rebuild_error(body: dict[str, Any]) -> errors.ServiceError:
    """The ServiceError ``error_body`` described: its class (found by code), message and headers."""
    if not _ERRORS_BY_CODE:
        _error_classes(errors.ServiceError)
    cls = _ERRORS_BY_CODE.get(body["code"], errors.ServiceError)
    exc = cls.__new__(cls)
    errors.ServiceError.__init__(exc, body["message"], headers=body.get("headers"))
    if body.get("status", exc.status_code) != exc.status_code:  # a class this process has not imported
        exc.status_code = body["status"]
        exc.code = body["code"]
    if "Retry-After" in exc.headers:  # Overloaded, NotReady: keep the hint their handlers read
        exc.retry_after_s = float(exc.headers["Retry-After"])  # type: ignore[attr-defined]
    return exc


def parse_json(payload: memoryview) -> dict[str, Any]:
    return json.loads(bytes(payload[1:]))


def parse_pickle(payload: memoryview) -> Any:
    return pickle.loads(bytes(payload[1:]))  # noqa: S301 - our own engine process, over a private socket


# -- the async side: frames out of a byte stream ------------------------------------------------------
class FrameProtocol(asyncio.Protocol):
    """Cuts the stream into frames and hands each payload (a memoryview, valid during the call) on.

    Args:
        on_frame: called with each payload.
        on_lost: called once when the connection closes (with the exception, if any).
    """

    def __init__(self, on_frame: Callable[[memoryview], None], on_lost: Callable[[Exception | None], None]) -> None:
        self.on_frame = on_frame
        self.on_lost = on_lost
        self.transport: Any = None  # an asyncio.Transport (uvloop's do not subclass it)
        self._buffer = bytearray()
        self._outgoing: list[bytes] = []  # frames sent during this turn of the event loop
        self._loop: asyncio.AbstractEventLoop | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        self._loop = asyncio.get_running_loop()

    def data_received(self, data: bytes) -> None:
        buffer = self._buffer
        buffer += data
        start = 0
        end = len(buffer)
        view = memoryview(buffer)
        try:
            while end - start >= 4:
                (length,) = _LENGTH.unpack_from(buffer, start)
                if length > MAX_FRAME_BYTES:
                    raise ConnectionError(f"frame of {length} bytes: not this protocol")
                if end - start - 4 < length:
                    break
                self.on_frame(view[start + 4 : start + 4 + length])
                start += 4 + length
        finally:
            view.release()
        del buffer[:start]

    def send(self, data: bytes) -> None:
        """Queue a frame; every frame queued in one turn of the event loop goes out in one write.

        The answers of a whole batch (and a worker's SUBMITs decoded together) then cost one system
        call, not one each; the frame leaves at the end of the current turn, microseconds later.
        """
        if self.transport is None or self.transport.is_closing() or self._loop is None:
            return
        if not self._outgoing:
            self._loop.call_soon(self._flush)
        self._outgoing.append(data)

    def _flush(self) -> None:
        outgoing, self._outgoing = self._outgoing, []
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(outgoing[0] if len(outgoing) == 1 else b"".join(outgoing))

    def close(self) -> None:
        """Send what is queued, then close the connection."""
        if self.transport is not None and not self.transport.is_closing():
            self._flush()
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self.on_lost(exc)


# -- the blocking side: the handshake ------------------------------------------------------------------
def send_blocking(sock: socket.socket, data: bytes, fds: tuple[int, ...] = ()) -> None:
    if fds:
        sent = sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])
        data = data[sent:]
    if data:
        sock.sendall(data)


def recv_blocking(sock: socket.socket, max_fds: int = 0) -> tuple[bytes, list[int]]:
    """One frame's payload and the descriptors that came with it."""
    head, fds = _recv_exactly(sock, 4, max_fds)
    (length,) = _LENGTH.unpack(head)
    if length > MAX_FRAME_BYTES:
        raise ConnectionError(f"frame of {length} bytes: not this protocol")
    payload, more = _recv_exactly(sock, length, max_fds)
    return payload, fds + more


def _recv_exactly(sock: socket.socket, n: int, max_fds: int) -> tuple[bytes, list[int]]:
    chunks: list[bytes] = []
    fds: list[int] = []
    got = 0
    while got < n:
        if max_fds:
            data, ancdata, _, _ = sock.recvmsg(n - got, socket.CMSG_SPACE(max_fds * 4))
            for level, kind, body in ancdata:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    received = array.array("i")
                    received.frombytes(body[: len(body) - len(body) % 4])
                    fds.extend(received)
        else:
            data = sock.recv(n - got)
        if not data:
            raise ConnectionError("the other process closed the connection during the handshake")
        chunks.append(data)
        got += len(data)
    return b"".join(chunks), fds


def hello_frame(worker: int) -> bytes:
    return json_frame(HELLO, {"worker": worker})


def engine_hello_frame(hello: EngineHello) -> bytes:
    return frame(bytes([ENGINE_HELLO]) + pickle.dumps(hello))


def parse_engine_hello(payload: bytes) -> EngineHello:
    if not payload or payload[0] != ENGINE_HELLO:
        raise ConnectionError("the engine process answered the handshake with something else")
    hello = pickle.loads(payload[1:])  # noqa: S301 - our own engine process, over a private socket
    assert isinstance(hello, EngineHello)
    return hello
