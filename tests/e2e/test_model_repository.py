"""A real server on a model repository: several models and versions, zero-downtime swaps under load,
broken versions that never take traffic, tritonclient's repository calls, the response cache, restart."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import onnx
import pytest
import tritonclient.http as triton_http
from live_server import free_port, stop_server, wait_ready
from tritonclient.utils import InferenceServerException

from service.core.metadata import PREFIX

REPO = Path(__file__).resolve().parents[2]
DIGITS = REPO / "models" / "digits" / "model.onnx"
pytestmark = pytest.mark.slow


def relabelled(source: Path, target: Path, prefix: str, *, nan_head: bool = False) -> Path:
    """A copy of an export whose labels start with ``prefix`` (answers show which version gave them)."""
    model = onnx.load(str(source))
    props = {p.key: p for p in model.metadata_props}
    labels = json.loads(props[PREFIX + "labels"].value)
    props[PREFIX + "labels"].value = json.dumps([f"{prefix}{label}" for label in labels])
    if nan_head:  # a version whose outputs are NaN: it must fail its golden check
        for init in model.graph.initializer:
            if "head" in init.name and "bias" in init.name:
                data = onnx.numpy_helper.to_array(init).copy()
                data[:] = float("nan")
                init.CopyFrom(onnx.numpy_helper.from_array(data, init.name))
    target.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(target))
    return target


def put_version(root: Path, name: str, version: int, source: Path, **relabel) -> None:
    """Write a version folder beside the repository, then rename it in: a poll never sees half a file."""
    staging = root.parent / f".staging-{name}-{version}"
    shutil.rmtree(staging, ignore_errors=True)
    if relabel:
        relabelled(source, staging / "model.onnx", **relabel)
    else:
        staging.mkdir(parents=True)
        shutil.copy(source, staging / "model.onnx")
    (root / name).mkdir(parents=True, exist_ok=True)
    staging.rename(root / name / str(version))


@pytest.fixture
def repository(tmp_path, e2e_model) -> Path:
    root = tmp_path / "repo"
    put_version(root, "digits", 1, DIGITS)
    put_version(root, "tiny", 1, e2e_model, prefix="v1-")
    return root


class RepositoryServer:
    """``vitserve serve --model-repository`` in a subprocess on 127.0.0.1 (stopped with SIGTERM)."""

    def __init__(self, root: Path, log_path: Path, env: dict[str, str]) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self._log = open(log_path, "wb")  # noqa: SIM115 - closed in stop()
        command = [sys.executable, "-m", "service.cli", "serve", "--model-repository", str(root)]
        command += ["--port", str(self.port), "--max-batch-size", "4", "--preprocess-threads", "2"]
        command += ["--intra-op-threads", "1", "--max-queue-size", "1024", "--log-level", "info"]
        command += ["--model-control", env.pop("MODEL_CONTROL", "explicit")]
        self.process = subprocess.Popen(
            command, cwd=REPO, env={**os.environ, **env}, stdout=self._log, stderr=subprocess.STDOUT
        )
        wait_ready(self.url, self.process, log_path)

    def stop(self) -> None:
        stop_server(self.process)
        self._log.close()


@pytest.fixture
def start_server(tmp_path):
    """Factory: a ready server on a repository, stopped when the test ends (one at a time on 2 cores)."""
    started: list[RepositoryServer] = []

    def start(root: Path, **env: str) -> RepositoryServer:
        server = RepositoryServer(root, tmp_path / f"server-{len(started)}.log", env)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


@pytest.fixture(scope="module")
def photos(photo_arrays) -> dict[str, bytes]:
    from PIL import Image

    encoded = {}
    for name, array in photo_arrays.items():
        buffer = io.BytesIO()
        Image.fromarray(array).convert("RGB").save(buffer, "JPEG", quality=90)
        encoded[name] = buffer.getvalue()
    return encoded


def serve(start_server, root: Path, **env: str) -> RepositoryServer:
    return start_server(root, **env)


def two_d_input_model(source: Path, target: Path) -> Path:
    """A valid ONNX file with the export's metadata but a (N, 10) input: not an image model."""
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Identity", ["pixel_values"], ["logits"])],
        "not_an_image_model",
        [helper.make_tensor_value_info("pixel_values", TensorProto.FLOAT, ["N", 10])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    for prop in onnx.load(str(source)).metadata_props:
        model.metadata_props.add(key=prop.key, value=prop.value)
    onnx.save(model, str(target))
    return target


def classify(url: str, photo: bytes, path: str = "/v1/classify") -> httpx.Response:
    return httpx.post(f"{url}{path}", content=photo, headers={"Content-Type": "image/jpeg"}, timeout=60)


def top_label(response: httpx.Response) -> str:
    assert response.status_code == 200, response.text
    return response.json()["predictions"][0]["label"]


def wait_for(predicate, timeout_s: float = 60.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


# "2": the multi-process server, where the engine process holds the registry and the workers route to it.
@pytest.mark.parametrize("workers", ["1", "2"])
def test_models_and_versions_are_served_and_addressed(start_server, repository, e2e_model, photos, workers):
    put_version(repository, "tiny", 2, e2e_model, prefix="v2-")
    (repository / "tiny" / "config.json").write_text(json.dumps({"version_policy": {"all": {}}}))
    server = serve(start_server, repository, VITSERVE_DEFAULT_MODEL="tiny", VITSERVE_WORKERS=workers)
    url = server.url
    photo = photos["coffee"]
    listing = httpx.get(f"{url}/v1/models", timeout=10).json()
    assert listing["default_model"] == "tiny" and listing["name"] == "tiny" and listing["version"] == 2
    by_name = {m["name"]: m for m in listing["models"]}
    assert by_name["tiny"]["current_version"] == 2
    assert {v["version"]: v["state"] for v in by_name["tiny"]["versions"]} == {1: "READY", 2: "READY"}
    assert by_name["digits"]["versions"] == [{"version": 1, "state": "READY"}]

    assert top_label(classify(url, photo)).startswith("v2-")  # the default model's newest version
    assert top_label(classify(url, photo, "/v1/models/tiny/versions/1/classify")).startswith("v1-")
    assert top_label(classify(url, photo, "/v1/models/tiny/classify")).startswith("v2-")
    digits = classify(url, photo, "/v1/models/digits/classify").json()
    assert digits["model"] == "digits" and digits["version"] == 1
    assert classify(url, photo, "/v1/models/nope/classify").status_code == 404
    assert classify(url, photo, "/v1/models/tiny/versions/9/classify").status_code == 404

    client = triton_http.InferenceServerClient(url.removeprefix("http://"))
    index = {(m["name"], m["version"]): m["state"] for m in client.get_model_repository_index()}
    assert index == {("digits", "1"): "READY", ("tiny", "1"): "READY", ("tiny", "2"): "READY"}
    assert client.is_model_ready("tiny", "1") and client.is_model_ready("digits")
    assert client.get_model_metadata("tiny")["versions"] == ["1", "2"]
    inp = triton_http.InferInput("images", [1], "BYTES")
    import numpy as np

    inp.set_data_from_numpy(np.array([photo], dtype=np.object_))
    out = triton_http.InferRequestedOutput("logits", class_count=1)
    result = client.infer("tiny", [inp], model_version="1", outputs=[out])
    assert result.get_response()["model_version"] == "1"
    assert result.as_numpy("logits")[0][0].decode().split(":")[2].startswith("v1-")

    client.unload_model("digits")
    wait_for(lambda: not client.is_model_ready("digits"), what="digits unloaded")
    assert classify(url, photo, "/v1/models/digits/classify").status_code == 404
    client.load_model("digits")
    assert client.is_model_ready("digits")
    with pytest.raises(InferenceServerException, match="not in the repository"):
        client.load_model("nothing-here")


@pytest.mark.parametrize("workers", ["1", "2"])
def test_five_swaps_under_load_lose_no_request(start_server, repository, e2e_model, photos, workers):
    server = serve(
        start_server,
        repository,
        VITSERVE_DEFAULT_MODEL="tiny",
        VITSERVE_REPOSITORY_POLL_S="0.2",
        VITSERVE_WORKERS=workers,
    )
    url, photo = server.url, photos["chelsea"]
    answers: list[tuple[float, int, str]] = []  # (time, status, label prefix)
    stop = threading.Event()

    def client_loop():
        with httpx.Client(timeout=60) as http:
            while not stop.is_set():
                r = http.post(f"{url}/v1/classify", content=photo, headers={"Content-Type": "image/jpeg"})
                label = r.json()["predictions"][0]["label"] if r.status_code == 200 else ""
                answers.append((time.monotonic(), r.status_code, label.split("-")[0]))

    threads = [threading.Thread(target=client_loop) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        for version in range(2, 7):  # five swaps: 1 -> 2 -> ... -> 6, alternately by poll and by load call
            appeared = time.monotonic()
            put_version(repository, "tiny", version, e2e_model, prefix=f"v{version}-")
            if version % 2:
                triton_http.InferenceServerClient(url.removeprefix("http://")).load_model("tiny")
            wait_for(
                lambda v=version, since=appeared: any(t > since and p == f"v{v}" for t, _, p in list(answers)),
                what=f"answers from version {version}",
            )
            switched = time.monotonic()
            # After the switch no answer comes from anything but the new version for long.
            time.sleep(0.5)
            late = [p for t, _, p in list(answers) if t > switched + 0.3]
            assert late and set(late) == {f"v{version}"}, set(late)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=60)
    assert answers and all(status == 200 for _, status, _ in answers), {s for _, s, _ in answers}
    assert {p for _, _, p in answers} <= {f"v{v}" for v in range(1, 7)}  # every answer from one version
    listing = httpx.get(f"{url}/v1/models", timeout=10).json()
    tiny = next(m for m in listing["models"] if m["name"] == "tiny")
    assert tiny["current_version"] == 6
    assert [v["state"] for v in tiny["versions"] if v["version"] == 6] == ["READY"]


@pytest.mark.parametrize("broken", ["truncated", "wrong_input", "nan"])
def test_a_broken_new_version_never_takes_traffic(start_server, repository, e2e_model, photos, tmp_path, broken):
    server = serve(start_server, repository, VITSERVE_DEFAULT_MODEL="tiny")
    url, photo = server.url, photos["astronaut"]
    assert top_label(classify(url, photo)).startswith("v1-")
    if broken == "truncated":
        data = e2e_model.read_bytes()
        bad = tmp_path / "bad.onnx"
        bad.write_bytes(data[: len(data) // 3])
        put_version(repository, "tiny", 2, bad)
    elif broken == "wrong_input":
        put_version(repository, "tiny", 2, two_d_input_model(e2e_model, tmp_path / "flat.onnx"))
    else:
        put_version(repository, "tiny", 2, e2e_model, prefix="v2-", nan_head=True)
    client = triton_http.InferenceServerClient(url.removeprefix("http://"))
    with pytest.raises(InferenceServerException, match="could not be loaded"):
        client.load_model("tiny")
    assert top_label(classify(url, photo)).startswith("v1-")  # the old version keeps answering
    index = {(m["name"], m["version"]): m for m in client.get_model_repository_index()}
    assert index[("tiny", "2")]["state"] == "UNAVAILABLE" and index[("tiny", "2")]["reason"]
    assert index[("tiny", "1")]["state"] == "READY"
    metrics = httpx.get(f"{url}/metrics", timeout=10).text
    assert 'vitserve_model_load_failures_total{model="tiny"} 1.0' in metrics


def test_cache_hits_identical_bytes_and_never_crosses_a_swap(start_server, repository, e2e_model, photos):
    server = serve(start_server, repository, VITSERVE_DEFAULT_MODEL="tiny", VITSERVE_CACHE_ENTRIES="16")
    url = server.url
    first = classify(url, photos["coffee"])
    again = classify(url, photos["coffee"])
    assert first.json()["predictions"] == again.json()["predictions"]
    assert again.json()["timing_ms"]["total"] == 0.0  # answered from the cache
    assert classify(url, photos["rocket"]).json()["timing_ms"]["total"] > 0.0  # other bytes: a miss
    put_version(repository, "tiny", 2, e2e_model, prefix="v2-")
    triton_http.InferenceServerClient(url.removeprefix("http://")).load_model("tiny")
    after = classify(url, photos["coffee"])
    assert top_label(after).startswith("v2-")  # not the old version's cached answer
    metrics = httpx.get(f"{url}/metrics", timeout=10).text
    assert 'vitserve_cache_events_total{event="hit"} 1.0' in metrics
    assert 'vitserve_cache_events_total{event="miss"} 3.0' in metrics


def test_restart_brings_the_repository_back_as_configured(start_server, repository, e2e_model):
    put_version(repository, "tiny", 2, e2e_model, prefix="v2-")
    (repository / "tiny" / "config.json").write_text(json.dumps({"version_policy": {"specific": {"versions": [1]}}}))
    for _ in range(2):  # the same state from a fresh process each time
        server = serve(start_server, repository)
        listing = httpx.get(f"{server.url}/v1/models", timeout=10).json()
        tiny = next(m for m in listing["models"] if m["name"] == "tiny")
        assert tiny["current_version"] == 1
        assert {v["version"]: v["state"] for v in tiny["versions"]} == {1: "READY", 2: "UNAVAILABLE"}
        server.stop()


def test_load_and_unload_are_refused_unless_model_control_is_explicit(start_server, repository, photos):
    server = serve(start_server, repository, MODEL_CONTROL="none")
    client = triton_http.InferenceServerClient(server.url.removeprefix("http://"))
    for call in (client.load_model, client.unload_model):
        with pytest.raises(InferenceServerException, match="model-control explicit"):
            call("tiny")
    assert {m["name"] for m in client.get_model_repository_index()} == {"digits", "tiny"}  # reading stays open
    assert classify(server.url, photos["coffee"], "/v1/models/tiny/classify").status_code == 200
