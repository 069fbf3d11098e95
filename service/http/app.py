"""The FastAPI application: ``create_app(settings, engine=None)``.

The lifespan loads the engine (or takes an injected one, e.g. a fake in tests), starts the
batcher and the pre-processing pool, then warms the engine up in the background: the server
listens at once (/healthz 200), /readyz and the inference routes answer 503 until warm-up is
done. On shutdown it stops accepting (503), drains the batcher and frees the pools.

One pure-ASGI middleware does the per-request plumbing that must happen before a route runs:
API key, body-size limit (Content-Length first, then counting a streamed body), draining
gate, in-flight count, and request metrics by route template and status.
"""

from __future__ import annotations

import asyncio
import hmac
import importlib
import json
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from fastapi.responses import JSONResponse
from starlette.routing import compile_path
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.core.errors import PayloadTooLarge, Unauthorized
from service.core.settings import Settings, get_settings
from service.http import v1
from service.http.errors import error_response, install_error_handlers
from service.runtime.batcher import Batcher
from service.runtime.metrics import Metrics

log = logging.getLogger("vitserve.app")

# Reachable without the API key and while draining: probes and scrapers must always get through;
# so must the web page and its two files (the key is typed into the page) and the v2 health probes.
OPEN_PATHS = frozenset(
    {
        "/healthz",
        "/readyz",
        "/metrics",
        "/v2/health/live",
        "/v2/health/ready",
        "/",
        "/static/app.js",
        "/static/style.css",
    }
)
# Routers from other modules, included when their module is installed (KServe v2, the web page).
OPTIONAL_ROUTERS = ("service.http.v2.router", "service.http.page", "service.http.jobs")
# max_batch_size when the session runs on a GPU and the setting was left at its (CPU) default.
GPU_DEFAULT_MAX_BATCH_SIZE = 32
# Scoring jobs upload whole archives: their one route gets its own, larger body limit.
JOB_UPLOAD_PATH = "/v1/jobs"


class ServiceMiddleware:
    """API key, body limit, draining gate, in-flight count and request metrics (pure ASGI: no overhead
    of BaseHTTPMiddleware, and the body is never buffered here)."""

    def __init__(self, app: ASGIApp, *, service: FastAPI) -> None:
        self.app = app
        self.service = service
        self._templates: list | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        state = self.service.state
        settings: Settings = state.settings
        started = time.perf_counter()
        status = 500
        path = scope["path"]
        guarded = path not in OPEN_PATHS

        async def send_tracking(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                if state.draining and not any(k.lower() == b"connection" for k, _ in message.get("headers", ())):
                    # While draining, no connection is kept alive: a client's next request then opens
                    # a new connection (503, or refused once we stop listening) instead of being sent
                    # on one that the shutdown closes under it.
                    message = {**message, "headers": [*message.get("headers", ()), (b"connection", b"close")]}
            await send(message)

        rejection = self._reject(scope, settings, state) if guarded else None
        if rejection is not None and path.startswith("/v2/"):
            rejection = _as_v2_error(rejection)
        if guarded:
            state.in_flight_requests += 1
            state.metrics.in_flight_requests.inc()
        try:
            if rejection is not None:
                await rejection(scope, receive, send_tracking)
            else:
                await self.app(
                    scope, _limited_receive(receive, _body_limit(settings, path)) if guarded else receive, send_tracking
                )
        finally:
            if guarded:
                state.in_flight_requests -= 1
                state.metrics.in_flight_requests.dec()
            route = scope.get("route")
            template = getattr(route, "path", None) or self._route_template(scope)
            state.metrics.observe_request(template, scope["method"], status, time.perf_counter() - started)

    def _reject(self, scope: Scope, settings: Settings, state: Any):
        headers = {k.lower(): v for k, v in ((k.decode("latin-1"), v.decode("latin-1")) for k, v in scope["headers"])}
        if settings.api_key:
            auth = headers.get("authorization", "")
            scheme, _, token = auth.partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), settings.api_key.encode()):
                exc = Unauthorized()
                return error_response(exc.status_code, exc.code, exc.message, exc.headers)
        if getattr(state, "draining", False):
            return error_response(
                503,
                "not_ready",
                "server is shutting down; retry on another instance",
                {"Retry-After": "1", "Connection": "close"},
            )
        length = headers.get("content-length")
        if length is not None:
            try:
                declared = int(length)
            except ValueError:
                return error_response(400, "bad_request", f"invalid Content-Length header {length!r}")
            limit = _body_limit(settings, scope["path"])
            if declared > limit:
                # Answer from the header alone: the body is never read.
                return error_response(
                    413,
                    "payload_too_large",
                    f"request body of {declared} bytes is over the limit of "
                    f"{limit} bytes (max_upload_bytes, max_job_upload_bytes for /v1/jobs)",
                    {"Connection": "close"},
                )
        return None

    def _route_template(self, scope: Scope) -> str:
        # Early rejections never reached the router; label them by the documented route they were
        # meant for (a bounded label set: never the raw path, which a client could vary at will).
        if self._templates is None:
            paths = list(self.service.openapi().get("paths", {}))
            self._templates = [(compile_path(path)[0], path) for path in paths]
        for regex, template in self._templates:
            if regex.match(scope["path"]):
                return template
        return "unmatched"


def _as_v2_error(response: JSONResponse) -> JSONResponse:
    """The Open Inference Protocol wants ``{"error": "<message>"}``: re-shape an early refusal for /v2 clients."""
    message = json.loads(response.body)["error"]["message"]
    headers = {k: v for k, v in response.headers.items() if k.lower() not in ("content-length", "content-type")}
    return JSONResponse({"error": message}, status_code=response.status_code, headers=headers)


