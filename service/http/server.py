"""Run the app under uvicorn with a draining shutdown (used by `vitserve serve` and the tests).

uvicorn's own SIGTERM handling closes the listening socket and waits for open connections; a
load balancer polling /readyz would then see connection errors rather than a clean "not ready".
``DrainingServer`` first flips the app to draining (new requests and /readyz answer 503), waits
until every accepted request has been answered, then lets uvicorn exit; the lifespan then drains
the batcher (already empty) and frees the pools.

SIGTERM sets ONE deadline, ``shutdown_grace_s`` away, for all of it: the request drain, uvicorn's
wait for open connections, the batcher and the job runner each get what is left of it, not a
grace of their own (three in a row took 91 s against compose's 40 s). A front-end worker of a
multi-process server takes the server's deadline instead (the supervisor's, set before it signals
the workers; the engine process drains in what the workers leave of it). A watchdog exits the
process if it is still alive ``_BACKSTOP_S`` after the deadline (a thread stuck in native code
would otherwise hold the exit), so the orchestrator's SIGKILL never has to.

Connections are served by ``GuardedHttpProtocol`` (service/http/connection.py): head size and
deadline, and a cap on open connections.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import resource
import socket
import sys
import threading
import time
from collections.abc import Callable
from functools import partial

import uvicorn
from fastapi import FastAPI

from service.core.settings import Settings
from service.http.app import create_app
from service.http.connection import ConnectionLimits, guarded_protocol
from service.http.deps import state_of
from service.runtime.engine_protocol import InferenceEngine
from service.serving import supervisor
from service.serving.front_end import WorkerContext
from service.serving.lifecycle import build_engine, wait_for_idle
from service.serving.supervisor import resolve_workers

log = logging.getLogger("vitserve.server")
# After the drain: how long connections already open may still deliver a request (answered 503).
_LAST_REQUESTS_S = 0.25
# Of the drain deadline, kept for the batcher, the job runner and the exit after requests are done.
_RESERVE_S = 2.0
# After hanging up on requests still running at the deadline: how long their handlers get to end.
_HANG_UP_S = 0.5
# The watchdog exits this long after the deadline if the process has not.
_BACKSTOP_S = 4.0
# Descriptors kept for the model, the jobs database, uploads and logs when capping connections.
_RESERVED_FDS = 64


class DrainingServer(uvicorn.Server):
    """uvicorn.Server whose first exit signal drains before stopping; a second one stops at once.

    Args:
        config: uvicorn's configuration.
        app: the service app (its state is drained).
        announce: print the "serving ... on http://..." line once started (one worker of many does).
        shared_deadline: the server-wide drain deadline (time.monotonic(); None if not set yet), for a
            worker of a multi-process server; None: this process sets its own at SIGTERM.
    """

    def __init__(
        self,
        config: uvicorn.Config,
        app: FastAPI,
        announce: bool = True,
        shared_deadline: Callable[[], float | None] | None = None,
    ) -> None:
        super().__init__(config)
        self.state = state_of(app)
        self.announce = announce
        self.shared_deadline = shared_deadline
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
        grace = self.state.settings.shutdown_grace_s
        shared = self.shared_deadline() if self.shared_deadline is not None else None
        deadline = shared if shared is not None else time.monotonic() + grace
        self.state.drain_deadline = deadline  # plain attributes: safe from a signal handler
        self.state.draining = True
        watchdog = threading.Timer(max(0.0, deadline - time.monotonic()) + _BACKSTOP_S, _exit_now, args=(grace,))
        watchdog.daemon = True
        watchdog.start()
        self._loop.call_soon_threadsafe(lambda: asyncio.ensure_future(self._drain_then_exit()))

    async def _drain_then_exit(self) -> None:
        state = self.state
        log.info("draining: refusing new requests, finishing %d accepted", state.in_flight_requests)
        # Requests get the deadline minus a reserve for what follows (batcher, jobs, pools, exit).
        reserve = min(_RESERVE_S, 0.2 * state.settings.shutdown_grace_s)
        if not await wait_for_idle(state, state.drain_time_left() - reserve):
            log.warning("drain deadline reached with %d requests still in flight", state.in_flight_requests)
        # Stop listening before exiting, then give connections already accepted a moment to
        # deliver their request and get its 503: uvicorn's own shutdown closes a connection whose
        # request it has not read yet, and the client sees a reset instead of an answer (measured:
        # 1-3 ReadErrors per SIGTERM under 16 busy clients, tests/reliability/test_faults.py).
        for listener in self.servers:
            listener.close()
        await asyncio.sleep(min(_LAST_REQUESTS_S, state.drain_time_left()))
        if not await wait_for_idle(state, state.drain_time_left() - reserve):
            # Past the deadline: hang up on what is left (a stalled upload, say). Its handler then sees a
            # client disconnect and ends as a 499, instead of uvicorn cancelling it mid-await.
            for connection in list(self.server_state.connections):
                connection.transport.close()
            await wait_for_idle(state, min(_HANG_UP_S, state.drain_time_left()))
        # uvicorn reads this when it shuts down: its wait for open connections ends with our deadline.
        self.config.timeout_graceful_shutdown = max(0.1, state.drain_time_left() - reserve)  # type: ignore[assignment]
        self.should_exit = True


def _exit_now(grace: float) -> None:
    log.error("still running %.0f s after the %.0f s drain deadline: exiting now", _BACKSTOP_S, grace)
    logging.shutdown()
    os._exit(1)


def _open_file_limit() -> int:
    """Raise the soft open-files limit to the hard one (every connection is a descriptor); the result."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        try:
            target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    return soft


