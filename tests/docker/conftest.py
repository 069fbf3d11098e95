"""Fixtures for the container tests: the tools, a private podman, the stand-in base, the two images.

Slow and heavy (a debootstrap, two image builds): everything here is session-scoped and built once.
Under CI=true a missing tool is installed (or the test fails); it never skips.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from podman import Podman, import_standin, install_tools, missing_tools, private_podman, standin_tarball
from vitserve_images import CACHE_DIR, CUDA_EXTRAS, DEMO_MODEL, REPO, BuiltImage, base_images, build_image, in_ci


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


@pytest.fixture(scope="session")
def built_images(podman: Podman, standin, demo_model) -> dict[str, BuiltImage]:
    """Both images, built at the same time: their runtime stages are independent and pip spends much
    of its time waiting on the network, so the two builds overlap well even on two cores."""
    build_args = {"cpu": {}, "cuda": {"ORT_EXTRAS": CUDA_EXTRAS}}
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = {flavour: pool.submit(build_image, podman, flavour, args) for flavour, args in build_args.items()}
        return {flavour: future.result() for flavour, future in futures.items()}


@pytest.fixture(scope="session")
def cpu_image(built_images) -> BuiltImage:
    return built_images["cpu"]


@pytest.fixture(scope="session")
def cuda_image(built_images) -> BuiltImage:
    return built_images["cuda"]
