"""What the reliability tests share: test sizes, real servers (fault_server.py on 127.0.0.1,
observed through /proc), the service tests' tiny-ViT exporter and photos, and the check that an
error body is clean.

Sizes are small in CI and scale up with environment variables (``make fuzz`` sets them):
RELIABILITY_FUZZ_CASES (schemathesis cases per operation and mode), RELIABILITY_PROPERTY_EXAMPLES
(hypothesis examples per property), RELIABILITY_SOAK_REQUESTS (soak length),
RELIABILITY_OVERLOAD_SECONDS (overload duration).
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
from live_server import free_port, wait_ready

REPO = Path(__file__).resolve().parents[2]
FAULT_SERVER = Path(__file__).resolve().parent / "fault_server.py"


def scale(name: str, ci_default: int) -> int:
    """A test size: the CI default unless the environment (e.g. `make fuzz`) asks for more."""
    return int(os.environ.get(name, "") or ci_default)


def _service_test_fixtures():
    """tests/service/conftest.py as a module: reuse its tiny-ViT exporter and photo encoder."""
    spec = importlib.util.spec_from_file_location(
        "vitserve_service_conftest_reliability", REPO / "tests" / "service" / "conftest.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


SERVICE_FIXTURES = _service_test_fixtures()
photo_bytes = SERVICE_FIXTURES.photo_bytes
PHOTOS = SERVICE_FIXTURES.PHOTOS


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
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = workdir / f"server-{self.port}.log"
        settings = {
            "VITSERVE_MODEL": str(model),
            "VITSERVE_HOST": "127.0.0.1",
            "VITSERVE_PORT": str(self.port),
            "VITSERVE_LOG_LEVEL": "warning",
            "VITSERVE_INTRA_OP_THREADS": "1",
            "VITSERVE_PREPROCESS_THREADS": "2",
            "VITSERVE_DATA_DIR": str(workdir / "data"),
            "VITSERVE_JOB_ROOT": "",
        }
        # No API key unless ``env`` gives one (an empty key is refused: the variable is left out).
        outer = {k: v for k, v in os.environ.items() if k != "VITSERVE_API_KEY"}
        full_env = {**outer, "PYTHONPATH": str(REPO), **settings, **env}
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, str(FAULT_SERVER)], cwd=REPO, env=full_env, stdout=log, stderr=subprocess.STDOUT
            )

    @property
    def pid(self) -> int:
        return self.process.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, timeout_s: float = 90.0) -> LiveServer:
        wait_ready(self.url, self.process, self.log_path, timeout_s)
        return self

    # -- what the kernel says about the process --------------------------------------------
    def rss_kib(self) -> int:
        return _kib_field(self.pid, "VmRSS")

    def peak_rss_kib(self) -> int:
        return _kib_field(self.pid, "VmHWM")

    def open_fds(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    def settled_fds(self, target: int, timeout_s: float = 3.0) -> int:
        """Open fds once closed client connections are closed on the server side too: waits (up to
        ``timeout_s``) for the count to come down to ``target``, then returns it."""
        deadline = time.monotonic() + timeout_s
        while (fds := self.open_fds()) > target and time.monotonic() < deadline:
            time.sleep(0.05)
        return fds

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


def metric(text: str, sample: str) -> float:
    """One sample's value from Prometheus text (``name{label="x"}``), 0 when absent."""
    match = re.search(rf"^{re.escape(sample)} ([0-9.e+-]+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


class Bystander:
    """A well-behaved client classifying a small photo in a loop while hostile requests run.

    Args:
        url: the server's base URL.
        headers: extra headers (the API key).
        interval_s: pause between its requests.
        timeout_s: how long one of its requests may take before it counts as not answered.
    """

    def __init__(self, url: str, headers: dict[str, str] | None = None, interval_s: float = 0.1, timeout_s: float = 30):
        self.url = url
        self.headers = {**(headers or {}), "Content-Type": "image/jpeg"}
        self.interval_s = interval_s
        self.timeout_s = timeout_s
        self.outcomes: list[int | str] = []  # status codes, or the exception's name
        self._photo = photo_bytes("coffee")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bystander", daemon=True)

    def _run(self) -> None:
        with httpx.Client(timeout=self.timeout_s) as client:
            while not self._stop.is_set():
                try:
                    response = client.post(f"{self.url}/v1/classify", content=self._photo, headers=self.headers)
                    self.outcomes.append(response.status_code)
                except httpx.HTTPError as exc:
                    self.outcomes.append(type(exc).__name__)
                self._stop.wait(self.interval_s)

    def __enter__(self) -> Bystander:
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._stop.set()
        self._thread.join(self.timeout_s + 5)

    def assert_served(self, at_least: int = 1) -> None:
        """Every request it sent was answered 200, and it got to send some."""
        assert len(self.outcomes) >= at_least, f"the bystander sent only {len(self.outcomes)} requests"
        assert all(o == 200 for o in self.outcomes), f"the bystander was not served: {self.outcomes}"


def wait_job(url: str, job_id: str, *, until=("done",), timeout_s: float = 120.0, headers=None) -> dict:
    """Poll GET /v1/jobs/{id} until its state is one of ``until``; the job's description."""
    deadline = time.monotonic() + timeout_s
    while (job := httpx.get(f"{url}/v1/jobs/{job_id}", timeout=10, headers=headers).json())["state"] not in until:
        assert time.monotonic() < deadline, f"job still {job['state']} after {timeout_s} s: {job}"
        time.sleep(0.05)
    return job


def job_rows(url: str, job_id: str, headers=None) -> list[dict]:
    """A job's result rows (JSON lines), in submission order."""
    text = httpx.get(f"{url}/v1/jobs/{job_id}/results", timeout=60, headers=headers).text
    return [json.loads(line) for line in text.splitlines()]


STACK_TRACE = re.compile(r"Traceback \(most recent call last\)|File \"[^\"]+\", line \d+")


def server_paths(guarded: Guarded) -> list[str]:
    """Paths on the server host that no error message may reveal."""
    return [str(REPO), str(guarded.data_dir), str(guarded.outside), sys.prefix, "site-packages", "/proc/"]


def assert_clean_error(
    guarded: Guarded, response: httpx.Response, status: int, code: str | None = None, sent: bytes = b""
) -> None:
    """The documented status and code, our JSON error shape, no stack trace, no server-side path.

    /v2 and its routes answer in the Open Inference Protocol's shape ``{"error": "<message>"}`` (no
    code); every other route in ours, ``{"error": {"code": ..., "message": ...}}``.
    """
    assert response.status_code == status, response.text[:500]
    body = response.json()
    assert set(body) == {"error"}, body
    if response.url.path == "/v2" or response.url.path.startswith("/v2/"):
        assert isinstance(body["error"], str) and body["error"], body
    else:
        assert body["error"]["message"], body
        if code is not None:
            assert body["error"]["code"] == code, body
    assert not STACK_TRACE.search(response.text), response.text
    for path in server_paths(guarded):
        if path.encode() not in sent:  # a client's own string echoed back reveals nothing
            assert path not in response.text, f"error body reveals {path!r}: {response.text}"