def connection_limits(settings: Settings) -> ConnectionLimits:
    """The connection limits in force: ``max_connections`` lowered to what the descriptors allow."""
    fds = _open_file_limit()
    usable = max(1, fds - _RESERVED_FDS)
    if settings.max_connections > usable:
        log.warning(
            "max_connections %d lowered to %d: the process may open %d files", settings.max_connections, usable, fds
        )
    return ConnectionLimits(
        max_connections=min(settings.max_connections, usable),
        max_head_bytes=settings.max_request_head_bytes,
        head_timeout_s=settings.request_head_timeout_s,
    )


class CannotListen(Exception):
    """The address cannot be listened on: the port is taken (another server, an earlier vitserve), or no such host."""


def bind_listener(host: str, port: int) -> socket.socket:
    """A socket bound to (host, port), as uvicorn binds one; CannotListen when the port is taken or no such host.

    Binding before the model loads lets a busy port fail in one line, before any start-up work.
    """
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as exc:
        raise CannotListen(f"cannot listen on {host}: {exc.strerror}") from None
    listener = socket.socket(family, kind, proto)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        listener.bind(address)
    except OSError as exc:
        listener.close()
        if exc.errno == errno.EADDRINUSE:
            raise CannotListen(
                f"port {port} is in use (on {host}); stop what holds it, or pick another with --port / VITSERVE_PORT"
            ) from None
        raise CannotListen(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    listener.set_inheritable(True)
    return listener


def _uvicorn_config(app: FastAPI, settings: Settings) -> uvicorn.Config:
    return uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        log_config=None,  # our handlers and format (service/core/logs.py), uvicorn's lines included
        access_log=False,  # one access-log line per request is the middleware's
        lifespan="on",
        http=guarded_protocol(connection_limits(settings)),
        timeout_keep_alive=settings.keep_alive_timeout_s,
        timeout_graceful_shutdown=max(1, int(settings.shutdown_grace_s)),  # lowered to what is left at SIGTERM
    )


def serve(
    settings: Settings,
    *,
    engine: InferenceEngine | None = None,
    make_engine: Callable[[], InferenceEngine] | None = None,
    listener: socket.socket | None = None,
) -> int:
    """Serve until SIGTERM/SIGINT (drained); returns the exit code. ``listener``: from
    ``bind_listener`` (None: bound here, at settings.host:port).

    One process for ``settings.workers`` 1; else the supervisor's front-end workers and engine
    process (service/serving/supervisor.py), the engine built there by ``make_engine`` (default:
    from settings.model), or ``engine`` inherited when given (a fake: an ONNX Runtime session must
    not cross a fork).
    """
    workers = resolve_workers(settings)
    if workers > 1:
        if make_engine is None:
            given = engine  # never reassigned: the closure keeps it narrowed
            make_engine = (lambda: given) if given is not None else partial(build_engine, settings)
        return supervisor.run(settings, workers, make_engine, partial(_serve_worker, settings), listener)
    if engine is None and make_engine is not None:
        engine = make_engine()
    app = create_app(settings, engine=engine)
    server = DrainingServer(_uvicorn_config(app, settings), app)
    server.run(sockets=[listener] if listener is not None else None)
    if not server.started:
        print("vitserve serve: the server did not start (see the log above)", file=sys.stderr)
        return 1
    return 0


def _serve_worker(settings: Settings, context: WorkerContext) -> int:
    """One front-end worker: the app on the supervisor's listening socket."""
    app = create_app(settings, worker=context)
    server = DrainingServer(
        _uvicorn_config(app, settings),
        app,
        announce=context.index == 0,
        shared_deadline=lambda: context.control.drain_deadline,
    )
    server.run(sockets=[context.listener])
    return 0 if server.started else 1