def _body_limit(settings: Settings, path: str) -> int:
    return settings.max_job_upload_bytes if path == JOB_UPLOAD_PATH else settings.max_upload_bytes


def _limited_receive(receive: Receive, limit: int) -> Receive:
    """Count body bytes as they stream in (chunked bodies have no Content-Length) and stop at the limit."""
    received = 0

    async def wrapped() -> Message:
        nonlocal received
        message = await receive()
        if message["type"] == "http.request":
            received += len(message.get("body", b""))
            if received > limit:
                raise PayloadTooLarge(
                    f"request body is over the limit of {limit} bytes (max_upload_bytes); stopped reading"
                )
        return message

    return wrapped


def _build_engine(settings: Settings):
    from service.runtime.engine import Engine  # onnxruntime import deferred: tests with a fake engine skip it

    settings.check_model_file()
    return Engine(
        settings.model,
        spec_options=settings.spec_options(),
        providers=settings.providers or None,
        intra_op_threads=settings.intra_op_threads,
        allow_spinning=settings.ort_allow_spinning,
        gpu_options=settings.gpu_options(),
    )


def _cores() -> int:
    from service.runtime.engine import default_intra_op_threads

    return default_intra_op_threads()


def create_app(settings: Settings | None = None, *, engine: Any = None) -> FastAPI:
    """Build the service.

    Args:
        settings: configuration; defaults to ``get_settings()`` (environment variables).
        engine: an already-built engine (anything with ``run``, ``metadata`` and optionally
            ``warmup`` and ``describe``); None builds ``service.runtime.engine.Engine`` from settings.model.
    """
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        state = app.state
        state.engine = engine if engine is not None else await asyncio.to_thread(_build_engine, settings)
        state.metadata = state.engine.metadata
        if getattr(state.engine, "on_gpu", False) and "max_batch_size" not in settings.model_fields_set:
            # The default of 8 suits a CPU (compute-bound: bigger batches only add latency); a GPU
            # needs bigger batches to fill it. An explicit setting always wins.
            log.info(
                "GPU provider: max_batch_size %d (default for GPU hosts; set VITSERVE_MAX_BATCH_SIZE to change)",
                GPU_DEFAULT_MAX_BATCH_SIZE,
            )
            state.settings = state.settings.model_copy(update={"max_batch_size": GPU_DEFAULT_MAX_BATCH_SIZE})
        fixed_batch = getattr(state.engine, "max_batch_size", None)  # a graph with a fixed batch axis
        if fixed_batch is not None and fixed_batch < state.settings.max_batch_size:
            log.warning(
                "the model takes at most %d image(s) per run: max_batch_size %d -> %d",
                fixed_batch,
                state.settings.max_batch_size,
                fixed_batch,
            )
            state.settings = state.settings.model_copy(update={"max_batch_size": fixed_batch})
        state.preprocess_pool = ThreadPoolExecutor(
            max_workers=settings.preprocess_threads or _cores(), thread_name_prefix="vitserve-preprocess"
        )
        state.batcher = Batcher(
            state.engine,
            max_batch_size=state.settings.max_batch_size,
            max_queue_delay_ms=settings.max_queue_delay_ms,
            max_queue_size=settings.max_queue_size,
            on_batch=state.metrics.observe_batch,
            low_priority_idle_ms=settings.low_priority_idle_ms,
            low_priority_batch_size=settings.job_batch_size or max(1, settings.max_batch_size // 4),
        )
        await state.batcher.start()
        from service.scoring.job_runner import JobRunner  # scoring jobs: resumes unfinished ones once warm

        state.jobs = JobRunner(
            settings,
            state.batcher,
            state.metadata,
            is_ready=lambda: bool(state.ready),
            decode_threads=settings.job_decode_threads or max(1, _cores() // 2),
        )
        await state.jobs.start()
        state.metrics.watch_queue(lambda: state.batcher.queue_depth)
        state.warmup_task = asyncio.create_task(_warm_up(app), name="vitserve-warmup")
        try:
            yield
        finally:
            state.draining = True
            state.ready = False
            state.metrics.ready.set(0)
            state.warmup_task.cancel()
            await state.jobs.stop()  # jobs are durable: stop feeding, unscored images stay pending
            try:
                await asyncio.wait_for(state.batcher.stop(drain=True), timeout=settings.shutdown_grace_s)
            except TimeoutError:
                log.warning("drain took over %.0f s; failing what is left", settings.shutdown_grace_s)
                await state.batcher.stop(drain=False)
            state.preprocess_pool.shutdown(wait=False, cancel_futures=True)
            log.info("shut down cleanly")

    app = FastAPI(
        title="vitserve",
        summary="Vision Transformer image classification on ONNX Runtime, with dynamic batching.",
        version="0.1.0",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.metrics = Metrics()
    app.state.ready = False
    app.state.draining = False
    app.state.in_flight_requests = 0
    install_error_handlers(app)
    app.add_middleware(ServiceMiddleware, service=app)
    app.include_router(v1.health_router)
    app.include_router(v1.router)
    for module_name in OPTIONAL_ROUTERS:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name == module_name:
                continue
            raise
        app.include_router(module.router)
    return app


async def _warm_up(app: FastAPI) -> None:
    state = app.state
    sizes = state.settings.warmup_sizes()
    try:
        if hasattr(state.engine, "warmup"):
            started = time.perf_counter()
            timings = await asyncio.to_thread(state.engine.warmup, sizes)
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


async def wait_for_idle(app: FastAPI, timeout_s: float) -> bool:
    """Wait until no guarded request is in flight (used by the SIGTERM drain); False on timeout."""
    deadline = time.monotonic() + timeout_s
    while app.state.in_flight_requests > 0:
        if time.monotonic() >= deadline:
            return False
        await asyncio.sleep(0.02)
    return True
