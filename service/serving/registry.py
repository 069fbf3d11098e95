"""The loaded model versions, each with its own engine and batcher lane, and their swaps.

``ModelRegistry.apply(repository)`` reconciles what is loaded with what the repository's policies
select: a version that appears is loaded, warmed at its batch sizes and checked on golden inputs
(service/serving/golden.py) *before* it takes traffic; then unversioned requests switch to it in one
assignment on the event loop. Requests that already hold the old version (``lease``) finish on it;
the old version is unloaded once its last lease is returned and its queue has drained. A version
that fails to load, warm or pass its check never takes traffic: what served before keeps serving,
and the failure is kept for /v1/models and counted in a metric.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from enum import StrEnum
from functools import partial
from pathlib import Path

import numpy as np

from service.core.errors import NotFound, NotReady, ServiceError
from service.core.metadata import ModelMetadata
from service.core.repository import ModelEntry, ModelVersionSource
from service.core.settings import Settings
from service.runtime.batcher import Batcher
from service.runtime.engine_protocol import InferenceEngine
from service.runtime.metrics import Metrics
from service.runtime.preprocess import load_pixels
from service.serving.golden import check_golden
from service.serving.stats import ModelStats

log = logging.getLogger("vitserve.models")

EngineFactory = Callable[[ModelVersionSource], InferenceEngine]
# max_batch_size when the session runs on a GPU and the setting was left at its (CPU) default.
GPU_DEFAULT_MAX_BATCH_SIZE = 32


class VersionState(StrEnum):
    LOADING = "LOADING"  # building, warming and checking: takes no traffic yet
    READY = "READY"
    UNLOADING = "UNLOADING"  # no new traffic; finishing what it holds
    UNAVAILABLE = "UNAVAILABLE"  # failed to load or check (``reason`` says why), or unloaded


class ModelNotLoadable(ServiceError):
    """A version cannot be loaded (file, shape, memory budget or golden check); answered 400 on load calls."""

    status_code = 400
    code = "model_not_loadable"


class UnloadRefused(ServiceError):
    status_code = 409
    code = "unload_refused"


@dataclass(eq=False)
class ModelLane:
    """One loaded model version: its engine, its batcher, its state and who is using it."""

    name: str
    version: int
    path: Path
    engine: InferenceEngine
    batcher: Batcher
    settings: Settings  # the service's, with the batch size fitted to this engine
    state: VersionState = VersionState.LOADING
    leases: int = 0  # requests (and jobs) holding this version
    loaded_at: float = field(default_factory=time.time)
    stats: ModelStats = field(default_factory=ModelStats)  # Triton's statistics (GET /v2/models/{name}/stats)

    @property
    def metadata(self) -> ModelMetadata:
        return self.engine.metadata


@dataclass
class VersionStatus:
    """What /v1/models and the repository index report about one version."""

    name: str
    version: int
    state: VersionState
    reason: str = ""


def model_bytes(path: Path) -> int:
    """Size on disk of an ONNX file and its external data (the weights a session will hold)."""
    size = path.stat().st_size
    data = path.with_name(path.name + ".data")
    return size + (data.stat().st_size if data.exists() else 0)


def available_host_bytes() -> int | None:
    """MemAvailable from /proc/meminfo (None where there is none)."""
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def fit_settings_to_engine(settings: Settings, engine: InferenceEngine) -> Settings:
    """The settings with max_batch_size fitted to the engine: GPU default, the graph's fixed batch axis."""
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


