"""The /v1 JSON API (classify one image, classify a batch, describe the model) and health routes."""

from __future__ import annotations

import asyncio
import base64
import binascii
import time
from typing import Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, Field
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from service.core.errors import BadRequest, InvalidImage, PayloadTooLarge, ServiceError, UnsupportedMediaType
from service.core.repository import version_number
from service.http.deps import ReadyState, State, client_gone, media_type
from service.http.json_body import JsonBounds, parse_json_off_loop
from service.runtime.postprocess import top_k as top_k_of
from service.serving.cache import CacheKey, image_digest
from service.serving.inference import classify_bytes, request_decodes
from service.serving.registry import ModelLane, VersionState
from service.serving.state import ServiceState

router = APIRouter(prefix="/v1", tags=["v1"])
health_router = APIRouter(tags=["health"])

IMAGE_TYPES = (
    "image/jpeg",
    "image/jpg",
    "image/pjpeg",
    "image/png",
    "image/webp",
    "image/gif",
    "image/bmp",
    "image/x-ms-bmp",
    "image/tiff",
    "application/octet-stream",
)
_ACCEPTED = "image/jpeg, image/png, image/webp, image/gif, image/bmp, image/tiff or multipart/form-data"


# Response schemas, for the OpenAPI docs: routes return JSONResponse directly (no per-request
# validation of what we built ourselves), FastAPI documents these shapes.
class Prediction(BaseModel):
    index: int = Field(description="class index into the model's labels")
    label: str
    probability: float = Field(description="softmax probability (computed in float64)")


class TimingMs(BaseModel):
    queue: float = Field(description="waiting in the batcher queue")
    preprocess: float = Field(description="decode + resize + normalise")
    inference: float = Field(description="the engine run of the batch this image was in")
    total: float = Field(description="request received to answer built")


class ClassifyResponse(BaseModel):
    model: str = Field(description="the served model's name (--name, else its architecture)")
    predictions: list[Prediction]
    timing_ms: TimingMs


class ErrorDetail(BaseModel):
    code: str = Field(description="short snake_case error code, e.g. invalid_image")
    message: str = Field(description="what was wrong, naming the offending input")


class ErrorResponse(BaseModel):
    error: ErrorDetail


class BatchItem(BaseModel):
    id: str = Field(description="the client's id (JSON) or the file name (multipart)")
    predictions: list[Prediction] | None = None
    error: ErrorDetail | None = None


class BatchResponse(BaseModel):
    model: str
    results: list[BatchItem] = Field(description="one per image, in request order")
    timing_ms: TimingMs = Field(description="per stage: the slowest image; total: the whole request")


_ERRORS = {code: {"model": ErrorResponse} for code in (400, 401, 413, 415, 422, 429, 503, 504)}

# The bodies are read by hand (raw image bytes or multipart, streamed under the byte limit), so
# FastAPI cannot infer them; describe them for /docs.
_BINARY = {"schema": {"type": "string", "format": "binary"}}
_CLASSIFY_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            **{t: _BINARY for t in ("image/jpeg", "image/png", "image/webp", "image/gif", "image/bmp", "image/tiff")},
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["file"],
                    "properties": {"file": {"type": "string", "format": "binary"}},
                }
            },
        },
    }
}
_BATCH_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["files"],
                    "properties": {"files": {"type": "array", "items": {"type": "string", "format": "binary"}}},
                }
            },
            "application/json": {
                "schema": {
                    "type": "object",
                    "required": ["images"],
                    "properties": {
                        "images": {
                            "type": "array",
                            "items": {
                                "type": "object",
                                "required": ["data"],
                                "properties": {
                                    "id": {"type": "string"},
                                    "data": {"type": "string", "description": "base64 (or a data: URL)"},
                                },
                            },
                        },
                        "top_k": {"type": "integer", "default": 5},
                    },
                }
            },
        },
    }
}


def _check_top_k(state: ServiceState, lane: ModelLane, top_k: int) -> int:
    limit = state.settings.max_top_k
    if not 1 <= top_k <= limit:
        raise BadRequest(f"top_k must be between 1 and {limit}, got {top_k}")
    return min(top_k, lane.metadata.num_classes)  # asking for more classes than exist returns them all


def _version(version: str | None) -> int | None:
    if version is None:
        return None
    number = version_number(version)
    if number is None:
        raise BadRequest(f"model version must be a positive integer, got {version!r}")
    return number


