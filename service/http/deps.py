"""What routes are handed through ``Annotated`` dependencies: the service state, and request facts.

``State`` is the app's ``ServiceState`` (service/serving/state.py); ``ReadyState`` the same, or 503
while warming up. ``client_gone(request)`` is the future the serving layer watches to drop the work
of a client that disconnected.
"""

from __future__ import annotations

import asyncio
from typing import Annotated

from fastapi import Depends, FastAPI, Request

from service.serving.state import ServiceState


def state_of(app: FastAPI) -> ServiceState:
    state: ServiceState = app.state.service
    return state


def service_state(request: Request) -> ServiceState:
    return state_of(request.app)


def ready_state(request: Request) -> ServiceState:
    return service_state(request).require_ready()


# The dependencies are async on purpose: FastAPI runs a plain ``def`` dependency in its thread pool,
# a thread hop (a lock handover and two context switches) on every request for an attribute read.
async def _service_state_dependency(request: Request) -> ServiceState:
    return state_of(request.app)


async def _ready_state_dependency(request: Request) -> ServiceState:
    return state_of(request.app).require_ready()


State = Annotated[ServiceState, Depends(_service_state_dependency)]
ReadyState = Annotated[ServiceState, Depends(_ready_state_dependency)]


def media_type(request: Request) -> str:
    """The Content-Type without its parameters, lower-cased ('' when absent)."""
    return request.headers.get("content-type", "").split(";", 1)[0].strip().lower()


async def _wait_for_disconnect(request: Request) -> None:
    # Called once the body has been read: the server's next message is http.disconnect, sent
    # when the client goes away (or, harmlessly, once the response is complete).
    while (await request.receive())["type"] != "http.disconnect":
        pass


def client_gone(request: Request) -> asyncio.Future[None]:
    """One watcher per request, shared by all of its images: done when the client disconnects."""
    watch: asyncio.Future[None] | None = getattr(request.state, "vitserve_disconnect_watch", None)
    if watch is None:
        watch = asyncio.ensure_future(_wait_for_disconnect(request))
        watch.add_done_callback(lambda t: t.cancelled() or t.exception())  # never "exception not retrieved"
        request.state.vitserve_disconnect_watch = watch
    return watch
