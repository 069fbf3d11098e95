"""The Open Inference Protocol (KServe v2) wire format for an image classifier, as pure functions.

Parses and validates ``POST /v2/models/{name}/infer`` bodies and builds their responses; no HTTP
framework, no model. What this model accepts and returns:

- input ``images``: BYTES, shape [N] (or [N, 1]), one encoded image (JPEG, PNG...) per element.
  In JSON each element is the image's base64 text (raw image bytes are not UTF-8 and JSON
  strings must be); with Triton's binary tensor extension each element is the raw bytes,
  prefixed by its 4-byte little-endian length, as ``tritonclient`` serialises BYTES tensors.
- input ``pixel_values``: FP32, shape [N, 3, H, W], already pre-processed (resized, cropped,
  normalised as the model's metadata says), as JSON numbers (flat or nested, row-major) or
  binary little-endian float32.
- outputs ``logits`` and ``probabilities`` (softmax of the logits): FP32 [N, K]; or, with
  Triton's classification extension (output parameter ``classification: k``), BYTES [N, k] of
  ``"score:index:label"`` strings, score formatted as C++ ``std::to_string`` does (``%f``),
  highest score first, exactly as Triton formats them.

Binary tensor data extension (what ``tritonclient.http`` uses by default): when the request has
an ``Inference-Header-Content-Length`` header, the JSON header is that many bytes and the binary
tensors follow in input order, each input saying its size in ``parameters.binary_data_size``.
Outputs asked for with ``parameters.binary_data: true`` (or every output, with the request
parameter ``binary_data_output: true``) are returned the same way.

Every malformed request raises ``V2ProtocolError`` with a message naming the offending field;
the route answers it 400 with the protocol's ``{"error": "<message>"}`` body.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from service.core.errors import BadRequest
from service.core.metadata import ModelMetadata
from service.http.json_body import JsonBounds, parse_json
from service.runtime.postprocess import softmax

IMAGES_INPUT = "images"
PIXELS_INPUT = "pixel_values"
LOGITS_OUTPUT = "logits"
PROBABILITIES_OUTPUT = "probabilities"
OUTPUT_NAMES = (LOGITS_OUTPUT, PROBABILITIES_OUTPUT)
MODEL_VERSION = "1"  # the version of a model served from one file (--model)
PLATFORM = "onnxruntime_onnx"  # Triton's name for ONNX Runtime models
EXTENSIONS = ("classification", "binary_tensor_data", "model_repository", "model_configuration", "statistics")
HEADER_LENGTH_HEADER = "Inference-Header-Content-Length"

_LENGTH_PREFIX = struct.Struct("<I")  # BYTES elements: uint32 little-endian length, then the bytes


_MAX_TIMEOUT_US = 2**64 - 1  # Triton's request timeout is a uint64 of microseconds


class V2ProtocolError(BadRequest):
    """The request does not follow the protocol or does not fit this model; answered 400."""


@dataclass(frozen=True)
class RequestedOutput:
    """One entry of the request's ``outputs``.

    Args:
        name: ``logits`` or ``probabilities``.
        binary: return the data as a binary section after the JSON header, not as JSON numbers.
        class_count: > 0 to return the top-``class_count`` "score:index:label" strings instead.
    """

    name: str
    binary: bool = False
    class_count: int = 0


@dataclass(frozen=True)
class InferRequest:
    """A validated infer request: exactly one of ``images`` / ``pixel_values`` is set."""

    id: str | None
    outputs: tuple[RequestedOutput, ...]
    images: tuple[bytes, ...] | None = None
    pixel_values: np.ndarray | None = None  # (N, 3, H, W) float32
    timeout_us: int | None = None  # the client's deadline (Triton's request parameter "timeout")

    @property
    def batch_size(self) -> int:
        return len(self.images) if self.images is not None else int(self.pixel_values.shape[0])


# --- metadata --------------------------------------------------------------------------------


def server_metadata(name: str, version: str) -> dict:
    """Body of ``GET /v2``."""
    return {"name": name, "version": version, "extensions": list(EXTENSIONS)}


def model_metadata(model_name: str, metadata: ModelMetadata, versions: Sequence[str] = (MODEL_VERSION,)) -> dict:
    """Body of ``GET /v2/models/{name}``: the two accepted inputs and the outputs, -1 = any batch size."""
    size = metadata.preprocessing.image_size
    k = metadata.num_classes
    return {
        "name": model_name,
        "versions": list(versions),
        "platform": PLATFORM,
        "inputs": [
            {"name": IMAGES_INPUT, "datatype": "BYTES", "shape": [-1]},
            {"name": PIXELS_INPUT, "datatype": "FP32", "shape": [-1, 3, size, size]},
        ],
        "outputs": [
            {"name": LOGITS_OUTPUT, "datatype": "FP32", "shape": [-1, k]},
            {"name": PROBABILITIES_OUTPUT, "datatype": "FP32", "shape": [-1, k]},
        ],
    }


def model_config(
    model_name: str, metadata: ModelMetadata, *, max_batch_size: int, max_queue_delay_ms: float, on_gpu: bool
) -> dict:
    """Body of ``GET /v2/models/{name}/config``: Triton's model configuration (its protobuf as JSON).

    With ``max_batch_size`` > 0 Triton's ``dims`` leave out the batch axis. Pre-processing travels as
    string ``parameters`` (``vitserve.image_size`` ...), as Triton models carry their own settings.
    """
    size = metadata.preprocessing.image_size
    k = metadata.num_classes
    described = {key: value for key, value in metadata.to_props().items() if not key.endswith(".labels")}
    return {
        "name": model_name,
        "platform": PLATFORM,
        "backend": "onnxruntime",
        "max_batch_size": max_batch_size,
        "input": [
            # One encoded image per batch element: Triton writes a scalar per element as dims [1] + reshape [].
            {"name": IMAGES_INPUT, "data_type": "TYPE_STRING", "dims": [1], "reshape": {"shape": []}},
            {"name": PIXELS_INPUT, "data_type": "TYPE_FP32", "format": "FORMAT_NCHW", "dims": [3, size, size]},
        ],
        "output": [
            {"name": LOGITS_OUTPUT, "data_type": "TYPE_FP32", "dims": [k]},
            {"name": PROBABILITIES_OUTPUT, "data_type": "TYPE_FP32", "dims": [k]},
        ],
        "dynamic_batching": {"max_queue_delay_microseconds": int(max_queue_delay_ms * 1000)},
        "instance_group": [{"name": f"{model_name}_0", "kind": "KIND_GPU" if on_gpu else "KIND_CPU", "count": 1}],
        "parameters": {key: {"string_value": value} for key, value in sorted(described.items())},
    }


# --- requests --------------------------------------------------------------------------------


def parse_header_length(value: str | None, body_length: int) -> int | None:
    """Validate the ``Inference-Header-Content-Length`` header; None when the body is all JSON."""
    if value is None:
        return None
    try:
        length = int(value)
    except ValueError:
        raise V2ProtocolError(f"{HEADER_LENGTH_HEADER} must be an integer, got {value!r}") from None
    if not 0 < length <= body_length:
        raise V2ProtocolError(f"{HEADER_LENGTH_HEADER}={length} but the body has {body_length} bytes")
    return length


def parse_infer_request(body: bytes, header_length: int | None, *, image_size: int, max_batch: int) -> InferRequest:
    """Parse and validate an infer request body.

    Args:
        body: the whole HTTP body (already decompressed).
        header_length: the ``Inference-Header-Content-Length`` value (see ``parse_header_length``),
            or None when the body is only JSON.
        image_size: the model's input side; ``pixel_values`` must be [N, 3, image_size, image_size].
        max_batch: most images (N) one request may carry.
    """
    json_end = len(body) if header_length is None else header_length
    try:
        header = parse_json(body[:json_end], infer_json_bounds(image_size, max_batch), "request body")
    except BadRequest as exc:  # too many elements stays a 413 (PayloadTooLarge is no BadRequest)
        raise V2ProtocolError(exc.message) from None
    if not isinstance(header, dict):
        raise V2ProtocolError("request body must be a JSON object")

    request_id = header.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise V2ProtocolError("'id' must be a string")
    parameters = _parameters(header, "request")
    timeout_us = parameters.get("timeout")
    if timeout_us is not None and (not _is_int(timeout_us) or not 0 < timeout_us <= _MAX_TIMEOUT_US):
        shown = (
            repr(timeout_us)
            if len(repr(timeout_us)) <= 40
            else f"{repr(timeout_us)[:20]}... ({len(repr(timeout_us))} characters)"
        )
        raise V2ProtocolError(
            f"request parameter 'timeout' must be a positive integer of microseconds up to 2**64 - 1 "
            f"(Triton's uint64), got {shown}"
        )

    inputs = header.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise V2ProtocolError("'inputs' must be a non-empty list")
    tensors = _split_binary(inputs, body[json_end:])
    if len(tensors) != 1:
        names = [t[0].get("name") for t in tensors]
        raise V2ProtocolError(f"send exactly one input, '{IMAGES_INPUT}' or '{PIXELS_INPUT}'; got {names}")
    spec, raw = tensors[0]

    name = spec["name"]
    if name == IMAGES_INPUT:
        images = _parse_images(spec, raw)
        _check_batch(len(images), max_batch)
        pixels = None
    elif name == PIXELS_INPUT:
        pixels = _parse_pixels(spec, raw, image_size)
        _check_batch(pixels.shape[0], max_batch)
        images = None
    else:
        raise V2ProtocolError(
            f"unknown input '{name}'; this model takes '{IMAGES_INPUT}' (BYTES) or '{PIXELS_INPUT}' (FP32)"
        )

    outputs = _parse_outputs(header.get("outputs"), default_binary=bool(parameters.get("binary_data_output", False)))
    return InferRequest(id=request_id, outputs=outputs, images=images, pixel_values=pixels, timeout_us=timeout_us)


def infer_json_bounds(image_size: int, max_batch: int) -> JsonBounds:
    """Twice what the JSON of a valid infer request can hold (at most ``max_batch`` images as FP32
    [N, 3, S, S] data, nested or flat, plus a few objects for inputs, outputs and parameters): a
    coarse bound on memory, so that a request a little over the batch limit gets the exact message."""
    return JsonBounds(
        max_objects=256,
        max_arrays=2 * max_batch * (3 * image_size + 4) + 256,
        max_values=2 * max_batch * 3 * image_size * image_size + 1024,
    )


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _parameters(obj: dict, where: str) -> dict:
    parameters = obj.get("parameters", {})
    if not isinstance(parameters, dict):
        raise V2ProtocolError(f"{where} 'parameters' must be a JSON object")
    if any(key.startswith("shared_memory_") for key in parameters):
        raise V2ProtocolError(f"{where}: shared memory is not supported by this server; send the data in the request")
    return parameters


def _split_binary(inputs: list, binary: bytes) -> list[tuple[dict, bytes | None]]:
    """Pair each input spec with its slice of the binary section (None for JSON data)."""
    tensors = []
    offset = 0
    for position, spec in enumerate(inputs):
        if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
            raise V2ProtocolError(f"inputs[{position}] must be an object with a string 'name'")
        name = spec["name"]
        size = _parameters(spec, f"input '{name}'").get("binary_data_size")
        if size is None:
            if "data" not in spec:
                raise V2ProtocolError(f"input '{name}' has neither 'data' nor parameters.binary_data_size")
            tensors.append((spec, None))
            continue
        if "data" in spec:
            raise V2ProtocolError(f"input '{name}' has both 'data' and parameters.binary_data_size")
        if not _is_int(size) or size < 0:
            raise V2ProtocolError(f"input '{name}': binary_data_size must be a non-negative integer, got {size!r}")
        if offset + size > len(binary):
            raise V2ProtocolError(
                f"input '{name}': binary_data_size={size} but only {len(binary) - offset} binary bytes "
                "are left in the body"
            )
        tensors.append((spec, binary[offset : offset + size]))
        offset += size
    if offset != len(binary):
        raise V2ProtocolError(
            f"the body has {len(binary) - offset} binary bytes after the JSON header that no input's "
            "binary_data_size accounts for"
        )
    return tensors


def _shape(spec: dict) -> list[int]:
    shape = spec.get("shape")
    if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
        raise V2ProtocolError(f"input '{spec['name']}': 'shape' must be a list of non-negative integers, got {shape!r}")
    return shape


def _check_datatype(spec: dict, expected: str) -> None:
    if spec.get("datatype") != expected:
        raise V2ProtocolError(f"input '{spec['name']}' must have datatype {expected}, got {spec.get('datatype')!r}")


def _check_batch(n: int, max_batch: int) -> None:
    if n < 1:
        raise V2ProtocolError("the batch is empty: send at least one image")
    if n > max_batch:
        raise V2ProtocolError(f"{n} images in one request; this server takes at most {max_batch}")


def _parse_images(spec: dict, raw: bytes | None) -> tuple[bytes, ...]:
    _check_datatype(spec, "BYTES")
    shape = _shape(spec)
    if len(shape) == 2 and shape[1] == 1:
        shape = shape[:1]  # [N, 1] is Triton's usual layout for one string per batch item
    if len(shape) != 1:
        raise V2ProtocolError(
            f"input '{IMAGES_INPUT}' must have shape [N] (one encoded image per element), got {spec['shape']}"
        )
    n = shape[0]
    if raw is not None:
        images = deserialize_bytes(raw, IMAGES_INPUT)
    else:
        elements = _flatten(spec["data"], IMAGES_INPUT)
        images = []
        for i, element in enumerate(elements):
            if not isinstance(element, str):
                raise V2ProtocolError(
                    f"input '{IMAGES_INPUT}' element {i}: expected a base64 string, got {type(element).__name__}"
                )
            try:
                images.append(base64.b64decode(element, validate=True))
            except (binascii.Error, ValueError) as exc:
                raise V2ProtocolError(f"input '{IMAGES_INPUT}' element {i} is not valid base64: {exc}") from None
    if len(images) != n:
        raise V2ProtocolError(f"input '{IMAGES_INPUT}' has shape {spec['shape']} but carries {len(images)} elements")
    return tuple(images)


def _parse_pixels(spec: dict, raw: bytes | None, image_size: int) -> np.ndarray:
    _check_datatype(spec, "FP32")
    shape = _shape(spec)
    expected = [3, image_size, image_size]
    if len(shape) != 4 or shape[1:] != expected:
        raise V2ProtocolError(f"input '{PIXELS_INPUT}' must have shape [N, 3, {image_size}, {image_size}], got {shape}")
    count = math.prod(shape)
    if raw is not None:
        if len(raw) != count * 4:
            raise V2ProtocolError(
                f"input '{PIXELS_INPUT}': shape {shape} needs {count * 4} bytes of FP32, "
                f"got binary_data_size={len(raw)}"
            )
        pixels = np.frombuffer(raw, dtype="<f4").astype(np.float32, copy=True)  # copy: frombuffer is read-only
    else:
        try:
            values = np.asarray(spec["data"])
        except ValueError as exc:  # ragged nested lists
            raise V2ProtocolError(f"input '{PIXELS_INPUT}': 'data' is not a regular array: {exc}") from None
        if values.dtype.kind not in "iuf":  # strings, booleans, objects: not FP32 data
            raise V2ProtocolError(f"input '{PIXELS_INPUT}': 'data' must hold only numbers")
        if values.size != count:
            raise V2ProtocolError(
                f"input '{PIXELS_INPUT}' has shape {shape} ({count} values) but 'data' holds {values.size}"
            )
        pixels = values.astype(np.float32)
    if not np.isfinite(pixels).all():
        raise V2ProtocolError(f"input '{PIXELS_INPUT}' holds NaN or infinite values")
    return pixels.reshape(shape)  # (N, 3, H, W)


def _flatten(data: Any, name: str) -> list:
    """Row-major flattening of nested JSON lists (the protocol allows flat or nested data)."""
    if not isinstance(data, list):
        raise V2ProtocolError(f"input '{name}': 'data' must be a list")
    flat: list = []
    stack = [iter(data)]
    while stack:
        for item in stack[-1]:
            if isinstance(item, list):
                stack.append(iter(item))
                break
            flat.append(item)
        else:
            stack.pop()
    return flat


def deserialize_bytes(raw: bytes, name: str) -> list[bytes]:
    """Split a binary BYTES tensor: each element is a uint32 little-endian length, then its bytes."""
    elements = []
    offset = 0
    while offset < len(raw):
        if offset + 4 > len(raw):
            raise V2ProtocolError(f"input '{name}': binary BYTES data ends inside an element's 4-byte length prefix")
        (size,) = _LENGTH_PREFIX.unpack_from(raw, offset)
        offset += 4
        if offset + size > len(raw):
            raise V2ProtocolError(
                f"input '{name}': element {len(elements)} claims {size} bytes but only {len(raw) - offset} remain"
            )
        elements.append(raw[offset : offset + size])
        offset += size
    return elements


def serialize_bytes(elements: list[bytes]) -> bytes:
    """The inverse of ``deserialize_bytes``: length-prefixed elements, concatenated row-major."""
    return b"".join(_LENGTH_PREFIX.pack(len(e)) + e for e in elements)


def _parse_outputs(outputs: Any, default_binary: bool) -> tuple[RequestedOutput, ...]:
    if outputs is None:  # the protocol: no 'outputs' means every output, with default settings
        return tuple(RequestedOutput(name, binary=default_binary) for name in OUTPUT_NAMES)
    if not isinstance(outputs, list) or not outputs:
        raise V2ProtocolError("'outputs' must be a non-empty list when present")
    parsed = []
    for position, spec in enumerate(outputs):
        if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
            raise V2ProtocolError(f"outputs[{position}] must be an object with a string 'name'")
        name = spec["name"]
        if name not in OUTPUT_NAMES:
            raise V2ProtocolError(f"unknown output '{name}'; this model returns {', '.join(map(repr, OUTPUT_NAMES))}")
        if any(p.name == name for p in parsed):
            raise V2ProtocolError(f"output '{name}' is requested twice")
        parameters = _parameters(spec, f"output '{name}'")
        binary = parameters.get("binary_data", default_binary)
        if not isinstance(binary, bool):
            raise V2ProtocolError(f"output '{name}': binary_data must be true or false, got {binary!r}")
        class_count = parameters.get("classification", 0)
        if not _is_int(class_count) or class_count < 0:
            raise V2ProtocolError(
                f"output '{name}': classification must be a non-negative integer, got {class_count!r}"
            )
        parsed.append(RequestedOutput(name, binary=binary, class_count=class_count))
    return tuple(parsed)


# --- responses -------------------------------------------------------------------------------


def classification_strings(scores: np.ndarray, labels: tuple[str, ...], class_count: int) -> list[list[str]]:
    """Triton's classification extension: per row, the top ``class_count`` as "score:index:label".

    Triton sorts by score (highest first), keeps min(class_count, K) and prints the score with
    ``std::to_string``, i.e. printf's ``%f``; ties keep the lower index first here (Triton's
    unstable sort leaves their order unspecified).
    """
    k = min(class_count, scores.shape[-1])
    order = np.argsort(-scores, axis=-1, kind="stable")[:, :k]  # (N, k)
    rows = []
    for row_scores, row_order in zip(scores, order, strict=True):
        row = []
        for index in row_order.tolist():
            text = f"{float(row_scores[index]):f}:{index}"
            if index < len(labels):
                text += f":{labels[index]}"
            row.append(text)
        rows.append(row)
    return rows


def build_infer_response(
    *,
    model_name: str,
    request: InferRequest,
    logits: np.ndarray,
    labels: tuple[str, ...],
    model_version: str = MODEL_VERSION,
) -> tuple[bytes, int | None]:
    """Encode the response for ``request`` given the model's logits (N, K).

    Returns the body and, when any output travels as binary data, the JSON header's length (to
    send as ``Inference-Header-Content-Length``); None when the body is only JSON.
    """
    logits = np.ascontiguousarray(logits, dtype=np.float32)
    values = {LOGITS_OUTPUT: logits}
    if any(o.name == PROBABILITIES_OUTPUT for o in request.outputs):
        values[PROBABILITIES_OUTPUT] = softmax(logits).astype(np.float32)  # the /v1 probabilities, as FP32

    outputs = []
    binary_sections = []
    for requested in request.outputs:
        scores = values[requested.name]
        if requested.class_count > 0:
            rows = classification_strings(scores, labels, requested.class_count)
            entry = {"name": requested.name, "datatype": "BYTES", "shape": [len(rows), len(rows[0])]}
            flat = [s for row in rows for s in row]
            if requested.binary:
                section = serialize_bytes([s.encode("utf-8") for s in flat])
            else:
                entry["data"] = flat
        else:
            entry = {"name": requested.name, "datatype": "FP32", "shape": list(scores.shape)}
            if requested.binary:
                section = scores.astype("<f4").tobytes()  # row-major, little-endian as the extension requires
            else:
                entry["data"] = scores.ravel().tolist()  # float32 -> float64 -> JSON round-trips exactly
        if requested.binary:
            entry["parameters"] = {"binary_data_size": len(section)}
            binary_sections.append(section)
        outputs.append(entry)

    response: dict = {"model_name": model_name, "model_version": model_version, "outputs": outputs}
    if request.id is not None:
        response["id"] = request.id
    header = json.dumps(response, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    if not binary_sections:
        return header, None
    return header + b"".join(binary_sections), len(header)
