"""End-to-end fixtures: the service started by its own CLI in a subprocess, and headless Chromium.

Chromium is Debian's package driven by the Python ``playwright`` package (no browser download).
When it is missing the fixture installs it with apt-get if running as root; under CI=true a
missing browser fails the test instead of skipping it.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from live_server import free_port, stop_server, wait_ready

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
REPO = Path(__file__).resolve().parents[2]


def _service_test_fixtures():
    """tests/service/conftest.py as a module: reuse its tiny-ViT exporter instead of copying it."""
    path = REPO / "tests" / "service" / "conftest.py"
    spec = importlib.util.spec_from_file_location("vitserve_service_conftest", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def e2e_model(tmp_path_factory) -> Path:
    """A random-weight ViT-tiny exported to ONNX with the service's metadata (10 digit labels)."""
    path = tmp_path_factory.mktemp("e2e-model") / "tiny_vit.onnx"
    _service_test_fixtures().export_tiny_vit(path)
    return path


def _install_chromium() -> None:
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for command in (
        ["apt-get", "install", "-y", "chromium"],
        ["apt-get", "update"],  # a fresh machine may have no package lists yet
        ["apt-get", "install", "-y", "chromium"],
    ):
        if os.path.exists(CHROMIUM):
            return
        subprocess.run(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, timeout=600, check=False)


@pytest.fixture(scope="session")
def chromium_path() -> str:
    if not os.path.exists(CHROMIUM) and hasattr(os, "geteuid") and os.geteuid() == 0 and shutil.which("apt-get"):
        _install_chromium()
    if not os.path.exists(CHROMIUM):
        message = f"{CHROMIUM} is missing (install Debian's chromium package: apt-get install -y chromium)"
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(message)
        pytest.skip(message)
    return CHROMIUM


@pytest.fixture(scope="module")
def browser(chromium_path):
    # Module scope, not session: playwright's sync API keeps an asyncio loop running in this thread
    # until it exits, and every later test calling asyncio.run() would fail.
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium_path, args=CHROMIUM_ARGS, timeout=60_000)
        yield browser
        browser.close()


class ServiceProcess:
    """``vitserve serve`` in a subprocess on 127.0.0.1; stopped with SIGTERM (its graceful drain).

    Args:
        model: the .onnx file to serve.
        env: extra VITSERVE_* variables (e.g. the API key).
        log_path: where the server's output goes (read it when a test fails).
    """

    def __init__(self, model: Path, env: dict[str, str], log_path: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self._log = open(log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "service.cli",
                "serve",
                "--model",
                str(model),
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--max-batch-size",
                "4",
                "--preprocess-threads",
                "2",
                "--intra-op-threads",
                "1",
                "--log-level",
                "warning",
            ],
            cwd=REPO,
            env={**os.environ, **env},
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    def wait_ready(self, timeout_s: float = 60.0) -> None:
        wait_ready(self.url, self.process, self.log_path, timeout_s)

    def stop(self) -> None:
        stop_server(self.process)
        self._log.close()


@pytest.fixture(scope="session")
def start_service(tmp_path_factory):
    """Factory: start_service(model, **env) -> a ready ServiceProcess, stopped at the end of the session."""
    started: list[ServiceProcess] = []

    def start(model: Path, **env: str) -> ServiceProcess:
        log_path = tmp_path_factory.mktemp("server-log") / "server.log"
        service = ServiceProcess(model, env, log_path)
        started.append(service)
        service.wait_ready()
        return service

    yield start
    for service in started:
        service.stop()
