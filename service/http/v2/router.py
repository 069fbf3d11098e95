"""The Open Inference Protocol (KServe v2) REST API, so Triton and KServe clients work unchanged.

    GET  /v2                                       server metadata (name, version, extensions)
    GET  /v2/health/live, /v2/health/ready         200 = yes, 400 = no (empty body, as the spec says)
    GET  /v2/models/{name}[/versions/1]            model metadata: inputs, outputs, datatypes, shapes
    GET  /v2/models/{name}[/versions/1]/ready
    POST /v2/models/{name}[/versions/1]/infer      encoded images (BYTES) or pixels (FP32) -> logits / top-k
    GET  /v2/models/{name}[/versions/1]/config     Triton's model configuration extension
    GET  /v2/models[/{name}[/versions/1]]/stats    Triton's statistics extension (per loaded version)

The model name is the served name (--name, else the architecture in its ONNX metadata). The wire format
(JSON, Triton's binary tensor and classification extensions) is in ``service.http.v2.codec``; this
module only moves bytes between HTTP, the pre-processing pool and the batcher.

Errors on /v2 use the protocol's body ``{"error": "<message>"}`` (not the service's
``{"error": {"code", "message"}}``) with the same status codes as the rest of the service: 404
unknown model or version, 400 malformed request, 413 body too large, 422 an element that is not a
usable image, 429/503 with Retry-After, 504 past the deadline. ``V2Route`` converts them, so
errors raised by dependencies (e.g. the API key check) get the same shape.
"""

from __future__ import annotations

import asyncio
import time
import zlib
from collections.abc import Awaitable, Sequence
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import numpy as np
from fastapi import APIRouter, Request, Response

from service.core.errors import BadRequest, NotFound, NotReady, PayloadTooLarge, ServiceError
from service.core.repository import version_number
from service.http.deps import ReadyState, State, client_gone
from service.http.v2 import codec as v2_codec
from service.serving.inference import classify_bytes, classify_pixels, request_decodes
from service.serving.registry import ModelLane, VersionState
from service.serving.state import ServiceState

SERVER_NAME = "vitserve"
try:
    SERVER_VERSION = version("vitserve")
except PackageNotFoundError:  # running from a source tree that was never installed
    SERVER_VERSION = "0.0.0"

_OCTET_STREAM = "application/octet-stream"


router = APIRouter(prefix="/v2", tags=["Open Inference Protocol (KServe v2)"])


def _version(model_name: str, model_version: str | None) -> int | None:
    """The protocol's version string as the registry's number (None: the model's current version)."""
    if model_version is None:
        return None
    number = version_number(model_version)
    if number is None:
        raise NotFound(f"unknown version '{model_version}' of model '{model_name}'; versions are positive integers")
    return number


def _lane(state: ServiceState, model_name: str, model_version: str | None) -> ModelLane:
    return state.models.resolve(model_name, _version(model_name, model_version))


def _ready_versions(state: ServiceState, model_name: str) -> list[str]:
    return [str(s.version) for s in state.models.statuses() if s.name == model_name and s.state is VersionState.READY]


def _health(ok: bool) -> Response:
    # The protocol answers health with the status code alone: 200 true, 4xx false (Triton sends 400).
    return Response(status_code=200 if ok else 400)


# Health answers have no body: documenting them as such (response_class=Response) keeps the OpenAPI
# schema truthful; without it FastAPI documented an application/json body the routes never send.
_EMPTY_HEALTH: dict[str, Any] = {
    "response_class": Response,
    "responses": {200: {"description": "yes (empty body)"}, 400: {"description": "no (empty body)"}},
}


@router.get("", summary="Server metadata")
async def server_metadata() -> dict:
    return v2_codec.server_metadata(SERVER_NAME, SERVER_VERSION)


@router.get("/health/live", summary="Server liveness (200 live)", **_EMPTY_HEALTH)
async def server_live() -> Response:
    return _health(True)


@router.get(
    "/health/ready", summary="Server readiness (200 ready, 400 not yet: warming up or shutting down)", **_EMPTY_HEALTH
)
async def server_ready(state: State) -> Response:
    # Draining counts as not ready, so a load balancer stops sending work during the graceful shutdown.
    return _health(state.serving)