async def _form(request: Request, max_files: int):
    """Parse a multipart body, turning Starlette's errors into ours (with the problem named)."""
    try:
        # max_files bounds what gets spooled: one more than allowed, so that we can say "too many".
        return await request.form(max_files=max_files + 1, max_fields=max_files + 16)
    except StarletteHTTPException as exc:
        if "too many files" in str(exc.detail).lower():
            raise PayloadTooLarge(f"too many images: more than max_batch_images={max_files}") from None
        raise BadRequest(f"malformed multipart body: {exc.detail}") from None


async def _upload_bytes(upload: Any, field: str) -> bytes:
    if not isinstance(upload, UploadFile):
        raise BadRequest(f"multipart field {field!r} must be a file upload, got a plain text field")
    return await upload.read()


_CLASSIFY_ROUTE: dict[str, Any] = {
    "summary": "Classify one image",
    "description": "Send the image as the raw body (Content-Type image/jpeg, png, webp, gif, bmp, tiff) "
    "or as multipart/form-data field `file`. Returns the top-k classes.",
    "response_model": ClassifyResponse,
    "responses": _ERRORS,
    "openapi_extra": _CLASSIFY_BODY,
}
_TOP_K = Query(5, description="how many classes to return")


@router.post("/classify", **_CLASSIFY_ROUTE)
async def classify(request: Request, state: ReadyState, top_k: int = _TOP_K) -> Response:
    return await _classify(request, state, None, None, top_k)


@router.post("/models/{model_name}/classify", **{**_CLASSIFY_ROUTE, "summary": "Classify one image (one model)"})
async def classify_with_model(request: Request, state: ReadyState, model_name: str, top_k: int = _TOP_K) -> Response:
    return await _classify(request, state, model_name, None, top_k)


@router.post(
    "/models/{model_name}/versions/{model_version}/classify",
    **{**_CLASSIFY_ROUTE, "summary": "Classify one image (one model version)"},
)
async def classify_with_version(
    request: Request, state: ReadyState, model_name: str, model_version: str, top_k: int = _TOP_K
) -> Response:
    return await _classify(request, state, model_name, _version(model_version), top_k)


async def _classify(
    request: Request, state: ServiceState, model_name: str | None, version: int | None, top_k: int
) -> Response:
    async with state.models.lease(model_name, version) as lane:
        k = _check_top_k(state, lane, top_k)
        deadline = state.deadline()
        data = await _single_image(request)
        key = _cache_key(state, lane, data, k)
        predictions = state.cache.get(key)
        if predictions is not None:
            timing_ms = {"queue": 0.0, "preprocess": 0.0, "inference": 0.0, "total": 0.0}
        else:
            logits, timing_ms = await classify_bytes(
                state, data, deadline=deadline, client_gone=client_gone(request), lane=lane
            )
            predictions = top_k_of(logits, lane.metadata.labels, k)
            state.cache.put(key, predictions)
        return JSONResponse(
            {"model": lane.name, "version": lane.version, "predictions": predictions, "timing_ms": timing_ms}
        )


def _cache_key(state: ServiceState, lane: ModelLane, data: bytes, k: int) -> CacheKey:
    """The response cache's key for one image; without a cache, the image is not hashed (~0.1 ms)."""
    return (lane.name, lane.version, image_digest(data) if state.cache.enabled else "", k)


async def _single_image(request: Request) -> bytes:
    """The one image of a /classify request: the raw body, or multipart field ``file``."""
    content_type = media_type(request)
    if content_type == "multipart/form-data":
        form = await _form(request, max_files=1)
        try:
            if "file" not in form:
                raise BadRequest(f"multipart body needs a file field named 'file' (got fields {sorted(form.keys())})")
            return await _upload_bytes(form["file"], "file")
        finally:
            await form.close()  # spooled temporary files go now, not at garbage collection
    if content_type in IMAGE_TYPES:
        return await request.body()
    raise UnsupportedMediaType(f"Content-Type {content_type or '(none)'!r} is not supported; send {_ACCEPTED}")


