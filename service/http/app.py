"""The FastAPI application: ``create_app(settings, engine=None)``.

The lifespan starts the service (service/serving/lifecycle.py: engine, pools, batcher, jobs) and
warms the engine up in the background: the server listens at once (/healthz 200), /readyz and the
inference routes answer 503 until warm-up is done. On shutdown it stops accepting (503), drains
the batcher and frees the pools. Routes reach the ``ServiceState`` through service/http/deps.py.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware

from service.core.settings import Settings, get_settings
from service.http import docs, jobs, page, v1
from service.http.errors import install_error_handlers
from service.http.middleware import OPEN_PATHS, ServiceMiddleware
from service.http.slow_clients import BodyDeadline
from service.http.v2 import repository as v2_repository
from service.http.v2 import router as v2
from service.runtime.engine_protocol import InferenceEngine
from service.runtime.metrics import Metrics
from service.serving import front_end, lifecycle
from service.serving.front_end import WorkerContext
from service.serving.state import ServiceState


def create_app(
    settings: Settings | None = None, *, engine: InferenceEngine | None = None, worker: WorkerContext | None = None
) -> FastAPI:
    """Build the service.

    Args:
        settings: configuration; defaults to ``get_settings()`` (environment variables).
        engine: an already-built engine (see service/runtime/engine_protocol.py); None builds
            ``service.runtime.engine.Engine`` from settings.model.
        worker: set in a front-end worker of a multi-process server (service/serving/supervisor.py):
            the engine, batcher and job runner are then the engine process's (service/serving/front_end.py).
    """
    settings = settings or get_settings()
    if worker is None:
        state = ServiceState(settings)
    else:
        state = ServiceState(settings, metrics=Metrics(multiprocess_dir=worker.metrics_dir, worker=worker.index))

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if worker is not None:
            client = await front_end.start_worker(state, worker)
        else:
            await lifecycle.start(state, engine)
        try:
            yield
        finally:
            if worker is not None:
                await front_end.stop_worker(state, worker, client)
            else:
                await lifecycle.stop(state)

    app = FastAPI(
        title="vitserve",
        summary="Vision Transformer image classification on ONNX Runtime, with dynamic batching.",
        version="0.1.0",
        lifespan=lifespan,
        docs_url=None,  # service/http/docs.py serves them offline
        redoc_url=None,
    )
    app.state.service = state
    install_error_handlers(app)
    app.add_middleware(
        BodyDeadline, timeout_s=state.settings.body_timeout_s, min_rate=state.settings.min_body_rate_bytes_per_s
    )
    app.add_middleware(ServiceMiddleware, service=app)
    if settings.cors_origins:
        # Outermost, so a browser's preflight (which carries no key) is answered before the key check.
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origin_list(),
            allow_methods=["GET", "POST", "DELETE"],
            allow_headers=["Authorization", "Content-Type", "X-Request-ID", "Inference-Header-Content-Length"],
            expose_headers=["X-Request-ID", "Retry-After", "Inference-Header-Content-Length"],
        )
    app.include_router(v1.health_router)
    app.include_router(v1.router)
    app.include_router(v2.router)
    app.include_router(v2_repository.router)
    app.include_router(page.router)
    app.include_router(docs.router)
    app.include_router(jobs.router)
    app.openapi = docs.openapi_with_bearer(app, settings.api_key is not None, OPEN_PATHS)  # type: ignore[method-assign]
    return app
