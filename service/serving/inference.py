"""The one path from a request's input to logits: readiness, deadline, pre-processing, batcher, metrics.

Every route of every binding (HTTP /v1 and /v2, gRPC) classifies through ``classify_bytes`` (encoded
images) or ``classify_pixels`` (pre-processed tensors), so they all behave the same. A front end that
can tell when its client has gone passes ``client_gone``: an awaitable that completes at that moment;
the image's queued work is then withdrawn (the batcher skips cancelled items).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable
from typing import TypeVar

import numpy as np

from service.core.errors import ClientClosedRequest, ServiceError
from service.runtime.decode_limits import RequestDecodes
from service.runtime.preprocess import Admit, load_pixels
from service.serving.registry import ModelLane
from service.serving.state import ServiceState

_Result = TypeVar("_Result")


async def unless_client_leaves(work: Awaitable[_Result], client_gone: asyncio.Future[None] | None) -> _Result:
    """Await ``work``; if ``client_gone`` completes first, cancel the work and raise ClientClosedRequest."""
    if client_gone is None:
        return await work
    task = asyncio.ensure_future(work)
    await asyncio.wait({task, client_gone}, return_when=asyncio.FIRST_COMPLETED)
    if task.done():
        return task.result()
    task.cancel()
    raise ClientClosedRequest("client disconnected before the answer was ready; its images were not run")


async def classify_pixels(
    state: ServiceState,
    pixels: np.ndarray,
    *,
    deadline: float | None = None,
    timings: dict[str, float] | None = None,
    client_gone: asyncio.Future[None] | None = None,
    lane: ModelLane | None = None,
) -> np.ndarray:
    """A pre-processed image (3, H, W) float32 -> its logits (K,) float32, through the batcher of
    ``lane`` (a leased model version; None = the default model's current one).

    ``timings`` (if given) receives ``queue_ms``, ``inference_ms`` and ``batch_size``.
    """
    started = time.perf_counter()
    state.require_ready()
    lane = lane or state.default_lane()
    deadline = state.deadline() if deadline is None else deadline
    timings = {} if timings is None else timings
    try:
        logits = await unless_client_leaves(
            lane.batcher.submit(pixels, deadline=deadline, timings=timings), client_gone
        )
    except ServiceError:
        lane.stats.observe_failure(time.perf_counter() - started)
        raise
    _observe_success(state, lane, started, timings, preprocess_s=None)
    return logits


def _observe_success(
    state: ServiceState, lane: ModelLane, started: float, stage: dict[str, float], *, preprocess_s: float | None
) -> None:
    queue_s = stage.get("queue_ms", 0.0) / 1000.0
    state.metrics.queue_wait.observe(queue_s)
    lane.stats.observe_success(
        time.perf_counter() - started,
        queue_s=queue_s,
        preprocess_s=preprocess_s,
        infer_s=stage.get("inference_ms", 0.0) / 1000.0,
    )


def request_decodes(
    state: ServiceState, deadline: float, client_gone: asyncio.Future[None] | None = None
) -> RequestDecodes:
    """One request's decode share (service/runtime/decode_limits.py): its pixel budget, at most
    ``max_request_decodes`` of its images in the pool at once, nothing decoded past its deadline or
    once its client has gone. A request with several images passes one to every ``classify_bytes``."""
    settings = state.settings
    decodes = RequestDecodes(
        pixel_budget=settings.request_pixel_budget(),
        max_concurrent=settings.request_decode_slots(state.preprocess_threads),
        deadline=deadline,
        gate=state.pixel_gate,
    )
    if client_gone is not None:
        client_gone.add_done_callback(
            lambda _: decodes.stop(ClientClosedRequest("client disconnected; its remaining images were not decoded"))
        )
    return decodes


async def classify_bytes(
    state: ServiceState,
    data: bytes,
    *,
    deadline: float | None = None,
    client_gone: asyncio.Future[None] | None = None,
    lane: ModelLane | None = None,
    decodes: RequestDecodes | None = None,
) -> tuple[np.ndarray, dict[str, float]]:
    """Encoded image bytes -> (logits (K,) float32, timing_ms dict).

    Decoding and pre-processing run in the state's thread pool (overlapping inference), within the
    request's ``decodes`` share (one is made for this image alone when None); the timing dict has
    ``queue``, ``preprocess``, ``inference`` and ``total`` in milliseconds.
    Raises ServiceError subclasses (InvalidImage, Overloaded, NotReady, DeadlineExceeded, ...).
    """
    started = time.perf_counter()
    state.require_ready()
    lane = lane or state.default_lane()
    deadline = state.deadline() if deadline is None else deadline
    settings = state.settings
    decodes = request_decodes(state, deadline, client_gone) if decodes is None else decodes
    try:
        # A full queue refuses at once, before the image is decoded: 429s stay in milliseconds under
        # overload, and the cores go to images that can be queued (tests/reliability/test_overload.py).
        lane.batcher.check_room()
        preprocessing = lane.metadata.preprocessing

        def decode(admit: Admit) -> np.ndarray:
            return load_pixels(
                data,
                preprocessing,
                max_pixels=settings.max_image_pixels,
                jpeg_draft=settings.jpeg_draft,
                formats=settings.decode_formats(),
                admit=admit,
            )

        pixels = await unless_client_leaves(decodes.run(state.preprocess_pool, decode), client_gone)
    except ServiceError as exc:
        state.metrics.image_errors.labels(exc.code).inc()
        lane.stats.observe_failure(time.perf_counter() - started)
        raise
    preprocess_s = time.perf_counter() - started
    state.metrics.preprocess.observe(preprocess_s)
    stage: dict[str, float] = {}
    try:
        logits = await unless_client_leaves(lane.batcher.submit(pixels, deadline=deadline, timings=stage), client_gone)
    except ServiceError as exc:
        state.metrics.image_errors.labels(exc.code).inc()
        lane.stats.observe_failure(time.perf_counter() - started)
        raise
    _observe_success(state, lane, started, stage, preprocess_s=preprocess_s)
    timing_ms = {
        "queue": round(stage.get("queue_ms", 0.0), 3),
        "preprocess": round(preprocess_s * 1000.0, 3),
        "inference": round(stage.get("inference_ms", 0.0), 3),
        "total": round((time.perf_counter() - started) * 1000.0, 3),
    }
    return logits, timing_ms