def _decode_base64(value: Any, item_id: str) -> bytes:
    if not isinstance(value, str) or not value:
        raise InvalidImage(f"image {item_id!r}: 'data' must be a non-empty base64 string")
    if value.startswith("data:") and "," in value:  # accept data: URLs as browsers produce them
        value = value.split(",", 1)[1]
    try:
        # Line-wrapped base64 (what the `base64` tool prints) is fine; anything else outside the
        # alphabet is an error, not silently skipped.
        return base64.b64decode("".join(value.split()), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise BadRequest(f"image {item_id!r}: invalid base64 ({exc})") from None


def _batch_json_bounds(max_images: int) -> JsonBounds:
    # {"images": [{"id": ..., "data": ...}, ...], "top_k": k}: one object and two values per image; the
    # bounds allow twice the images (so "too many images" gets its exact message) and brackets and
    # commas inside ids and data: URLs.
    return JsonBounds(max_objects=4 * max_images + 16, max_arrays=2 * max_images + 16, max_values=16 * max_images + 64)


async def _batch_inputs(
    request: Request, state: ServiceState
) -> tuple[list[tuple[str, bytes | ServiceError]], int | None]:
    """The request's images as (id, bytes or the error that image has), and the JSON top_k if given."""
    limit = state.settings.max_batch_images
    content_type = media_type(request)
    if content_type == "multipart/form-data":
        form = await _form(request, max_files=limit)
        try:
            uploads = form.getlist("files")
            if not uploads:
                raise BadRequest(
                    f"multipart body needs one or more file fields named 'files' (got {sorted(form.keys())})"
                )
            if len(uploads) > limit:
                raise PayloadTooLarge(f"too many images: {len(uploads)} > max_batch_images={limit}")
            items: list[tuple[str, bytes | ServiceError]] = []
            for i, upload in enumerate(uploads):
                item_id = getattr(upload, "filename", None) or str(i)
                items.append((item_id, await _upload_bytes(upload, "files")))
            return items, None
        finally:
            await form.close()
    if content_type != "application/json":
        raise UnsupportedMediaType(
            f"Content-Type {content_type or '(none)'!r} is not supported here; send "
            "multipart/form-data with 'files' or application/json with 'images'"
        )
    body = await parse_json_off_loop(await request.body(), _batch_json_bounds(limit), "JSON body")
    if not isinstance(body, dict) or not isinstance(body.get("images"), list) or not body["images"]:
        raise BadRequest('JSON body must be {"images": [{"id": str, "data": base64}, ...], "top_k": int}')
    images = body["images"]
    if len(images) > limit:
        raise PayloadTooLarge(f"too many images: {len(images)} > max_batch_images={limit}")
    top_k = body.get("top_k")
    if top_k is not None and (not isinstance(top_k, int) or isinstance(top_k, bool)):
        raise BadRequest(f"top_k must be an integer, got {top_k!r}")
    items = []
    for i, image in enumerate(images):
        item_id = str(image.get("id", i)) if isinstance(image, dict) else str(i)
        try:
            if not isinstance(image, dict):
                raise BadRequest(f"image {i}: expected an object with 'id' and 'data'")
            items.append((item_id, _decode_base64(image.get("data"), item_id)))
        except ServiceError as exc:
            items.append((item_id, exc))
    return items, top_k


_BATCH_ROUTE: dict[str, Any] = {
    "summary": "Classify many images in one request",
    "description": 'multipart/form-data with many `files`, or JSON `{"images": [{"id": str, "data": base64}], '
    '"top_k": 5}`. Every image goes through the batcher concurrently and gets its own result or '
    "its own error; one bad image never fails the others.",
    "response_model": BatchResponse,
    "responses": _ERRORS,
    "openapi_extra": _BATCH_BODY,
}
_BATCH_TOP_K = Query(None, description="overrides the JSON top_k")


@router.post("/classify/batch", **_BATCH_ROUTE)
async def classify_batch(request: Request, state: ReadyState, top_k: int | None = _BATCH_TOP_K) -> Response:
    return await _classify_batch(request, state, None, None, top_k)


@router.post("/models/{model_name}/classify/batch", **{**_BATCH_ROUTE, "summary": "Classify many images (one model)"})
async def classify_batch_with_model(
    request: Request, state: ReadyState, model_name: str, top_k: int | None = _BATCH_TOP_K
) -> Response:
    return await _classify_batch(request, state, model_name, None, top_k)


@router.post(
    "/models/{model_name}/versions/{model_version}/classify/batch",
    **{**_BATCH_ROUTE, "summary": "Classify many images (one model version)"},
)
async def classify_batch_with_version(
    request: Request, state: ReadyState, model_name: str, model_version: str, top_k: int | None = _BATCH_TOP_K
) -> Response:
    return await _classify_batch(request, state, model_name, _version(model_version), top_k)


async def _classify_batch(
    request: Request, state: ServiceState, model_name: str | None, version: int | None, top_k: int | None
) -> Response:
    started = time.perf_counter()
    async with state.models.lease(model_name, version) as lane:
        deadline = state.deadline()
        items, json_top_k = await _batch_inputs(request, state)
        k = _check_top_k(state, lane, top_k if top_k is not None else (json_top_k if json_top_k is not None else 5))
        gone = client_gone(request)
        decodes = request_decodes(state, deadline, gone)  # one pixel budget and decode share for all the images

        async def one(item_id: str, data: bytes | ServiceError) -> tuple[dict, dict | None]:
            if isinstance(data, ServiceError):
                return {"id": item_id, "error": data.to_dict()}, None
            key = _cache_key(state, lane, data, k)
            cached = state.cache.get(key)
            if cached is not None:
                return {"id": item_id, "predictions": cached}, None
            try:
                logits, timing = await classify_bytes(
                    state, data, deadline=deadline, client_gone=gone, lane=lane, decodes=decodes
                )
            except ServiceError as exc:
                return {"id": item_id, "error": exc.to_dict()}, None
            predictions = top_k_of(logits, lane.metadata.labels, k)
            state.cache.put(key, predictions)
            return {"id": item_id, "predictions": predictions}, timing

        outcomes = await asyncio.gather(*(one(item_id, data) for item_id, data in items))
    timings = [t for _, t in outcomes if t is not None]
    # Per-stage figures are the slowest image's (what the caller waited for); total is wall time.
    timing_ms = {
        stage: round(max((t[stage] for t in timings), default=0.0), 3) for stage in ("queue", "preprocess", "inference")
    }
    timing_ms["total"] = round((time.perf_counter() - started) * 1000.0, 3)
    return JSONResponse(
        {"model": lane.name, "version": lane.version, "results": [r for r, _ in outcomes], "timing_ms": timing_ms}
    )


def _describe_lane(state: ServiceState, lane: ModelLane) -> dict:
    meta = lane.metadata
    settings = lane.settings
    describe = lane.engine.describe()
    return {
        "name": lane.name,
        "version": lane.version,
        "state": lane.state.value,
        "architecture": meta.architecture,
        "num_classes": meta.num_classes,
        "labels": list(meta.labels),
        "image_size": meta.preprocessing.image_size,
        "preprocessing": meta.summary()["preprocessing"],
        "precision": meta.precision,
        "input_dtype": meta.input_dtype,
        "source": meta.source,
        "providers": describe.get("providers", []),
        "placement": describe.get("placement", {}),
        "spec": describe.get("spec", {}),  # effective value and source (metadata/sidecar/flag/graph/default)
        "ready": state.serving and lane.state is VersionState.READY,
        "batching": {
            "max_batch_size": settings.max_batch_size,
            "max_queue_delay_ms": settings.max_queue_delay_ms,
            "max_queue_size": settings.max_queue_size,
            "request_timeout_s": settings.request_timeout_s,
        },
        "limits": {
            "max_upload_bytes": settings.max_upload_bytes,
            "max_image_pixels": settings.max_image_pixels,
            "max_batch_images": settings.max_batch_images,
            "max_top_k": settings.max_top_k,
        },
    }


def _repository_view(state: ServiceState) -> list[dict]:
    by_model: dict[str, list[dict]] = {}
    for status in state.models.statuses():
        entry = {"version": status.version, "state": status.state.value}
        if status.reason:
            entry["reason"] = status.reason
        by_model.setdefault(status.name, []).append(entry)
    return [
        {"name": name, "current_version": state.models.current.get(name), "versions": versions}
        for name, versions in sorted(by_model.items())
    ]


@router.get("/models", summary="Every model and version with its state; the default model described in full")
async def models(state: State) -> dict:
    # The top level describes the default model's current version (what /v1/classify serves).
    return {
        **_describe_lane(state, state.described_lane()),
        "default_model": state.models.default_model,
        "models": _repository_view(state),
    }


@router.get("/models/{model_name}", summary="One model's current version, described")
async def model_description(state: State, model_name: str) -> dict:
    return _describe_lane(state, state.models.resolve(model_name))


@router.get("/models/{model_name}/versions/{model_version}", summary="One model version, described")
async def model_version_description(state: State, model_name: str, model_version: str) -> dict:
    return _describe_lane(state, state.models.resolve(model_name, _version(model_version)))


@health_router.get("/healthz", summary="Liveness: the process is up")
async def healthz() -> dict:
    return {"status": "ok"}


@health_router.get("/readyz", summary="Readiness: model loaded and warmed up, not draining")
async def readyz(state: State) -> Response:
    if state.draining:
        return JSONResponse({"status": "draining"}, status_code=503, headers={"Retry-After": "1"})
    if not state.ready:
        return JSONResponse({"status": "warming_up"}, status_code=503, headers={"Retry-After": "1"})
    return JSONResponse({"status": "ready"})


@health_router.get("/metrics", summary="Prometheus metrics", response_class=Response)
async def metrics(state: State) -> Response:
    body, content_type = state.metrics.render()
    return Response(body, media_type=content_type)
