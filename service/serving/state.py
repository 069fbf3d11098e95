"""``ServiceState``: everything a running service holds, typed, in one object.

Built empty by the front end (settings and metrics are known before the model loads), filled by
``service.serving.lifecycle.start`` and read by every route through a dependency.
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TypeVar

from service.core.errors import NotReady
from service.core.metadata import ModelMetadata
from service.core.settings import Settings
from service.runtime.batcher import Batcher
from service.runtime.decode_limits import PixelGate
from service.runtime.engine_protocol import InferenceEngine
from service.runtime.metrics import Metrics
from service.scoring.jobs_control import JobsControl
from service.serving.cache import ResponseCache
from service.serving.registry import ModelLane, ModelRegistry

_Part = TypeVar("_Part")


class NotStarted(RuntimeError):
    """A part of the service was used before the lifespan built it (a programming error)."""


@dataclass(eq=False)
class ServiceState:
    """The service's parts and flags.

    Args:
        settings: the configuration in force (the lifespan may adjust batch sizes to the engine).
        metrics: the process's Prometheus metrics.
    """

    settings: Settings
    metrics: Metrics = field(default_factory=Metrics)
    ready: bool = False  # warm and accepting inference
    draining: bool = False  # SIGTERM received: refuse new requests, finish accepted ones
    in_flight_requests: int = 0  # guarded requests being handled (the drain waits for 0)
    _models: ModelRegistry | None = None
    drain_deadline: float | None = None  # time.monotonic() by which a SIGTERM'd process must have exited
    _preprocess_pool: ThreadPoolExecutor | None = None
    preprocess_threads: int = 0  # the pool's size, once built
    _pixel_gate: PixelGate | None = None
    _jobs: JobsControl | None = None  # in a front-end worker of a multi-process server: RemoteJobs
    cache: ResponseCache = field(default_factory=lambda: ResponseCache(0))
    warmup_task: asyncio.Task[None] | None = None
    poll_task: asyncio.Task[None] | None = None

    @property
    def models(self) -> ModelRegistry:
        return _started(self._models, "model registry")

    def default_lane(self) -> ModelLane:
        """The default model's current version; NotReady/NotFound when there is none."""
        return self.models.resolve()

    def described_lane(self) -> ModelLane:
        """The default model's current version, or its newest one still loading (for descriptions)."""
        lane = self.models.newest()
        if lane is None:
            raise NotReady("no model is loaded yet", retry_after_s=1)
        return lane

    @property
    def engine(self) -> InferenceEngine:
        return self.described_lane().engine

    @property
    def metadata(self) -> ModelMetadata:
        return self.described_lane().metadata

    @property
    def batcher(self) -> Batcher:
        return self.described_lane().batcher

    @property
    def preprocess_pool(self) -> ThreadPoolExecutor:
        return _started(self._preprocess_pool, "pre-processing pool")

    @property
    def pixel_gate(self) -> PixelGate:
        """Pixels being decoded at once in the process, online and job decodes together."""
        return _started(self._pixel_gate, "pixel gate")

    @property
    def jobs(self) -> JobsControl:
        return _started(self._jobs, "job runner")

    @property
    def serving(self) -> bool:
        """Ready and not draining: what health probes and load balancers want to know."""
        return self.ready and not self.draining

    def require_ready(self) -> ServiceState:
        """This state, or NotReady (503 + Retry-After) while warming up.

        Draining is not checked here: the front end refuses new requests once draining starts, and
        a request admitted before that must be finished even if its body arrives after SIGTERM.
        """
        if not self.ready:
            raise NotReady("model is not ready (warming up or shutting down)", retry_after_s=1)
        return self

    def drain_time_left(self) -> float:
        """Seconds left before the drain deadline (the whole grace when no SIGTERM came: e.g. tests)."""
        if self.drain_deadline is None:
            return self.settings.shutdown_grace_s
        return max(0.0, self.drain_deadline - time.monotonic())

    def deadline(self) -> float:
        """The time.monotonic() by which a request arriving now must be answered."""
        return time.monotonic() + self.settings.request_timeout_s


def _started(part: _Part | None, name: str) -> _Part:
    if part is None:
        raise NotStarted(f"the service's {name} is not built yet (the lifespan has not started)")
    return part
