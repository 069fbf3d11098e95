"""Fixtures for the container tests: the tools, a private podman, the stand-in base, the two images.

Slow and heavy (a debootstrap, two image builds): everything here is session-scoped and built once.
Under CI=true a missing tool is installed (or the test fails); it never skips.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from podman import Podman, import_standin, install_tools, missing_tools, private_podman, standin_tarball

REPO = Path(__file__).resolve().parents[2]
DOCKERFILES = {"cuda": REPO / "docker" / "Dockerfile", "cpu": REPO / "docker" / "Dockerfile.cpu"}
DEMO_MODEL = REPO / "models" / "digits" / "model.onnx"
# Safe to keep between runs: the stand-in root depends only on the Debian suite and package list.
CACHE_DIR = Path(tempfile.gettempdir()) / "vitserve-docker-cache"
# The CUDA image's NVIDIA libraries (onnxruntime-gpu[cuda,cudnn]: 1.3 GB of wheels, 2.5 GB unpacked)
# add two minutes to the build and nothing a GPU-less machine can exercise beyond preloading them:
# CI builds the CUDA image without them unless VITSERVE_DOCKER_CUDA_EXTRAS says otherwise
# (e.g. "cuda,cudnn", to build exactly what a GPU host gets and measure its size).
CUDA_EXTRAS = os.environ.get("VITSERVE_DOCKER_CUDA_EXTRAS", "")


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def tool(name: str) -> Path:
    """A console script installed with the test extras (hadolint, docker-compose), next to this Python."""
    path = Path(sys.executable).parent / name
    if not path.exists():
        found = shutil.which(name)
        if found is None:
            message = f"{name} is missing: pip install -e '.[test]' (it is a test extra)"
            if in_ci():
                pytest.fail(message)
            pytest.skip(message)
        path = Path(found)
    return path


def base_images() -> list[str]:
    """The exact names the Dockerfiles' FROM lines resolve to (the default of ARG BASE_IMAGE)."""
    names = set()
    for dockerfile in DOCKERFILES.values():
        match = re.search(r"^ARG BASE_IMAGE=(\S+)$", dockerfile.read_text(), re.MULTILINE)
        assert match, f"{dockerfile} has no ARG BASE_IMAGE=<default>"
        name = match[1]
        # Docker Hub's normalisation: python:3.12-slim -> docker.io/library/python:3.12-slim
        if "/" not in name:
            name = f"library/{name}"
        if "." not in name.split("/")[0]:
            name = f"docker.io/{name}"
        names.add(name)
    return sorted(names)


@pytest.fixture(scope="session")
def container_tools() -> None:
    missing = missing_tools()
    if not missing:
        return
    if os.geteuid() != 0:
        message = f"rootful podman needs root; missing {missing}"
        if in_ci():
            pytest.fail(message)
        pytest.skip(message)
    install_tools()  # root: the recipe installs them with apt-get, CI or not
    assert not missing_tools(), f"still missing after apt-get: {missing_tools()}"


@pytest.fixture(scope="session")
def podman(container_tools) -> Iterator[Podman]:
    with private_podman() as instance:
        yield instance


@pytest.fixture(scope="session")
def standin(podman: Podman) -> list[str]:
    """The stand-in base image, tagged with every name a FROM line uses; returns those names."""
    names = base_images()
    import_standin(podman, standin_tarball(CACHE_DIR), names)
    return names


@pytest.fixture(scope="session")
def demo_model() -> Path:
    if not DEMO_MODEL.is_file():
        pytest.fail(f"the bundled demo model {DEMO_MODEL.relative_to(REPO)} is missing; the images bake it in")
    return DEMO_MODEL


class BuiltImage:
    def __init__(self, flavour: str, tag: str, build_s: float, size_bytes: int) -> None:
        self.flavour, self.tag, self.build_s, self.size_bytes = flavour, tag, build_s, size_bytes

    def __repr__(self) -> str:
        return f"{self.tag} ({self.size_bytes / 1e6:.0f} MB, built in {self.build_s:.0f} s)"


def _build(podman: Podman, flavour: str, build_args: dict[str, str]) -> BuiltImage:
    tag = f"localhost/vitserve-test:{flavour}"
    start = time.monotonic()
    podman.build(REPO, DOCKERFILES[flavour], tag, build_args=build_args, timeout=900)
    image = BuiltImage(flavour, tag, time.monotonic() - start, podman.image_size_bytes(tag))
    print(f"\nbuilt {image}", flush=True)
    return image


@pytest.fixture(scope="session")
def built_images(podman: Podman, standin, demo_model) -> dict[str, BuiltImage]:
    """Both images, built at the same time: their runtime stages are independent and pip spends much
    of its time waiting on the network, so the two builds overlap well even on two cores."""
    build_args = {"cpu": {}, "cuda": {"ORT_EXTRAS": CUDA_EXTRAS}}
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = {flavour: pool.submit(_build, podman, flavour, args) for flavour, args in build_args.items()}
        return {flavour: future.result() for flavour, future in futures.items()}


@pytest.fixture(scope="session")
def cpu_image(built_images) -> BuiltImage:
    return built_images["cpu"]


@pytest.fixture(scope="session")
def cuda_image(built_images) -> BuiltImage:
    return built_images["cuda"]