@router.get("/models/stats", summary="Statistics of every loaded model version (Triton's statistics extension)")
async def all_model_stats(state: State) -> dict:
    lanes = sorted(state.models.lanes.values(), key=lambda lane: (lane.name, lane.version))
    return {"model_stats": [lane.stats.as_triton(lane.name, str(lane.version)) for lane in lanes]}


@router.get("/models/{model_name}/stats", summary="Statistics of a model's loaded versions")
@router.get("/models/{model_name}/versions/{model_version}/stats", summary="Statistics of one model version")
async def model_stats(state: State, model_name: str, model_version: str | None = None) -> dict:
    if model_version is not None:
        lanes = [_lane(state, model_name, model_version)]
    else:
        lanes = sorted(
            (lane for lane in state.models.lanes.values() if lane.name == model_name), key=lambda x: x.version
        )
        if not lanes:
            _lane(state, model_name, None)  # the registry's own 404 (or 503 while it loads)
    return {"model_stats": [lane.stats.as_triton(lane.name, str(lane.version)) for lane in lanes]}


@router.get("/models/{model_name}/config", summary="Model configuration (Triton's model configuration extension)")
@router.get("/models/{model_name}/versions/{model_version}/config", summary="Model configuration (one version)")
async def model_config(state: State, model_name: str, model_version: str | None = None) -> dict:
    lane = _lane(state, model_name, model_version)
    return v2_codec.model_config(
        model_name,
        lane.metadata,
        max_batch_size=lane.settings.max_batch_size,
        max_queue_delay_ms=lane.settings.max_queue_delay_ms,
        on_gpu=lane.engine.on_gpu,
    )


@router.get("/models/{model_name}", summary="Model metadata")
@router.get("/models/{model_name}/versions/{model_version}", summary="Model metadata (one version)")
async def model_metadata(state: State, model_name: str, model_version: str | None = None) -> dict:
    lane = _lane(state, model_name, model_version)
    return v2_codec.model_metadata(model_name, lane.metadata, _ready_versions(state, model_name))


@router.get("/models/{model_name}/ready", summary="Model readiness", **_EMPTY_HEALTH)
@router.get(
    "/models/{model_name}/versions/{model_version}/ready", summary="Model readiness (one version)", **_EMPTY_HEALTH
)
async def model_ready(state: State, model_name: str, model_version: str | None = None) -> Response:
    try:
        _lane(state, model_name, model_version)
    except NotReady:  # known, still loading
        return _health(False)
    return _health(state.serving)


_INFER_OPENAPI = {
    "requestBody": {
        "required": True,
        "description": (
            "An inference request: JSON, or with the binary tensor extension JSON followed by binary "
            "tensors (header Inference-Header-Content-Length gives the JSON's length)."
        ),
        "content": {
            "application/json": {
                "schema": {"type": "object", "required": ["inputs"]},
                "example": {
                    "inputs": [{"name": "images", "shape": [1], "datatype": "BYTES", "data": ["<base64 JPEG>"]}],
                    "outputs": [{"name": "probabilities", "parameters": {"classification": 5}}],
                },
            },
            _OCTET_STREAM: {"schema": {"type": "string", "format": "binary"}},
        },
    }
}


@router.post("/models/{model_name}/infer", summary="Inference", openapi_extra=_INFER_OPENAPI)
@router.post(
    "/models/{model_name}/versions/{model_version}/infer",
    summary="Inference (one version)",
    openapi_extra=_INFER_OPENAPI,
)
async def infer(request: Request, state: ReadyState, model_name: str, model_version: str | None = None) -> Response:
    async with state.models.lease(model_name, _version(model_name, model_version)) as lane:
        return await _infer(request, state, lane)


