"""The KServe v2 API on a real uvicorn server, driven by the official client (tritonclient.http) unchanged.

References nobody here wrote: the client's own request encoder and response decoder, a direct
ONNX Runtime session on the same file, and the service's /v1 answer for the same photograph.
"""

from __future__ import annotations

import base64
import socket
import threading
import time
from contextlib import contextmanager

import httpx
import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.http as triton
import uvicorn
from tritonclient.utils import InferenceServerException

from service.core.metadata import ModelMetadata
from service.core.settings import Settings
from service.http.app import create_app
from service.runtime.postprocess import softmax
from service.runtime.preprocess import load_pixels

pytestmark = pytest.mark.slow  # real uvicorn servers and a real ONNX model: ~5 s beyond the shared export

IMAGES = ("astronaut", "coffee", "chelsea")
API_KEY = "v2-test-key"
# ONNX Runtime's CPU kernels may sum in another order for another batch size: allow float32 rounding.
ATOL = 1e-5


@contextmanager
def running(app):
    """Serve ``app`` with uvicorn on 127.0.0.1 (a socket bound here: no port race) until ready."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:  # listening at once; ready after the engine's warm-up
            try:
                if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "server did not become ready within 60 s"
            time.sleep(0.05)
        yield url
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()


@pytest.fixture(scope="module")
def server(tiny_onnx):
    settings = Settings(
        model=tiny_onnx,
        max_batch_size=4,
        max_queue_delay_ms=2,
        preprocess_threads=2,
        intra_op_threads=1,
        warmup_batch_sizes="1",
    )
    with running(create_app(settings)) as url:
        yield url


@pytest.fixture(scope="module")
def client(server):
    client = triton.InferenceServerClient(url=server.removeprefix("http://"))
    yield client
    client.close()


@pytest.fixture(scope="module")
def reference(tiny_onnx):
    """(metadata, a direct ONNX Runtime session) for the served file."""
    session = ort.InferenceSession(str(tiny_onnx), providers=["CPUExecutionProvider"])
    metadata = ModelMetadata.from_props(session.get_modelmeta().custom_metadata_map)
    return metadata, session


def server_pixels(data: bytes, metadata: ModelMetadata) -> np.ndarray:
    """Pre-process as the server does with default settings (large JPEGs decoded in draft mode)."""
    return load_pixels(data, metadata.preprocessing, max_pixels=10**8, jpeg_draft=Settings().jpeg_draft)


def run_reference(session, pixels: np.ndarray) -> np.ndarray:
    return session.run(None, {session.get_inputs()[0].name: pixels})[0]


def bytes_input(images: list[bytes], binary: bool) -> triton.InferInput:
    inp = triton.InferInput("images", [len(images)], "BYTES")
    if binary:
        inp.set_data_from_numpy(np.array(images, dtype=np.object_), binary_data=True)
    else:  # JSON strings must be UTF-8: encoded images travel as base64 text
        inp.set_data_from_numpy(np.array([base64.b64encode(i) for i in images], dtype=np.object_), binary_data=False)
    return inp


def parse_classes(row) -> list[tuple[float, int, str]]:
    out = []
    for item in row:
        score, index, label = (item.decode() if isinstance(item, bytes) else item).split(":", 2)
        out.append((float(score), int(index), label))
    return out


def test_health_and_metadata(client, reference):
    metadata, _ = reference
    name = metadata.architecture
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready(name) and client.is_model_ready(name, model_version="1")
    assert not client.is_model_ready("resnet50")
    server_meta = client.get_server_metadata()
    assert server_meta["name"] == "vitserve"
    assert set(server_meta["extensions"]) >= {"classification", "binary_tensor_data"}
    model_meta = client.get_model_metadata(name)
    assert model_meta["name"] == name and model_meta["versions"] == ["1"]
    size = metadata.preprocessing.image_size
    assert {i["name"]: (i["datatype"], i["shape"]) for i in model_meta["inputs"]} == {
        "images": ("BYTES", [-1]),
        "pixel_values": ("FP32", [-1, 3, size, size]),
    }
    assert {o["name"]: (o["datatype"], o["shape"]) for o in model_meta["outputs"]} == {
        "logits": ("FP32", [-1, metadata.num_classes]),
        "probabilities": ("FP32", [-1, metadata.num_classes]),
    }


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_encoded_photos_match_v1_and_onnxruntime(client, server, reference, encode_photo, binary):
    metadata, session = reference
    photos = [encode_photo(name) for name in IMAGES]
    outputs = [
        triton.InferRequestedOutput("logits", binary_data=binary),
        triton.InferRequestedOutput("probabilities", binary_data=binary, class_count=5),
    ]
    result = client.infer(metadata.architecture, [bytes_input(photos, binary)], outputs=outputs, request_id="req-7")
    assert result.get_response()["id"] == "req-7"
    logits = result.as_numpy("logits")
    assert logits.shape == (len(photos), metadata.num_classes) and logits.dtype == np.float32

    pixels = np.stack([server_pixels(p, metadata) for p in photos])
    np.testing.assert_allclose(logits, run_reference(session, pixels), atol=ATOL, rtol=0)

    top5 = result.as_numpy("probabilities")
    assert top5.shape == (len(photos), 5)
    for photo, row_logits, row in zip(photos, logits, top5, strict=True):
        v1 = httpx.post(f"{server}/v1/classify?top_k=5", content=photo, headers={"Content-Type": "image/jpeg"}).json()
        classes = parse_classes(row)
        assert [(i, label) for _, i, label in classes] == [(p["index"], p["label"]) for p in v1["predictions"]]
        # Triton prints scores with 6 decimals; /v1 gives the full probability.
        np.testing.assert_allclose([s for s, _, _ in classes], [p["probability"] for p in v1["predictions"]], atol=1e-6)
        np.testing.assert_allclose(
            softmax(row_logits)[[i for _, i, _ in classes]], [p["probability"] for p in v1["predictions"]], atol=1e-6
        )


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_preprocessed_pixels_match_onnxruntime(client, reference, encode_photo, binary):
    metadata, session = reference
    rng = np.random.default_rng(0)
    size = metadata.preprocessing.image_size
    pixels = np.stack(
        [server_pixels(encode_photo("rocket"), metadata), rng.standard_normal((3, size, size), dtype=np.float32)]
    )
    inp = triton.InferInput("pixel_values", list(pixels.shape), "FP32").set_data_from_numpy(pixels, binary_data=binary)
    # No outputs named: the client asks for every output, in binary.
    result = client.infer(metadata.architecture, [inp], model_version="1")
    expected = run_reference(session, pixels)
    np.testing.assert_allclose(result.as_numpy("logits"), expected, atol=ATOL, rtol=0)
    np.testing.assert_allclose(result.as_numpy("probabilities"), softmax(expected), atol=1e-6)


@pytest.mark.parametrize("algorithm", ["gzip", "deflate"])
def test_compressed_requests(client, reference, encode_photo, algorithm):
    metadata, session = reference
    photo = encode_photo("chelsea")
    result = client.infer(
        metadata.architecture,
        [bytes_input([photo], True)],
        outputs=[triton.InferRequestedOutput("logits")],
        request_compression_algorithm=algorithm,
    )
    pixels = server_pixels(photo, metadata)[None]
    np.testing.assert_allclose(result.as_numpy("logits"), run_reference(session, pixels), atol=ATOL, rtol=0)


def test_plain_json_without_the_client(server, reference, encode_photo):
    """curl-style: a JSON body in, a JSON body out (no binary extension)."""
    metadata, session = reference
    photo = encode_photo("astronaut")
    body = {
        "inputs": [{"name": "images", "shape": [1], "datatype": "BYTES", "data": [base64.b64encode(photo).decode()]}],
        "outputs": [{"name": "logits"}],
    }
    response = httpx.post(f"{server}/v2/models/{metadata.architecture}/infer", json=body)
    assert response.status_code == 200 and response.headers["content-type"] == "application/json"
    out = response.json()["outputs"][0]
    assert out["shape"] == [1, metadata.num_classes] and out["datatype"] == "FP32"
    pixels = server_pixels(photo, metadata)[None]
    np.testing.assert_allclose(
        np.array(out["data"], np.float32).reshape(out["shape"]), run_reference(session, pixels), atol=ATOL, rtol=0
    )


def expect_error(call, status: str, fragment: str) -> None:
    with pytest.raises(InferenceServerException) as info:
        call()
    assert info.value.status() == status, info.value
    assert fragment in info.value.message(), info.value.message()


def test_errors_are_answered_in_the_protocols_shape(client, server, reference, encode_photo):
    metadata, _ = reference
    name = metadata.architecture
    photo = encode_photo("coffee")
    expect_error(lambda: client.infer("resnet50", [bytes_input([photo], True)]), "404", "unknown model 'resnet50'")
    expect_error(
        lambda: client.infer(name, [bytes_input([photo], True)], model_version="2"), "404", "unknown version '2'"
    )
    # "²" passes str.isdigit but not int(): the schema fuzzer found it as a 500 (in the path and the query).
    body = {
        "inputs": [{"name": "images", "shape": [1], "datatype": "BYTES", "data": [base64.b64encode(photo).decode()]}]
    }
    for odd in ("%C2%B2", "%D9%A3", "01", "-1"):
        for url in (
            f"{server}/v2/models/{name}/versions/{odd}/infer",
            f"{server}/v2/models/{name}/infer?model_version={odd}",
        ):
            response = httpx.post(url, json=body)
            assert response.status_code == 404 and "unknown version" in response.json()["error"], (url, response.text)
    expect_error(lambda: client.get_model_metadata("resnet50"), "404", "unknown model")

    small = np.zeros((1, 3, 16, 16), np.float32)
    wrong_shape = triton.InferInput("pixel_values", list(small.shape), "FP32").set_data_from_numpy(small)
    expect_error(lambda: client.infer(name, [wrong_shape]), "400", "must have shape [N, 3,")

    not_base64 = triton.InferInput("images", [1], "BYTES")
    not_base64.set_data_from_numpy(np.array(["this is not base64!"], dtype=np.object_), binary_data=False)
    expect_error(lambda: client.infer(name, [not_base64]), "400", "element 0 is not valid base64")

    not_an_image = bytes_input([photo, b"plain text, not an image"], True)
    expect_error(lambda: client.infer(name, [not_an_image]), "422", "input 'images' element 1:")

    wrong_type = triton.InferInput("pixel_values", [1, 3, 2, 2], "INT32").set_data_from_numpy(
        np.zeros((1, 3, 2, 2), np.int32)
    )
    expect_error(lambda: client.infer(name, [wrong_type]), "400", "must have datatype FP32, got 'INT32'")

    # The raw body is the protocol's {"error": "<message>"}, not the /v1 {"error": {...}} object.
    response = httpx.post(f"{server}/v2/models/{name}/infer", content=b"{oops")
    assert response.status_code == 400
    assert isinstance(response.json()["error"], str) and "not valid JSON" in response.json()["error"]
    response = httpx.get(f"{server}/v2/models/resnet50/ready")
    assert response.status_code == 404 and isinstance(response.json()["error"], str)

    # ... and the server is still serving.
    assert client.is_model_ready(name)
    assert client.infer(name, [bytes_input([photo], True)]).as_numpy("logits").shape == (1, metadata.num_classes)


def test_api_key_with_the_official_client(tiny_onnx, reference, encode_photo):
    """With VITSERVE_API_KEY set, the client passes the key in headers=; health probes stay open."""
    metadata, session = reference
    settings = Settings(
        model=tiny_onnx, api_key=API_KEY, preprocess_threads=1, intra_op_threads=1, warmup_batch_sizes="1"
    )
    app = create_app(settings)
    paths = app.openapi()["paths"]
    assert "/v2/models/{model_name}/infer" in paths and "/v2/models/{model_name}/versions/{model_version}" in paths
    with running(app) as url:
        client = triton.InferenceServerClient(url=url.removeprefix("http://"))
        try:
            assert client.is_server_live() and client.is_server_ready()
            photo = encode_photo("astronaut")
            with pytest.raises(InferenceServerException) as info:  # refused by the app's middleware
                client.infer(metadata.architecture, [bytes_input([photo], True)])
            assert info.value.status() == "401"
            for call in (client.get_server_metadata, lambda: client.get_model_config(metadata.architecture)):
                expect_error(call, "401", "API key")  # GET /v2 and the extensions: the protocol's shape too
            result = client.infer(
                metadata.architecture, [bytes_input([photo], True)], headers={"Authorization": f"Bearer {API_KEY}"}
            )
            pixels = server_pixels(photo, metadata)[None]
            np.testing.assert_allclose(result.as_numpy("logits"), run_reference(session, pixels), atol=ATOL, rtol=0)
        finally:
            client.close()


def test_model_configuration_with_the_official_client(client, reference):
    metadata, _ = reference
    name = metadata.architecture
    size, k = metadata.preprocessing.image_size, metadata.num_classes
    assert {"model_configuration", "statistics"} <= set(client.get_server_metadata()["extensions"])
    for config in (client.get_model_config(name), client.get_model_config(name, model_version="1")):
        assert config["name"] == name and config["platform"] == "onnxruntime_onnx"
        assert config["max_batch_size"] == 4  # the server fixture's batch limit; dims leave the batch axis out
        assert {i["name"]: (i["data_type"], i["dims"]) for i in config["input"]} == {
            "images": ("TYPE_STRING", [1]),
            "pixel_values": ("TYPE_FP32", [3, size, size]),
        }
        assert {o["name"]: (o["data_type"], o["dims"]) for o in config["output"]} == {
            "logits": ("TYPE_FP32", [k]),
            "probabilities": ("TYPE_FP32", [k]),
        }
        assert config["dynamic_batching"]["max_queue_delay_microseconds"] == 2000
        assert config["parameters"]["vitserve.image_size"]["string_value"] == str(size)
    expect_error(lambda: client.get_model_config("resnet50"), "404", "unknown model 'resnet50'")
    expect_error(lambda: client.get_model_config(name, model_version="9"), "404", "unknown version '9'")


def test_statistics_with_the_official_client(client, reference, encode_photo):
    metadata, _ = reference
    name = metadata.architecture

    def stats() -> dict:
        (entry,) = client.get_inference_statistics(name)["model_stats"]
        assert (entry["name"], entry["version"]) == (name, "1")
        return entry

    before = stats()
    photos = [encode_photo(n) for n in IMAGES]
    client.infer(name, [bytes_input(photos, True)])
    after = stats()
    assert after["inference_count"] - before["inference_count"] == len(photos)
    assert after["execution_count"] > before["execution_count"] and after["last_inference"] > 0
    for kind in ("success", "queue", "compute_input", "compute_infer"):
        assert after["inference_stats"][kind]["count"] - before["inference_stats"][kind]["count"] == len(photos)
        assert after["inference_stats"][kind]["ns"] >= before["inference_stats"][kind]["ns"]
    assert after["inference_stats"]["success"]["ns"] > before["inference_stats"]["success"]["ns"]
    run_images = sum(int(b["batch_size"]) * int(b["compute_infer"]["count"]) for b in after["batch_stats"])
    assert run_images == int(after["inference_count"])  # every image ran in exactly one counted batch

    not_an_image = bytes_input([b"plain text"], True)
    expect_error(lambda: client.infer(name, [not_an_image]), "422", "element 0")
    assert stats()["inference_stats"]["fail"]["count"] == after["inference_stats"]["fail"]["count"] + 1

    everything = client.get_inference_statistics()["model_stats"]
    assert [(e["name"], e["version"]) for e in everything] == [(name, "1")]
    expect_error(lambda: client.get_inference_statistics("resnet50"), "404", "unknown model")


def test_unimplemented_extensions_answer_cleanly_in_the_protocols_shape(client):
    # Trace and log settings are not served: the client must see a clean 404, not a TypeError.
    expect_error(client.get_trace_settings, "404", "")
    expect_error(client.get_log_settings, "404", "")
    expect_error(lambda: client.get_system_shared_memory_status(), "404", "")
