"""The few numbers every process of a multi-process server reads without asking anyone.

An anonymous shared mapping made by the supervisor before it forks, so the engine process and
every worker see the same page. Each field has one writer: the engine (ready, queue depth, the
batch figures a Retry-After is computed from), each worker (its own "up" flag), the supervisor
(draining, the drain deadline, and a dead worker's flag back to 0). Single aligned 8-byte stores:
no locks needed. The drain deadline is a ``time.monotonic()`` value: CLOCK_MONOTONIC is one clock
for every process of the host.
"""

from __future__ import annotations

import mmap

import numpy as np

(
    _ENGINE_READY,
    _ENGINE_GENERATION,
    _QUEUE_DEPTH,
    _MAX_QUEUE_SIZE,
    _MAX_BATCH_SIZE,
    _DRAINING,
    _WORKERS,
    _ENGINE_LISTENING,
) = range(8)
_INTS = 8  # integer fields before the worker flags
_FLOATS = 2  # float fields: last batch seconds, drain deadline


class ControlBlock:
    """Shared flags and figures of one server.

    Args:
        workers: how many front-end workers the server runs (each gets an "up" flag).
    """

    def __init__(self, workers: int) -> None:
        self.workers = workers
        ints = _INTS + workers
        self._map = mmap.mmap(-1, 8 * (ints + _FLOATS))  # MAP_SHARED | MAP_ANONYMOUS: shared across fork
        self._ints = np.frombuffer(self._map, np.int64, ints)
        self._floats = np.frombuffer(self._map, np.float64, _FLOATS, offset=8 * ints)
        self._ints[_WORKERS] = workers

    # -- engine --------------------------------------------------------------------------------
    @property
    def engine_ready(self) -> bool:
        return bool(self._ints[_ENGINE_READY])

    @engine_ready.setter
    def engine_ready(self, value: bool) -> None:
        self._ints[_ENGINE_READY] = int(value)

    @property
    def engine_generation(self) -> int:
        """Incremented by the supervisor at every engine (re)start."""
        return int(self._ints[_ENGINE_GENERATION])

    @property
    def engine_listening(self) -> int:
        """The generation of the engine process that has loaded its model and listens (0: none yet)."""
        return int(self._ints[_ENGINE_LISTENING])

    @engine_listening.setter
    def engine_listening(self, generation: int) -> None:
        self._ints[_ENGINE_LISTENING] = generation

    def next_engine_generation(self) -> int:
        self._ints[_ENGINE_GENERATION] += 1
        return self.engine_generation

    @property
    def queue_depth(self) -> int:
        return int(self._ints[_QUEUE_DEPTH])

    @queue_depth.setter
    def queue_depth(self, value: int) -> None:
        self._ints[_QUEUE_DEPTH] = value

    def set_batching(self, max_queue_size: int, max_batch_size: int) -> None:
        self._ints[_MAX_QUEUE_SIZE] = max_queue_size
        self._ints[_MAX_BATCH_SIZE] = max_batch_size

    @property
    def max_queue_size(self) -> int:
        return int(self._ints[_MAX_QUEUE_SIZE])

    @property
    def max_batch_size(self) -> int:
        return int(self._ints[_MAX_BATCH_SIZE])

    @property
    def last_batch_s(self) -> float:
        return float(self._floats[0])

    @last_batch_s.setter
    def last_batch_s(self, value: float) -> None:
        self._floats[0] = value

    # -- supervisor and workers -----------------------------------------------------------------
    @property
    def draining(self) -> bool:
        return bool(self._ints[_DRAINING])

    @draining.setter
    def draining(self, value: bool) -> None:
        self._ints[_DRAINING] = int(value)

    @property
    def drain_deadline(self) -> float | None:
        """time.monotonic() by which every process of the server must have exited; None before SIGTERM."""
        value = float(self._floats[1])
        return value if value > 0 else None

    @drain_deadline.setter
    def drain_deadline(self, value: float) -> None:
        self._floats[1] = value

    def set_worker_up(self, index: int, up: bool) -> None:
        self._ints[_INTS + index] = int(up)

    def workers_up(self) -> int:
        return int(self._ints[_INTS : _INTS + self.workers].sum())

    def all_workers_up(self) -> bool:
        return self.workers_up() == self.workers