async def _infer(request: Request, state: ServiceState, lane: ModelLane) -> Response:
    settings = state.settings
    body = await request.body()  # bounded by the middleware
    encoding = request.headers.get("content-encoding", "identity").strip().lower()
    length_header = request.headers.get(v2_codec.HEADER_LENGTH_HEADER)

    def parse() -> v2_codec.InferRequest:
        inflated = _inflate(body, encoding, settings.max_upload_bytes)
        header_length = v2_codec.parse_header_length(length_header, len(inflated))
        return v2_codec.parse_infer_request(
            inflated,
            header_length,
            image_size=lane.metadata.preprocessing.image_size,
            max_batch=settings.max_batch_images,
        )

    # Inflating and parsing are CPU work (milliseconds per image, more for hostile bodies): off the event loop.
    parsed = await asyncio.get_running_loop().run_in_executor(state.preprocess_pool, parse)
    deadline = state.deadline()
    if parsed.timeout_us is not None:  # the client's own deadline (Triton's "timeout"), if sooner
        deadline = min(deadline, time.monotonic() + parsed.timeout_us / 1e6)

    gone = client_gone(request)
    # Every element goes through the batcher on its own, like /v1 images: they batch with each
    # other and with concurrent requests.
    if parsed.images is not None:
        decodes = request_decodes(state, deadline, gone)  # one pixel budget and decode share for all elements

        async def classify_image(i: int, data: bytes) -> np.ndarray:
            try:
                logits, _ = await classify_bytes(
                    state, data, deadline=deadline, client_gone=gone, lane=lane, decodes=decodes
                )
            except ServiceError as exc:
                exc.message = f"input '{v2_codec.IMAGES_INPUT}' element {i}: {exc.message}"
                raise
            return logits

        jobs = [classify_image(i, data) for i, data in enumerate(parsed.images)]
    else:
        assert parsed.pixel_values is not None  # the codec sets exactly one of images / pixel_values
        jobs = [
            classify_pixels(state, pixels, deadline=deadline, client_gone=gone, lane=lane)
            for pixels in parsed.pixel_values
        ]
    logits = np.stack(await _all_or_nothing(jobs))  # (N, K)

    content, json_length = v2_codec.build_infer_response(
        model_name=lane.name,
        request=parsed,
        logits=logits,
        labels=lane.metadata.labels,
        model_version=str(lane.version),
    )
    if json_length is None:
        return Response(content, media_type="application/json")
    return Response(content, media_type=_OCTET_STREAM, headers={v2_codec.HEADER_LENGTH_HEADER: str(json_length)})


async def _all_or_nothing(jobs: Sequence[Awaitable[np.ndarray]]) -> list[np.ndarray]:
    """Run every job concurrently (they batch together); on the first failure cancel the rest.

    A v2 response has no per-element errors, so one bad element fails the request: the others'
    queued work is withdrawn (the batcher skips cancelled items) instead of being computed for nothing.
    """
    tasks = [asyncio.ensure_future(job) for job in jobs]
    try:
        done, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        for task in tasks:  # in element order, so the error names the first bad element that failed
            failure = task.exception() if task.done() else None
            if failure is not None:
                raise failure
        return [task.result() for task in tasks]
    finally:
        for task in tasks:
            task.cancel()


_DECODERS = {"gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}  # deflate = zlib stream (RFC 9110)


def _inflate(body: bytes, encoding: str, limit: int) -> bytes:
    """The body decompressed (tritonclient may gzip/deflate it), at most ``limit`` bytes.

    The body itself is bounded by the middleware (service/http/middleware.py); a compressed body is
    inflated here with the same cap, so a small "zip bomb" cannot exhaust memory.
    """
    if encoding == "identity":
        return body
    if encoding not in _DECODERS:
        raise BadRequest(f"unsupported Content-Encoding {encoding!r}; send identity, gzip or deflate")
    decoder = zlib.decompressobj(_DECODERS[encoding])
    try:
        inflated = decoder.decompress(body, limit + 1)
    except zlib.error as exc:
        raise BadRequest(f"request body is not valid {encoding} data: {exc}") from None
    if len(inflated) > limit:
        raise PayloadTooLarge(f"decompressed request body is over the limit of {limit} bytes")
    if not decoder.eof:
        raise BadRequest(f"request body is truncated {encoding} data")
    return inflated