class ModelRegistry:
    """Every loaded version, the version each model serves by default, and the failures.

    Args:
        settings: batching, warm-up and memory-budget settings.
        metrics: where per-version figures go.
        engine_factory: builds the engine of one version (called in a thread).
        default_model: the model that unversioned, unnamed routes (/v1/classify) serve; None = the
            only model, or the first by name.
    """

    def __init__(
        self,
        settings: Settings,
        metrics: Metrics,
        engine_factory: EngineFactory,
        *,
        default_model: str | None = None,
    ) -> None:
        self.settings = settings
        self.metrics = metrics
        self.engine_factory = engine_factory
        self.default_model_setting = default_model
        self.lanes: dict[tuple[str, int], ModelLane] = {}
        self.current: dict[str, int] = {}  # model -> version unversioned requests go to
        self.failures: dict[tuple[str, int], str] = {}
        self.known: dict[str, ModelEntry] = {}  # the repository as last applied
        self._lock = asyncio.Lock()  # one reconcile / load / unload at a time
        self._retiring: dict[tuple[str, int], asyncio.Task[None]] = {}

    # -- lookup ---------------------------------------------------------------------------------
    @property
    def default_model(self) -> str | None:
        if self.default_model_setting is not None:
            return self.default_model_setting
        names = sorted(self.current) or sorted(self.known)
        return names[0] if names else None

    def resolve(self, name: str | None = None, version: int | None = None) -> ModelLane:
        """The lane for (name, version); name None = the default model, version None = its current one."""
        name = name if name is not None else self.default_model
        if name is None or (name not in self.known and name not in self.current):
            served = ", ".join(sorted(self.current)) or "none"
            raise NotFound(f"unknown model '{name}'; this server serves: {served}")
        if version is None:
            if name not in self.current:
                raise NotReady(f"model '{name}' has no version ready yet", retry_after_s=1)
            version = self.current[name]
        lane = self.lanes.get((name, version))
        if lane is None or lane.state is not VersionState.READY:
            ready = sorted(v for (n, v), lane_ in self.lanes.items() if n == name and lane_.state is VersionState.READY)
            raise NotFound(f"unknown version '{version}' of model '{name}'; available: {[str(v) for v in ready]}")
        return lane

    @asynccontextmanager
    async def lease(self, name: str | None = None, version: int | None = None) -> AsyncIterator[ModelLane]:
        """Hold a version for the duration of a request: it is not unloaded under it."""
        lane = self.resolve(name, version)
        lane.leases += 1
        try:
            yield lane
        finally:
            lane.leases -= 1

    def statuses(self) -> list[VersionStatus]:
        out = {}
        for (name, version), reason in self.failures.items():
            out[(name, version)] = VersionStatus(name, version, VersionState.UNAVAILABLE, reason)
        for key, lane in self.lanes.items():
            out[key] = VersionStatus(lane.name, lane.version, lane.state)
        for name, entry in self.known.items():
            for version in entry.versions:
                out.setdefault((name, version), VersionStatus(name, version, VersionState.UNAVAILABLE, "not loaded"))
        return [out[key] for key in sorted(out)]

    # -- changes ----------------------------------------------------------------------------------
    def newest(self, name: str | None = None) -> ModelLane | None:
        """The current lane of a model, else its newest lane in any state (for descriptions during start-up)."""
        name = name if name is not None else self.default_model
        try:
            return self.resolve(name)
        except ServiceError:
            lanes = [lane for (n, _), lane in self.lanes.items() if n == name]
            return max(lanes, key=lambda lane: lane.version) if lanes else None

    async def apply(self, repository: dict[str, ModelEntry], *, golden: bool = True) -> None:
        """Load what the policies select and is not loaded yet; retire what they no longer select.

        ``golden`` False skips the golden check: for the versions a server starts with, where no
        earlier version could keep serving in their place.
        """
        async with self._lock:
            self.known = repository
            for name, entry in repository.items():
                wanted = entry.selected()
                for source in wanted:
                    retiring = self._retiring.get((name, source.version))
                    if retiring is not None:
                        await retiring  # unloaded and now wanted again: let the old lane finish first
                    if (name, source.version) in self.lanes or (name, source.version) in self.failures:
                        continue  # loaded already, or failed already: a changed file needs a new version number
                    await self._load(source, golden=golden)
                keep = {s.version for s in wanted}
                ready_wanted = [v for v in keep if self._is_ready(name, v)]
                if not ready_wanted:
                    continue  # none of the wanted versions came up: what serves now keeps serving
                for lane_name, version in list(self.lanes):
                    if lane_name == name and version not in keep:
                        self._retire(self.lanes[(lane_name, version)])
            for name, version in list(self.lanes):
                if name not in repository:
                    self._retire(self.lanes[(name, version)])

    async def load(self, name: str, repository: dict[str, ModelEntry]) -> None:
        """The repository extension's load: (re)read one model and bring its selected versions up.

        Raises ModelNotLoadable if none of its selected versions could be loaded.
        """
        entry = repository.get(name)
        if entry is None:
            raise NotFound(f"model '{name}' is not in the repository")
        for source in entry.selected():
            self.failures.pop((name, source.version), None)  # an explicit load retries a failed version
        await self.apply({**self.known, name: entry})
        failed = [
            (s.version, self.failures[(name, s.version)])
            for s in entry.selected()
            if (name, s.version) in self.failures
        ]
        if failed or name not in self.current:
            reasons = "; ".join(f"version {v}: {r}" for v, r in failed) or "no versions selected"
            serving = f" (version {self.current[name]} keeps serving)" if name in self.current else ""
            raise ModelNotLoadable(f"model '{name}' could not be loaded: {reasons}{serving}")

    async def unload(self, name: str, *, force: bool = False) -> None:
        """Take every version of a model out of service (refused while requests hold it, unless forced)."""
        async with self._lock:
            lanes = [lane for (n, _), lane in self.lanes.items() if n == name]
            if not lanes and name not in self.known:
                raise NotFound(f"model '{name}' is not loaded")
            busy = sum(lane.leases + lane.batcher.queue_depth + lane.batcher.in_flight for lane in lanes)
            if busy and not force:
                raise UnloadRefused(
                    f"model '{name}' has {busy} request(s) in flight; retry, or unload with "
                    '{"parameters": {"unload_dependents": false, "force": true}}'
                )
            self.known = {n: e for n, e in self.known.items() if n != name}
            for lane in lanes:
                self._retire(lane, force=force)

    async def close(self, *, deadline: float | None = None) -> None:
        """Drain and free every version (service shutdown) by ``deadline`` (time.monotonic(); default:
        the shutdown grace from now); what is still queued then is failed."""
        deadline = time.monotonic() + self.settings.shutdown_grace_s if deadline is None else deadline
        for lane in list(self.lanes.values()):
            self._retire(lane, deadline=deadline)
        if self._retiring:
            await asyncio.gather(*self._retiring.values(), return_exceptions=True)

    # -- internals --------------------------------------------------------------------------------
    def _is_ready(self, name: str, version: int) -> bool:
        lane = self.lanes.get((name, version))
        return lane is not None and lane.state is VersionState.READY

    def _check_budget(self, source: ModelVersionSource) -> None:
        if not source.path.is_file():
            return  # an engine built elsewhere (injected): nothing of ours to size
        needed = model_bytes(source.path)
        budget = self.settings.model_memory_budget_bytes
        if budget:
            held = sum(model_bytes(lane.path) for lane in self.lanes.values() if lane.path.is_file())
            if held + needed > budget:
                raise ModelNotLoadable(
                    f"version {source.version} of '{source.name}' needs {needed} bytes; {held} of the "
                    f"{budget}-byte budget are held (model_memory_budget_bytes)"
                )
        available = available_host_bytes()
        # A session holds its weights about twice over while it builds (file + optimised graph).
        if available is not None and 2 * needed > available:
            raise ModelNotLoadable(
                f"version {source.version} of '{source.name}' needs about {2 * needed} bytes of host memory "
                f"to load; {available} are available"
            )

    async def _load(self, source: ModelVersionSource, *, golden: bool) -> None:
        key = (source.name, source.version)
        started = time.perf_counter()
        lane: ModelLane | None = None
        try:
            self._check_budget(source)
            engine = await asyncio.to_thread(self.engine_factory, source)
            settings = fit_settings_to_engine(self.settings, engine)
            stats = ModelStats()
            lane = ModelLane(
                source.name,
                source.version,
                source.path,
                engine,
                self._batcher(source, engine, settings, stats),
                settings,
                stats=stats,
            )
            self.lanes[key] = lane
            await lane.batcher.start()
            timings = await asyncio.to_thread(engine.warmup, settings.warmup_sizes())
            if timings:
                log.info(
                    "model %s version %d warmed up (%s)",
                    source.name,
                    source.version,
                    ", ".join(f"batch {n}: {s * 1000:.1f} ms" for n, s in sorted(timings.items())),
                )
            report = await check_golden(engine.metadata, partial(self._classify_golden, lane)) if golden else []
        except Exception as exc:  # a broken version never takes the server down
            reason = exc.message if isinstance(exc, ServiceError) else f"{type(exc).__name__}: {exc}"
            log.error("model %s version %d failed to load: %s", source.name, source.version, reason)
            self.failures[key] = reason
            self.metrics.model_load_failures.labels(source.name).inc()
            if lane is not None:
                self.lanes.pop(key, None)
                await lane.batcher.stop(drain=False)
            return
        lane.state = VersionState.READY
        self.metrics.model_ready.labels(source.name, str(source.version)).set(1)
        previous = self.current.get(source.name)
        if previous is None or source.version > previous:
            self.current[source.name] = source.version  # the switch: one assignment on the event loop
        log.info(
            "model %s version %d ready in %.2f s (golden: %s)%s",
            source.name,
            source.version,
            time.perf_counter() - started,
            ", ".join(report) or "not run",
            f"; now serving it instead of version {previous}" if previous and source.version > previous else "",
        )

    def _batcher(self, source: ModelVersionSource, engine: InferenceEngine, s: Settings, stats: ModelStats) -> Batcher:
        max_batch = s.max_batch_size
        labels = (source.name, str(source.version))

        def observe(size: int, seconds: float) -> None:
            self.metrics.observe_batch(size, seconds)
            self.metrics.model_images.labels(*labels).inc(size)
            stats.observe_execution(size, seconds)

        return Batcher(
            engine,
            max_batch_size=max_batch,
            max_queue_delay_ms=s.max_queue_delay_ms,
            max_queue_size=s.max_queue_size,
            on_batch=observe,
            low_priority_idle_ms=s.low_priority_idle_ms,
            low_priority_batch_size=s.job_batch_size or max(1, max_batch // 4),
        )

    async def _classify_golden(self, lane: ModelLane, data: bytes) -> np.ndarray:
        pixels = await asyncio.to_thread(
            partial(
                load_pixels,
                data,
                lane.metadata.preprocessing,
                max_pixels=self.settings.max_image_pixels,
                formats=self.settings.decode_formats(),
            )
        )
        return await lane.batcher.submit(pixels, deadline=time.monotonic() + self.settings.request_timeout_s)

    def _retire(self, lane: ModelLane, *, force: bool = False, deadline: float | None = None) -> None:
        if lane.state is VersionState.UNLOADING:
            return
        lane.state = VersionState.UNLOADING
        if self.current.get(lane.name) == lane.version:
            ready = [v for (n, v), other in self.lanes.items() if n == lane.name and other.state is VersionState.READY]
            if ready:
                self.current[lane.name] = max(ready)
            else:
                del self.current[lane.name]
        key = (lane.name, lane.version)
        task = asyncio.ensure_future(self._drain_and_free(lane, force, deadline))
        self._retiring[key] = task
        task.add_done_callback(lambda done: self._retiring.pop(key) if self._retiring.get(key) is done else None)

    async def _drain_and_free(self, lane: ModelLane, force: bool, deadline: float | None) -> None:
        # Requests (and jobs) that leased this version before the switch finish on it, however long a
        # job takes; only a shutdown (deadline) or a forced unload cuts that short. Then its queue drains.
        while lane.leases and not force and (deadline is None or time.monotonic() < deadline):
            await asyncio.sleep(0.01)
        if force:
            await lane.batcher.stop(drain=False)
        else:
            try:
                timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
                await asyncio.wait_for(lane.batcher.stop(drain=True), timeout=timeout)
            except TimeoutError:
                log.warning("model %s version %d: drain ran out of time; failing what is left", lane.name, lane.version)
                await lane.batcher.stop(drain=False)
        self.lanes.pop((lane.name, lane.version), None)
        self.metrics.model_ready.labels(lane.name, str(lane.version)).set(0)
        lane.state = VersionState.UNAVAILABLE
        log.info("model %s version %d unloaded", lane.name, lane.version)


async def poll_repository(
    registry: ModelRegistry, scan: Callable[[], dict[str, ModelEntry]], interval_s: float
) -> None:
    """Re-scan the repository every ``interval_s`` and apply what changed (runs until cancelled)."""
    while True:
        await asyncio.sleep(interval_s)
        try:
            repository = await asyncio.to_thread(scan)
        except (OSError, ValueError) as exc:
            log.error("repository scan failed (what is loaded keeps serving): %s", exc)
            continue
        await registry.apply(repository)
