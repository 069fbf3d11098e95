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

from service.core.settings import Settings, get_settings
from service.http import jobs, page, v1
from service.http.errors import install_error_handlers
from service.http.middleware import ServiceMiddleware
from service.http.v2 import repository as v2_repository
from service.http.v2 import router as v2
from service.runtime.engine_protocol import InferenceEngine
from service.serving import lifecycle
from service.serving.state import ServiceState


def create_app(settings: Settings | None = None, *, engine: InferenceEngine | None = None) -> FastAPI:
    """Build the service.

    Args:
        settings: configuration; defaults to ``get_settings()`` (environment variables).
        engine: an already-built engine (see service/runtime/engine_protocol.py); None builds
            ``service.runtime.engine.Engine`` from settings.model.
    """
    state = ServiceState(settings or get_settings())

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await lifecycle.start(state, engine)
        try:
            yield
        finally:
            await lifecycle.stop(state)

    app = FastAPI(
        title="vitserve",
        summary="Vision Transformer image classification on ONNX Runtime, with dynamic batching.",
        version="0.1.0",
        lifespan=lifespan,
    )
    app.state.service = state
    install_error_handlers(app)
    app.add_middleware(ServiceMiddleware, service=app)
    app.include_router(v1.health_router)
    app.include_router(v1.router)
    app.include_router(v2.router)
    app.include_router(v2_repository.router)
    app.include_router(page.router)
    app.include_router(jobs.router)
    return app
