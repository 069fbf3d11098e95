"""The v2 codec against the official client's own encoder and decoder (tritonclient.http).

Requests are built exactly as ``InferenceServerClient.infer`` builds them (its
``_get_inference_request``), responses are read back with its ``InferResult``; the score format
of the classification extension is checked against the C library's printf("%f"), which is what
Triton's ``std::to_string`` uses.
"""

from __future__ import annotations

import base64
import ctypes
import ctypes.util
import io
import json

import numpy as np
import pytest
import skimage.data
from PIL import Image
from tritonclient.http import InferInput, InferRequestedOutput, InferResult
from tritonclient.http._utils import _get_inference_request

from service.core.metadata import ModelMetadata, Preprocessing
from service.http.v2 import codec as v2_codec
from service.http.v2.codec import V2ProtocolError

IMAGE_SIZE = 32
LABELS = ("tench", "goldfish", "great white shark", "tiger shark", "hammerhead")


def jpeg(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


@pytest.fixture(scope="module")
def photos() -> list[bytes]:
    return [jpeg(skimage.data.astronaut()), jpeg(skimage.data.coffee()), jpeg(skimage.data.chelsea())]


def client_request(inputs, outputs=None, request_id="", timeout=None) -> tuple[bytes, int | None]:
    """The body and Inference-Header-Content-Length that tritonclient.http would send."""
    return _get_inference_request(
        inputs=inputs,
        request_id=request_id,
        outputs=outputs,
        sequence_id=0,
        sequence_start=False,
        sequence_end=False,
        priority=0,
        timeout=timeout,
        custom_parameters=None,
    )


def parse(body: bytes, header_length: int | None, max_batch: int = 8) -> v2_codec.InferRequest:
    return v2_codec.parse_infer_request(body, header_length, image_size=IMAGE_SIZE, max_batch=max_batch)


def bytes_input(images: list[bytes], binary: bool) -> InferInput:
    inp = InferInput("images", [len(images)], "BYTES")
    if binary:
        inp.set_data_from_numpy(np.array(images, dtype=np.object_), binary_data=True)
    else:  # JSON strings must be UTF-8: the client sends base64 text, which we decode
        inp.set_data_from_numpy(np.array([base64.b64encode(i) for i in images], dtype=np.object_), binary_data=False)
    return inp


@pytest.mark.parametrize("binary", [True, False])
def test_bytes_input_round_trips_the_encoded_photos(photos, binary):
    body, header_length = client_request([bytes_input(photos, binary)], request_id="r-1")
    assert (header_length is not None) == binary
    request = parse(body, header_length)
    assert request.images == tuple(photos)
    assert request.pixel_values is None
    assert request.id == "r-1"
    assert request.batch_size == 3


def test_bytes_input_of_shape_n_by_1_as_triton_models_often_declare(photos):
    inp = InferInput("images", [2, 1], "BYTES")
    inp.set_data_from_numpy(np.array([[photos[0]], [photos[1]]], dtype=np.object_), binary_data=True)
    assert parse(*client_request([inp])).images == (photos[0], photos[1])
    nested = {
        "inputs": [
            {
                "name": "images",
                "shape": [2, 1],
                "datatype": "BYTES",
                "data": [[base64.b64encode(photos[0]).decode()], [base64.b64encode(photos[1]).decode()]],
            }
        ]
    }
    assert parse(json.dumps(nested).encode(), None).images == (photos[0], photos[1])


@pytest.mark.parametrize("binary", [True, False])
def test_fp32_input_round_trips_bit_exact(binary):
    rng = np.random.default_rng(0)
    pixels = rng.standard_normal((2, 3, IMAGE_SIZE, IMAGE_SIZE)).astype(np.float32)
    inp = InferInput("pixel_values", list(pixels.shape), "FP32").set_data_from_numpy(pixels, binary_data=binary)
    request = parse(*client_request([inp], timeout=250_000))
    assert request.pixel_values.dtype == np.float32
    np.testing.assert_array_equal(request.pixel_values, pixels)
    assert request.timeout_us == 250_000


def test_nested_json_data_is_accepted_row_major():
    pixels = np.arange(3 * IMAGE_SIZE * IMAGE_SIZE, dtype=np.float32).reshape(1, 3, IMAGE_SIZE, IMAGE_SIZE)
    header = {
        "inputs": [{"name": "pixel_values", "shape": list(pixels.shape), "datatype": "FP32", "data": pixels.tolist()}]
    }
    request = parse(json.dumps(header).encode(), None)
    np.testing.assert_array_equal(request.pixel_values, pixels)


def test_no_outputs_means_all_outputs_binary_as_the_client_asks():
    pixels = np.zeros((1, 3, IMAGE_SIZE, IMAGE_SIZE), np.float32)
    inp = InferInput("pixel_values", list(pixels.shape), "FP32").set_data_from_numpy(pixels)
    request = parse(*client_request([inp]))  # the client then sets binary_data_output: true
    assert request.outputs == (
        v2_codec.RequestedOutput("logits", binary=True),
        v2_codec.RequestedOutput("probabilities", binary=True),
    )


@pytest.mark.parametrize("binary", [True, False])
def test_response_decodes_with_the_official_client(binary):
    rng = np.random.default_rng(1)
    logits = rng.standard_normal((3, len(LABELS))).astype(np.float32)
    pixels = np.zeros((3, 3, IMAGE_SIZE, IMAGE_SIZE), np.float32)
    inp = InferInput("pixel_values", list(pixels.shape), "FP32").set_data_from_numpy(pixels)
    outputs = [
        InferRequestedOutput("logits", binary_data=binary),
        InferRequestedOutput("probabilities", binary_data=binary),
    ]
    request = parse(*client_request([inp], outputs, request_id="abc"))
    body, header_length = v2_codec.build_infer_response(model_name="m", request=request, logits=logits, labels=LABELS)
    assert (header_length is not None) == binary
    result = InferResult.from_response_body(body, header_length=header_length)
    np.testing.assert_array_equal(result.as_numpy("logits"), logits)
    probs = result.as_numpy("probabilities")
    assert probs.dtype == np.float32 and probs.shape == logits.shape
    expected = np.exp(logits.astype(np.float64)) / np.exp(logits.astype(np.float64)).sum(-1, keepdims=True)
    np.testing.assert_allclose(probs, expected, rtol=1e-6)
    response = result.get_response()
    assert response["model_name"] == "m" and response["model_version"] == "1" and response["id"] == "abc"


def c_printf_f(value: float) -> str:
    """What Triton's std::to_string(float) prints: C's "%f" of the value promoted to double."""
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    buf = ctypes.create_string_buffer(128)
    libc.snprintf(buf, 128, b"%f", ctypes.c_double(value))
    return buf.value.decode()


@pytest.mark.parametrize("binary", [True, False])
def test_classification_extension_matches_tritons_format(binary):
    logits = np.array([[0.5, 3.25, -1e-7, 12345.678, 3.25], [-2.0, -1.0, -3.0, -0.5, -10.0]], dtype=np.float32)
    pixels = np.zeros((2, 3, IMAGE_SIZE, IMAGE_SIZE), np.float32)
    inp = InferInput("pixel_values", list(pixels.shape), "FP32").set_data_from_numpy(pixels)
    request = parse(*client_request([inp], [InferRequestedOutput("logits", binary_data=binary, class_count=3)]))
    body, header_length = v2_codec.build_infer_response(model_name="m", request=request, logits=logits, labels=LABELS)
    result = InferResult.from_response_body(body, header_length=header_length)
    top = result.as_numpy("logits")
    assert top.shape == (2, 3)
    got = [[(s.decode() if isinstance(s, bytes) else s) for s in row] for row in top.tolist()]
    expected = []
    for row in logits:
        order = sorted(range(len(row)), key=lambda i: (-row[i], i))[:3]
        expected.append([f"{c_printf_f(float(row[i]))}:{i}:{LABELS[i]}" for i in order])
    assert got == expected
    assert got[0][0] == "12345.677734:3:tiger shark"  # float32 12345.678 printed as Triton prints it


def test_classification_count_is_capped_at_the_number_of_classes():
    logits = np.arange(5, dtype=np.float32)[None]
    request = v2_codec.InferRequest(
        id=None,
        outputs=(v2_codec.RequestedOutput("probabilities", class_count=99),),
        pixel_values=np.zeros((1, 3, IMAGE_SIZE, IMAGE_SIZE), np.float32),
    )
    body, _ = v2_codec.build_infer_response(model_name="m", request=request, logits=logits, labels=LABELS)
    output = json.loads(body)["outputs"][0]
    assert output["shape"] == [1, 5] and output["datatype"] == "BYTES"
    assert [s.split(":")[1] for s in output["data"]] == ["4", "3", "2", "1", "0"]


def test_model_metadata_describes_inputs_and_outputs():
    meta = ModelMetadata("vit_tiny", LABELS, Preprocessing(IMAGE_SIZE, IMAGE_SIZE, "squash", "bilinear"))
    body = v2_codec.model_metadata("vit_tiny", meta)
    assert body["inputs"][1] == {"name": "pixel_values", "datatype": "FP32", "shape": [-1, 3, IMAGE_SIZE, IMAGE_SIZE]}
    assert body["outputs"][0] == {"name": "logits", "datatype": "FP32", "shape": [-1, len(LABELS)]}
    assert v2_codec.server_metadata("vitserve", "0.1.0")["extensions"] == [
        "classification",
        "binary_tensor_data",
        "model_repository",
        "model_configuration",
        "statistics",
    ]


# --- malformed requests: each names its problem ---------------------------------------------


def raw_request(inputs: list, outputs=None, parameters=None, binary: bytes = b"") -> tuple[bytes, int | None]:
    header = {"inputs": inputs}
    if outputs is not None:
        header["outputs"] = outputs
    if parameters is not None:
        header["parameters"] = parameters
    encoded = json.dumps(header).encode()
    return encoded + binary, (len(encoded) if binary else None)


PIXEL_SHAPE = [1, 3, IMAGE_SIZE, IMAGE_SIZE]


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (
            raw_request([{"name": "images", "shape": [1], "datatype": "BYTES", "data": ["not base64!"]}]),
            "element 0 is not valid base64",
        ),
        (
            raw_request([{"name": "images", "shape": [2], "datatype": "BYTES", "data": ["aGk="]}]),
            "has shape [2] but carries 1 elements",
        ),
        (
            raw_request([{"name": "images", "shape": [1], "datatype": "FP32", "data": [1.0]}]),
            "must have datatype BYTES",
        ),
        (raw_request([{"name": "images", "shape": [1], "datatype": "BYTES", "data": [3]}]), "expected a base64 string"),
        (
            raw_request([{"name": "pixel_values", "shape": [1, 3, 16, 16], "datatype": "FP32", "data": [0.0]}]),
            f"must have shape [N, 3, {IMAGE_SIZE}, {IMAGE_SIZE}], got [1, 3, 16, 16]",
        ),
        (
            raw_request([{"name": "pixel_values", "shape": PIXEL_SHAPE, "datatype": "FP16", "data": [0.0]}]),
            "must have datatype FP32, got 'FP16'",
        ),
        (
            raw_request([{"name": "pixel_values", "shape": PIXEL_SHAPE, "datatype": "FP32", "data": [0.0, 1.0]}]),
            "but 'data' holds 2",
        ),
        (
            raw_request(
                [
                    {
                        "name": "pixel_values",
                        "shape": PIXEL_SHAPE,
                        "datatype": "FP32",
                        "data": ["0"] * (3 * IMAGE_SIZE * IMAGE_SIZE),
                    }
                ]
            ),
            "must hold only numbers",
        ),
        (
            raw_request(
                [
                    {
                        "name": "pixel_values",
                        "shape": PIXEL_SHAPE,
                        "datatype": "FP32",
                        "parameters": {"binary_data_size": 8},
                    }
                ],
                binary=b"\0" * 8,
            ),
            "needs 12288 bytes of FP32",
        ),
        (
            raw_request(
                [
                    {
                        "name": "pixel_values",
                        "shape": PIXEL_SHAPE,
                        "datatype": "FP32",
                        "parameters": {"binary_data_size": 12288},
                    }
                ],
                binary=np.full(3 * IMAGE_SIZE * IMAGE_SIZE, np.nan, np.float32).tobytes(),
            ),
            "NaN or infinite",
        ),
        (
            raw_request(
                [{"name": "images", "shape": [1], "datatype": "BYTES", "parameters": {"binary_data_size": 4}}],
                binary=b"\0" * 6,
            ),
            "2 binary bytes after the JSON header",
        ),
        (
            raw_request(
                [{"name": "images", "shape": [1], "datatype": "BYTES", "parameters": {"binary_data_size": 6}}],
                binary=b"\x09\0\0\0ab",
            ),
            "element 0 claims 9 bytes but only 2 remain",
        ),
        (
            raw_request(
                [{"name": "images", "shape": [1], "datatype": "BYTES", "parameters": {"binary_data_size": 10}}],
                binary=b"\0" * 6,
            ),
            "only 6 binary bytes are left",
        ),
        (
            raw_request([{"name": "input__0", "shape": [1], "datatype": "BYTES", "data": ["aGk="]}]),
            "unknown input 'input__0'",
        ),
        (
            raw_request([{"name": "images", "shape": [1], "datatype": "BYTES", "data": ["aGk="]}] * 2),
            "send exactly one input",
        ),
        (raw_request([{"name": "images", "shape": [1], "datatype": "BYTES"}]), "neither 'data' nor"),
        (
            raw_request(
                [{"name": "images", "shape": [1], "datatype": "BYTES", "data": ["aGk="]}],
                outputs=[{"name": "features"}],
            ),
            "unknown output 'features'",
        ),
        (
            raw_request(
                [{"name": "images", "shape": [1], "datatype": "BYTES", "data": ["aGk="]}],
                outputs=[{"name": "logits", "parameters": {"classification": -1}}],
            ),
            "classification must be",
        ),
        (
            raw_request(
                [{"name": "images", "shape": [1], "datatype": "BYTES", "data": ["aGk="]}],
                outputs=[{"name": "logits"}, {"name": "logits"}],
            ),
            "requested twice",
        ),
        (
            raw_request(
                [
                    {
                        "name": "images",
                        "shape": [1],
                        "datatype": "BYTES",
                        "data": ["aGk="],
                        "parameters": {"shared_memory_region": "r"},
                    }
                ]
            ),
            "shared memory is not supported",
        ),
        (raw_request([{"name": "images", "shape": [9], "datatype": "BYTES", "data": ["aGk="] * 9}]), "at most 8"),
        (raw_request([{"name": "images", "shape": [0], "datatype": "BYTES", "data": []}]), "the batch is empty"),
        (
            raw_request(
                [{"name": "images", "shape": [1], "datatype": "BYTES", "data": ["aGk="]}],
                parameters={"timeout": "soon"},
            ),
            "'timeout' must be a positive integer",
        ),
        ((b"{not json", None), "not valid JSON"),
        ((b"[]", None), "must be a JSON object"),
        (raw_request([]), "'inputs' must be a non-empty list"),
    ],
)
def test_malformed_requests_name_the_problem(body, message):
    with pytest.raises(V2ProtocolError) as info:
        parse(*body)
    assert message in str(info.value)


def test_header_length_is_validated():
    assert v2_codec.parse_header_length(None, 10) is None
    assert v2_codec.parse_header_length("4", 10) == 4
    for bad in ("x", "0", "11", "-1"):
        with pytest.raises(V2ProtocolError, match="Inference-Header-Content-Length"):
            v2_codec.parse_header_length(bad, 10)
