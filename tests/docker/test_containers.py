"""The container images and compose files, checked on a machine with no Docker engine: podman runs them.

Fast checks (linters, compose validation) run always. The slow ones build docker/Dockerfile (CUDA)
and docker/Dockerfile.cpu from the repository on a stand-in base image, start each, and drive it
from the host like a user would: health check, classification through the published port,
non-root, and SIGTERM with a request in flight.
"""

from __future__ import annotations

import functools
import io
import json
import os
import re
import subprocess
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image
from podman import Container, Podman
from vitserve_images import CUDA_EXTRAS, DEMO_MODEL, DOCKERFILES, REPO, BuiltImage, tool

COMPOSE_GPU = [REPO / "docker-compose.yml"]
COMPOSE_CPU = [REPO / "docker-compose.yml", REPO / "docker-compose.cpu.yml"]
STOP_GRACE_S = 40  # what docker-compose.yml gives the drain; the service's own drain grace is 30 s
RUNTIME_UID = "10001"


# ------------------------------------------------------------------------------------------------
# Fast: linters and compose validation


def test_dockerfiles_pass_hadolint_at_error_level(tmp_path):
    hadolint = tool("hadolint")
    result = subprocess.run(
        [hadolint, "--failure-threshold", "error", *map(str, DOCKERFILES.values())],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    # The same invocation must be able to fail: a relative WORKDIR is one of hadolint's errors.
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM debian:bookworm-slim\nWORKDIR app\n")
    result = subprocess.run(
        [hadolint, "--failure-threshold", "error", str(bad)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode != 0 and "DL3000" in result.stdout


def compose_config(files: list[Path], *extra: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    args = [str(tool("docker-compose"))]
    for f in files:
        args += ["-f", str(f)]
    return subprocess.run([*args, "config", *extra], capture_output=True, text=True, timeout=60, cwd=REPO, env=env)


def seconds(duration: str) -> float:
    """Compose's normalised duration ("40s", "1m0s") in seconds."""
    units = {"h": 3600, "m": 60, "s": 1}
    return sum(float(n) * units[u] for n, u in re.findall(r"([\d.]+)([hms])", duration))


def test_compose_files_validate_and_reserve_a_gpu_only_in_the_main_file():
    for files in (COMPOSE_GPU, COMPOSE_CPU):
        result = compose_config(files, "-q")
        assert result.returncode == 0, f"{[f.name for f in files]}: {result.stderr}"

    gpu = json.loads(compose_config(COMPOSE_GPU, "--format", "json").stdout)["services"]["vitserve"]
    assert gpu["build"]["dockerfile"] == "docker/Dockerfile"
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "device_ids": ["0"], "capabilities": ["gpu"]}]
    assert "healthcheck.py" in " ".join(gpu["healthcheck"]["test"])
    assert gpu["restart"] == "unless-stopped"
    assert [v["target"] for v in gpu["volumes"]] == ["/models", "/var/lib/vitserve"]
    assert gpu["stop_signal"] == "SIGTERM"
    # Docker's SIGKILL must come after the service's own drain deadline, or the drain is cut short.
    assert seconds(gpu["stop_grace_period"]) == STOP_GRACE_S > float(gpu["environment"]["VITSERVE_SHUTDOWN_GRACE_S"])

    cpu = json.loads(compose_config(COMPOSE_CPU, "--format", "json").stdout)["services"]["vitserve"]
    assert cpu["build"]["dockerfile"] == "docker/Dockerfile.cpu"
    assert "devices" not in json.dumps(cpu.get("deploy", {}))
    assert cpu["image"] == "vitserve:cpu"
    assert [v["target"] for v in cpu["volumes"]] == ["/models", "/var/lib/vitserve"]
    assert cpu["read_only"] and cpu["environment"]["VITSERVE_DATA_DIR"].startswith("/var/lib/vitserve/")


def test_compose_passes_the_api_key_only_when_exported_and_never_empty():
    env = {k: v for k, v in os.environ.items() if k not in ("VITSERVE_API_KEY", "VITSERVE_NO_AUTH")}
    unset = json.loads(compose_config(COMPOSE_GPU, "--format", "json", env=env).stdout)["services"]["vitserve"]
    # null: the container gets no such variable (compose's rule for a key without a value), never "".
    assert unset["environment"]["VITSERVE_API_KEY"] is None
    assert unset["environment"]["VITSERVE_NO_AUTH"] == "false"  # so no key means: refuse to start
    keyed = compose_config(COMPOSE_GPU, "--format", "json", env={**env, "VITSERVE_API_KEY": "k-1"})
    assert json.loads(keyed.stdout)["services"]["vitserve"]["environment"]["VITSERVE_API_KEY"] == "k-1"


def test_compose_picks_the_gpu_from_the_environment():
    env = {**os.environ, "VITSERVE_GPU": "3", "VITSERVE_PUBLISH": "127.0.0.1:8003"}
    gpu = json.loads(compose_config(COMPOSE_GPU, "--format", "json", env=env).stdout)["services"]["vitserve"]
    assert gpu["deploy"]["resources"]["reservations"]["devices"][0]["device_ids"] == ["3"]
    assert gpu["ports"][0]["published"] == "8003" and gpu["ports"][0]["host_ip"] == "127.0.0.1"


# ------------------------------------------------------------------------------------------------
# Slow: the images, built and run


@functools.cache
def photo_jpeg(name: str) -> bytes:
    import skimage.data

    buf = io.BytesIO()
    Image.fromarray(getattr(skimage.data, name)()).convert("RGB").save(buf, "JPEG", quality=90)
    return buf.getvalue()


@functools.cache
def rendered_digits() -> tuple[tuple[int, bytes], ...]:
    """One held-out digit per class (never trained on), rendered as the demo model's data, as PNG."""
    from scripts.digits_data import digits_split, render_digit

    images, targets, _, held_out = digits_split()
    samples = []
    for label in range(10):
        index = next(i for i in held_out if targets[i] == label)
        buf = io.BytesIO()
        render_digit(images[index]).save(buf, "PNG")
        samples.append((label, buf.getvalue()))
    return tuple(samples)


def host_reference(model: Path, data: bytes, k: int) -> list[dict]:
    """What the service computes for these bytes, computed here with ONNX Runtime on the host."""
    import onnxruntime as ort

    from service.core.metadata import ModelMetadata
    from service.core.settings import Settings
    from service.runtime.postprocess import top_k
    from service.runtime.preprocess import load_pixels

    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    metadata = ModelMetadata.from_props(session.get_modelmeta().custom_metadata_map)
    # The containers run with the default settings: JPEG draft decoding on for large JPEGs.
    jpeg_draft = Settings.model_fields["jpeg_draft"].default
    pixels = load_pixels(data, metadata.preprocessing, max_pixels=10**8, jpeg_draft=jpeg_draft)[None]  # (1, 3, H, W)
    logits = session.run(None, {session.get_inputs()[0].name: pixels.astype(metadata.input_dtype)})[0][0]
    return top_k(logits, metadata.labels, k)


def start_service(podman: Podman, image: BuiltImage, name: str) -> Container:
    """The CPU image serves its baked-in model as `docker run` would; the CUDA one runs as
    docker-compose.yml runs it: a model mounted from the host's models/, read-only root, no capabilities."""
    # The image listens on 0.0.0.0: without a key, serving unauthenticated must be said explicitly.
    if image.flavour == "cpu":
        return Container.start(podman, image.tag, name, stop_timeout_s=STOP_GRACE_S, env={"VITSERVE_NO_AUTH": "true"})
    return Container.start(
        podman,
        image.tag,
        name,
        stop_timeout_s=STOP_GRACE_S,
        env={"VITSERVE_MODEL": f"/models/{DEMO_MODEL.relative_to(REPO / 'models')}", "VITSERVE_NO_AUTH": "true"},
        volumes=[f"{REPO / 'models'}:/models:ro"],
        extra=["--read-only", "--tmpfs", "/tmp", "--cap-drop", "ALL", "--security-opt", "no-new-privileges"],
    )


@pytest.fixture(params=["cpu", "cuda"])
def image(request) -> BuiltImage:
    return request.getfixturevalue(f"{request.param}_image")


@pytest.mark.slow
def test_runtime_image_has_no_torch_and_runs_as_non_root(podman: Podman, standin: list[str], image: BuiltImage):
    base = podman.image_size_bytes(standin[0])
    print(
        f"\n{image.flavour} image: {image.size_bytes / 1e6:.0f} MB, of which {(image.size_bytes - base) / 1e6:.0f} MB "
        f"above the {base / 1e6:.0f} MB stand-in base"
    )
    assert podman.inspect(image.tag, "{{.Config.User}}") == f"{RUNTIME_UID}:{RUNTIME_UID}"
    assert podman.inspect(image.tag, "{{.Config.StopSignal}}") == "SIGTERM"
    assert "healthcheck.py" in podman.inspect(image.tag, "{{json .Config.Healthcheck}}")
    probe = (
        "import importlib.metadata as m, json, os; "
        "print(json.dumps({'dists': sorted(d.metadata['Name'].lower() for d in m.distributions()), "
        "'uid': os.getuid(), 'pip_conf': os.path.getsize('/etc/pip.conf') if os.path.exists('/etc/pip.conf') else 0}))"
    )
    result = podman("run", "--rm", "--pull=never", "--entrypoint", "python", image.tag, "-c", probe)
    facts = json.loads(result.stdout.strip().splitlines()[-1])
    dists = set(facts["dists"])
    assert not dists & {"torch", "torchvision", "onnx", "onnxscript", "timm", "transformers"}, dists
    assert facts["uid"] == int(RUNTIME_UID)
    assert facts["pip_conf"] == 0, "the build's pip.conf leaked into the image"
    assert "vitserve" in dists
    if image.flavour == "cpu":
        assert "onnxruntime" in dists and "onnxruntime-gpu" not in dists
    else:
        assert "onnxruntime-gpu" in dists
        has_cuda_libs = {"nvidia-cudnn-cu13", "nvidia-cublas"} <= dists
        assert has_cuda_libs == bool(CUDA_EXTRAS), dists


@pytest.mark.slow
def test_container_is_healthy_and_classifies_from_the_host(podman: Podman, image: BuiltImage):
    container = start_service(podman, image, f"vitserve-test-{image.flavour}-serve")
    try:
        healthy_s = container.wait_healthy(timeout_s=180)
        print(f"\n{image.flavour}: healthy {healthy_s:.1f} s after start")
        status = container.exec("cat", "/proc/1/status").stdout
        assert re.search(rf"^Uid:\s+{RUNTIME_UID}\s", status, re.MULTILINE), "PID 1 is not the vitserve user"

        with httpx.Client(base_url=container.url, timeout=60) as client:
            assert client.get("/healthz").status_code == 200
            assert client.get("/readyz").status_code == 200
            models = client.get("/v1/models").json()
            # No GPU here: the CUDA image must have fallen back to the CPU provider, not failed.
            assert "CPUExecutionProvider" in json.dumps(models)

            correct = 0
            for label, png in rendered_digits():
                response = client.post("/v1/classify", content=png, headers={"Content-Type": "image/png"})
                assert response.status_code == 200, response.text
                correct += response.json()["predictions"][0]["label"] == str(label)
            assert correct >= 9, f"{correct}/10 rendered digits classified correctly"

            photo = photo_jpeg("astronaut")
            response = client.post(
                "/v1/classify", params={"top_k": 3}, content=photo, headers={"Content-Type": "image/jpeg"}
            )
            assert response.status_code == 200, response.text
            body = response.json()
            expected = host_reference(DEMO_MODEL, photo, k=3)
            assert [p["index"] for p in body["predictions"]][:1] == [p["index"] for p in expected][:1]
            got = {p["index"]: p["probability"] for p in body["predictions"]}
            for p in expected:
                assert got.get(p["index"], 0.0) == pytest.approx(p["probability"], abs=1e-3)
    finally:
        container.remove()


@functools.cache
def huge_digit_png(side: int = 6000) -> bytes:
    """A digit drawn side x side pixels: a small upload (flat blocks compress to ~120 KB) whose decoding
    and resizing keep a pre-processing thread busy for about a second."""
    from sklearn.datasets import load_digits

    ink = load_digits().images[-1] / 16.0  # (8, 8) in [0, 1]
    image = Image.fromarray(np.uint8(np.round(255 * (1 - ink)))).resize((side, side), Image.Resampling.NEAREST)
    buf = io.BytesIO()
    image.convert("RGB").save(buf, "PNG", compress_level=9)
    return buf.getvalue()


@pytest.mark.slow
def test_sigterm_finishes_the_requests_in_flight_then_exits(podman: Podman, image: BuiltImage):
    container = start_service(podman, image, f"vitserve-test-{image.flavour}-stop")
    try:
        container.wait_healthy(timeout_s=180)
        payload = huge_digit_png()
        expected = host_reference(DEMO_MODEL, payload, k=1)[0]["index"]
        # Three times more slow images than the service has pre-processing threads (one per core):
        # most are still queued or being decoded when SIGTERM arrives, i.e. accepted and in flight.
        answers: list[tuple[int, dict] | BaseException] = []

        def classify() -> None:
            try:
                with httpx.Client(timeout=STOP_GRACE_S) as client:
                    r = client.post(
                        f"{container.url}/v1/classify", content=payload, headers={"Content-Type": "image/png"}
                    )
                    answers.append((r.status_code, r.json()))
            except BaseException as exc:  # a dropped connection is the failure this test looks for
                answers.append(exc)

        clients = [threading.Thread(target=classify) for _ in range(6)]
        for t in clients:
            t.start()
        # Let the bodies in (120 KB each over loopback) before the signal: the service answers 503 to a
        # request whose body is still arriving when the drain starts.
        time.sleep(0.5)
        stop_result: dict[str, int] = {}

        def stop() -> None:
            # podman stop sends the image's STOPSIGNAL, then SIGKILL after the grace period.
            stop_result["rc"] = podman(
                "stop", "--time", str(STOP_GRACE_S), container.name, timeout=STOP_GRACE_S + 30, check=False
            ).returncode

        stopper = threading.Thread(target=stop)
        stopper.start()
        # Draining: still listening, readiness 503 (a load balancer takes it out), new work refused.
        deadline = time.monotonic() + 10
        with httpx.Client(base_url=container.url, timeout=10) as client:
            while client.get("/readyz").status_code != 503:
                assert time.monotonic() < deadline, "readiness never turned 503 after SIGTERM"
                time.sleep(0.05)
            refused = client.post(
                "/v1/classify", content=rendered_digits()[0][1], headers={"Content-Type": "image/png"}
            )
            assert refused.status_code == 503, refused.text

        for t in clients:
            t.join(timeout=STOP_GRACE_S + 10)
        stopper.join(timeout=STOP_GRACE_S + 40)
        logs = container.logs()
        assert all(not isinstance(a, BaseException) for a in answers), f"{answers}\n{logs[-3000:]}"
        assert [status for status, _ in answers] == [200] * len(clients), answers
        assert all(body["predictions"][0]["index"] == expected for _, body in answers)
        accepted = re.search(r"finishing (\d+) accepted", logs)
        assert accepted and int(accepted[1]) >= 1, f"no request was in flight at SIGTERM:\n{logs[-3000:]}"
        assert stop_result["rc"] == 0
        # Exit code 0, not 137: the container exited by itself within the grace period, no SIGKILL.
        assert podman.inspect(container.name, "{{.State.ExitCode}}", kind="container") == "0", logs[-3000:]
    finally:
        container.remove()
