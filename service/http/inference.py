"""HTTP routes, plus the helpers every route module shares (v1 here, KServe v2, the page).

Route modules reach the service's parts through ``request.app.state`` (set by the lifespan in
service/http/app.py): ``engine``, ``batcher``, ``metadata``, ``settings``, ``preprocess_pool``,
``metrics``. ``classify_bytes`` and ``classify_pixels`` are the one path from input to logits
(deadline, readiness, thread pool, batcher, metrics), so every protocol behaves the same.
"""

from __future__ import annotations

import asyncio
import time
from functools import partial
from typing import Any

import numpy as np
from fastapi import FastAPI, Request

from service.core.errors import ClientClosedRequest, NotReady, ServiceError
from service.runtime.preprocess import load_pixels


def app_of(request_or_app: Request | FastAPI) -> FastAPI:
    return request_or_app.app if isinstance(request_or_app, Request) else request_or_app


def require_ready(request_or_app: Request | FastAPI) -> Any:
    """The app state, or NotReady (503 + Retry-After) while warming up.

    Draining is not checked here: the middleware refuses new requests once draining starts, and a
    request it admitted before that must be finished even if its body arrives after SIGTERM.
    """
    state = app_of(request_or_app).state
    if not getattr(state, "ready", False):
        raise NotReady("model is not ready (warming up or shutting down)", retry_after_s=1)
    return state


def request_deadline(state: Any) -> float:
    return time.monotonic() + state.settings.request_timeout_s


async def _wait_for_disconnect(request: Request) -> None:
    # Called once the body has been read: the server's next message is http.disconnect, sent
    # when the client goes away (or, harmlessly, once the response is complete).
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _disconnect_watch(request: Request) -> asyncio.Task:
    """One watcher task per request, shared by all of its images."""
    watch = getattr(request.state, "vitserve_disconnect_watch", None)
    if watch is None:
        watch = asyncio.ensure_future(_wait_for_disconnect(request))
        watch.add_done_callback(lambda t: t.cancelled() or t.exception())  # never "exception not retrieved"
        request.state.vitserve_disconnect_watch = watch
    return watch


async def _unless_client_leaves(request_or_app: Request | FastAPI, work) -> Any:
    """Await ``work``; if the client disconnects first, cancel it (the batcher then skips the
    image) and raise ClientClosedRequest."""
    if not isinstance(request_or_app, Request):
        return await work
    task = asyncio.ensure_future(work)
    watch = _disconnect_watch(request_or_app)
    await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    if task.done():
        return task.result()
    task.cancel()
    raise ClientClosedRequest("client disconnected before the answer was ready; its images were not run")


async def classify_pixels(
    request_or_app: Request | FastAPI, pixels: np.ndarray, *, deadline: float | None = None, timings: dict | None = None
) -> np.ndarray:
    """A pre-processed image (3, H, W) float32 -> its logits (K,) float32, through the batcher.

    ``timings`` (if given) receives ``queue_ms``, ``inference_ms`` and ``batch_size``.
    """
    state = require_ready(request_or_app)
    deadline = request_deadline(state) if deadline is None else deadline
    return await _unless_client_leaves(request_or_app, state.batcher.submit(pixels, deadline=deadline, timings=timings))


async def classify_bytes(
    request_or_app: Request | FastAPI, data: bytes, *, deadline: float | None = None
) -> tuple[np.ndarray, dict[str, float]]:
    """Encoded image bytes -> (logits (K,) float32, timing_ms dict).

    Decoding and pre-processing run in the app's thread pool (overlapping inference);
    the timing dict has ``queue``, ``preprocess``, ``inference`` and ``total`` in milliseconds.
    Raises ServiceError subclasses (InvalidImage, Overloaded, NotReady, DeadlineExceeded, ...).
    """
    started = time.perf_counter()
    state = require_ready(request_or_app)
    deadline = request_deadline(state) if deadline is None else deadline
    loop = asyncio.get_running_loop()
    p = state.metadata.preprocessing
    try:
        # A full queue refuses at once, before the image is decoded: 429s stay in milliseconds under
        # overload, and the cores go to images that can be queued (tests/reliability/test_overload.py).
        state.batcher.check_room()
        pixels = await loop.run_in_executor(
            state.preprocess_pool,
            partial(
                load_pixels, data, p, max_pixels=state.settings.max_image_pixels, jpeg_draft=state.settings.jpeg_draft
            ),
        )
    except ServiceError as exc:
        state.metrics.image_errors.labels(exc.code).inc()
        raise
    preprocess_s = time.perf_counter() - started
    state.metrics.preprocess.observe(preprocess_s)
    stage: dict[str, float] = {}
    try:
        logits = await _unless_client_leaves(
            request_or_app, state.batcher.submit(pixels, deadline=deadline, timings=stage)
        )
    except ServiceError as exc:
        state.metrics.image_errors.labels(exc.code).inc()
        raise
    timing_ms = {
        "queue": round(stage.get("queue_ms", 0.0), 3),
        "preprocess": round(preprocess_s * 1000.0, 3),
        "inference": round(stage.get("inference_ms", 0.0), 3),
        "total": round((time.perf_counter() - started) * 1000.0, 3),
    }
    return logits, timing_ms
