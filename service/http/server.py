"""Run the app under uvicorn with a draining shutdown (used by `vitserve serve` and the tests).

uvicorn's own SIGTERM handling closes the listening socket and waits for open connections; a
load balancer polling /readyz would then see connection errors rather than a clean "not ready".
``DrainingServer`` first flips the app to draining (new requests and /readyz answer 503), waits
until every accepted request has been answered (bounded by ``shutdown_grace_s``), then lets
uvicorn exit; the lifespan then drains the batcher (already empty) and frees the pools.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import Callable
from functools import partial

import uvicorn
from fastapi import FastAPI

from service.core.settings import Settings
from service.http.app import create_app
from service.http.deps import state_of
from service.http.slow_clients import uvicorn_protocol
from service.runtime.engine_protocol import InferenceEngine
from service.serving import supervisor
from service.serving.front_end import WorkerContext
from service.serving.lifecycle import build_engine, wait_for_idle
from service.serving.supervisor import resolve_workers

log = logging.getLogger("vitserve.server")
# After the drain: how long connections already open may still deliver a request (answered 503).
_LAST_REQUESTS_S = 0.25


class DrainingServer(uvicorn.Server):
    """uvicorn.Server whose first exit signal drains before stopping; a second one stops at once.

    Args:
        config: uvicorn's configuration.
        app: the service app (its state is drained).
        announce: print the "serving ... on http://..." line once started (one worker of many does).
    """

    def __init__(self, config: uvicorn.Config, app: FastAPI, announce: bool = True) -> None:
        super().__init__(config)
        self.state = state_of(app)
        self.announce = announce
        self._drain_started = False
        self._loop: asyncio.AbstractEventLoop | None = None

    async def serve(self, sockets=None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    async def startup(self, sockets=None) -> None:
        await super().startup(sockets)
        if self.should_exit or not self.servers or not self.announce:
            return
        host, port = self.servers[0].sockets[0].getsockname()[:2]
        print(
            f"vitserve: serving {', '.join(sorted(self.state.models.known)) or 'no model'} on http://{host}:{port} "
            f"(API docs: http://{host}:{port}/docs)",
            flush=True,
        )

    def handle_exit(self, sig, frame) -> None:
        if self._drain_started or self._loop is None or not self.started:
            super().handle_exit(sig, frame)  # second signal (or not started yet): stop now
            return
        self._drain_started = True
        self.state.draining = True  # a plain attribute: safe to set from the signal handler
        self._loop.call_soon_threadsafe(lambda: asyncio.ensure_future(self._drain_then_exit()))

    async def _drain_then_exit(self) -> None:
        grace = self.state.settings.shutdown_grace_s
        log.info("draining: refusing new requests, finishing %d accepted", self.state.in_flight_requests)
        if not await wait_for_idle(self.state, grace):
            log.warning("drain grace of %.0f s ran out with requests still in flight", grace)
        # Stop listening before exiting, then give connections already accepted a moment to
        # deliver their request and get its 503: uvicorn's own shutdown closes a connection whose
        # request it has not read yet, and the client sees a reset instead of an answer (measured:
        # 1-3 ReadErrors per SIGTERM under 16 busy clients, tests/reliability/test_faults.py).
        for listener in self.servers:
            listener.close()
        await asyncio.sleep(_LAST_REQUESTS_S)
        await wait_for_idle(self.state, grace)
        self.should_exit = True


def _uvicorn_config(app: FastAPI, settings: Settings) -> uvicorn.Config:
    return uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        access_log=settings.log_level == "debug",
        lifespan="on",
        http=uvicorn_protocol(settings.header_timeout_s),
        timeout_graceful_shutdown=max(1, int(settings.shutdown_grace_s)),
    )


def serve(
    settings: Settings,
    *,
    engine: InferenceEngine | None = None,
    make_engine: Callable[[], InferenceEngine] | None = None,
) -> int:
    """Serve until SIGTERM/SIGINT (drained); returns the exit code.

    One process for ``settings.workers`` 1; else the supervisor's front-end workers and engine
    process (service/serving/supervisor.py), the engine built there by ``make_engine`` (default:
    from settings.model), or ``engine`` inherited when given (a fake: an ONNX Runtime session must
    not cross a fork).
    """
    workers = resolve_workers(settings)
    if workers > 1:
        if make_engine is None:
            make_engine = (lambda: engine) if engine is not None else partial(build_engine, settings)
        return supervisor.run(settings, workers, make_engine, partial(_serve_worker, settings))
    if engine is None and make_engine is not None:
        engine = make_engine()
    app = create_app(settings, engine=engine)
    server = DrainingServer(_uvicorn_config(app, settings), app)
    server.run()
    if not server.started:
        print("vitserve serve: the server did not start (see the log above)", file=sys.stderr)
        return 1
    return 0


def _serve_worker(settings: Settings, context: WorkerContext) -> int:
    """One front-end worker: the app on the supervisor's listening socket."""
    app = create_app(settings, worker=context)
    server = DrainingServer(_uvicorn_config(app, settings), app, announce=context.index == 0)
    server.run(sockets=[context.listener])
    return 0 if server.started else 1
