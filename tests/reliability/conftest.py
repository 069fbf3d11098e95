"""Real servers for the reliability tests: ``fault_server.py`` (the production server and ONNX
engine, plus test-only fault knobs) started on 127.0.0.1 in a subprocess, observed through /proc.

Sizes are small in CI and scale up with environment variables (``make fuzz`` sets them):
RELIABILITY_FUZZ_CASES (schemathesis cases per route), RELIABILITY_PROPERTY_EXAMPLES (hypothesis
examples per property), RELIABILITY_SOAK_REQUESTS (soak length).
"""

from __future__ import annotations

import importlib.util
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

REPO = Path(__file__).resolve().parents[2]
FAULT_SERVER = Path(__file__).resolve().parent / "fault_server.py"


def scale(name: str, ci_default: int) -> int:
    """A test size: the CI default unless the environment (e.g. `make fuzz`) asks for more."""
    return int(os.environ.get(name, "") or ci_default)


def _service_test_fixtures():
    """tests/service/conftest.py as a module: reuse its tiny-ViT exporter and photo encoder."""
    spec = importlib.util.spec_from_file_location("vitserve_service_conftest_reliability",
                                                  REPO / "tests" / "service" / "conftest.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


SERVICE_FIXTURES = _service_test_fixtures()
photo_bytes = SERVICE_FIXTURES.photo_bytes
PHOTOS = SERVICE_FIXTURES.PHOTOS


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _kib_field(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


class LiveServer:
    """fault_server.py on a free port of 127.0.0.1, configured by VITSERVE_* variables.

    Args:
        model: the .onnx file to serve.
        workdir: where the log (and, unless given, the jobs data dir) go.
        env: extra environment, e.g. {"VITSERVE_MAX_QUEUE_SIZE": "8", "RELIABILITY_ENGINE_DELAY_S": "0.05"}.
    """

    def __init__(self, model: Path, workdir: Path, env: dict[str, str]) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = workdir / f"server-{self.port}.log"
        settings = {"VITSERVE_MODEL": str(model), "VITSERVE_HOST": "127.0.0.1", "VITSERVE_PORT": str(self.port),
                    "VITSERVE_LOG_LEVEL": "warning", "VITSERVE_INTRA_OP_THREADS": "1",
                    "VITSERVE_PREPROCESS_THREADS": "2", "VITSERVE_DATA_DIR": str(workdir / "data"),
                    "VITSERVE_API_KEY": "", "VITSERVE_JOB_ROOT": ""}
        full_env = {**os.environ, "PYTHONPATH": str(REPO), **settings, **env}
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen([sys.executable, str(FAULT_SERVER)], cwd=REPO, env=full_env,
                                            stdout=log, stderr=subprocess.STDOUT)

    @property
    def pid(self) -> int:
        return self.process.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, timeout_s: float = 90.0) -> LiveServer:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited with {self.process.returncode}:\n{self.log()}")
            try:
                if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        raise TimeoutError(f"server not ready after {timeout_s} s:\n{self.log()}")

    # -- what the kernel says about the process --------------------------------------------
    def rss_kib(self) -> int:
        return _kib_field(self.pid, "VmRSS")

    def peak_rss_kib(self) -> int:
        return _kib_field(self.pid, "VmHWM")

    def open_fds(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    def threads(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/task"))

    def thread_names(self) -> dict[str, int]:
        """Thread name (as the kernel has it, 15 characters) -> how many."""
        names: dict[str, int] = {}
        for task in os.listdir(f"/proc/{self.pid}/task"):
            try:
                name = Path(f"/proc/{self.pid}/task/{task}/comm").read_text().strip()
            except FileNotFoundError:
                continue  # ended while we looked
            names[name] = names.get(name, 0) + 1
        return dict(sorted(names.items()))

    # -- ending it ---------------------------------------------------------------------------
    def terminate(self, timeout_s: float = 60.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=timeout_s)

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(timeout=30)


@pytest.fixture(scope="session")
def reliability_model(tmp_path_factory) -> Path:
    """A random-weight ViT-tiny (32 px, 10 labels) exported by model.export, with its metadata."""
    path = tmp_path_factory.mktemp("reliability-model") / "tiny_vit.onnx"
    SERVICE_FIXTURES.export_tiny_vit(path)
    return path


@pytest.fixture
def start_server(reliability_model, tmp_path):
    """Factory: start_server(**env) -> a ready LiveServer; whatever is still running is killed afterwards."""
    started: list[LiveServer] = []

    def start(wait: bool = True, **env: str) -> LiveServer:
        server = LiveServer(reliability_model, tmp_path, {k: str(v) for k, v in env.items()})
        started.append(server)
        return server.wait_ready() if wait else server

    yield start
    for server in started:
        if server.process.poll() is None:
            try:
                server.terminate(timeout_s=15)
            except subprocess.TimeoutExpired:
                server.kill()


@dataclass
class Guarded:
    """The shared hardened server: API key on, a job root with photos and a symlink out of it."""

    server: LiveServer
    api_key: str
    job_root: Path
    data_dir: Path
    outside: Path  # a directory next to the job root that no client may reach

    @property
    def url(self) -> str:
        return self.server.url

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"}


@pytest.fixture(scope="session")
def guarded(reliability_model, tmp_path_factory):
    base = tmp_path_factory.mktemp("guarded")
    job_root, outside = base / "job-root", base / "outside"
    job_root.mkdir()
    outside.mkdir()
    for name in PHOTOS:
        (job_root / f"{name}.jpg").write_bytes(photo_bytes(name))
    (outside / "secret.jpg").write_bytes(photo_bytes("coffee"))
    (job_root / "escape.jpg").symlink_to(outside / "secret.jpg")  # a symlink out of the root
    (job_root / "escape-dir").symlink_to(outside, target_is_directory=True)
    api_key = "rk-" + secrets.token_hex(16)
    server = LiveServer(reliability_model, base, {"VITSERVE_API_KEY": api_key, "VITSERVE_JOB_ROOT": str(job_root),
                                                  "VITSERVE_DATA_DIR": str(base / "data")})
    try:
        server.wait_ready()
        yield Guarded(server, api_key, job_root, base / "data", outside)
    finally:
        try:
            server.terminate(timeout_s=15)
        except subprocess.TimeoutExpired:
            server.kill()
