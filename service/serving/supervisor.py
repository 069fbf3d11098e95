"""The multi-process server: N front-end workers and ONE engine process, started, watched, restarted
and drained by this (parent) process.

    supervisor ──fork──► engine process  (service/serving/engine_process.py: batcher + session + jobs)
         │                    ▲  Unix socket per worker: slot numbers in, logits out
         └─fork──► worker 0..N-1 (HTTP, auth, limits, decoding: pre-processed pixels into shared memory)
                       all accept on the one listening socket made here, before the fork

Why processes: one Python process serialises HTTP and pre-processing on its event loop and GIL
(measured: 1.5 of 2 cores, bench/RESULTS.md), so the front end scales out; batching stays in one
process per device, where it sees all traffic.

The workers share one listening socket, inherited from this process, rather than one socket each
(SO_REUSEPORT): connections a killed worker had not accepted yet stay in the shared queue and go
to the others, instead of being reset with the dead worker's own queue.

- Start: the engine process first; the socket listens and the workers start once it has loaded
  the model (an unusable model is one clear message and exit code 2, as in one process).
- Readiness (every worker's /readyz): the engine warm and every worker up (the control block).
- A worker that dies is replaced (only its own connections' requests fail); an engine process
  that dies turns readiness false, its in-flight images fail with 503 in the workers, and it is
  restarted; a child that keeps dying right after starting is restarted with a growing delay.
- SIGTERM / SIGINT: ONE drain deadline, ``shutdown_grace_s`` away, for every process (written in
  the control block): stop listening here, SIGTERM every worker (each drains within the deadline:
  503 to new requests, finishes what it accepted), wait for them, then SIGTERM the engine (its job
  runner stops, its batcher finishes what is left, in what the workers left of the deadline). A
  child still running ``_KILL_MARGIN_S`` past the deadline is killed. A second signal forwards
  SIGTERM again (workers stop at once).
- Children get SIGTERM if this process dies (PR_SET_PDEATHSIG), and their own process group, so
  a terminal's Ctrl-C reaches only this process, which then drains them in order.

Forking needs this process to stay single-threaded and free of ONNX Runtime sessions: the engine
is built in the engine process (``make_engine``), and a fake engine object handed in by a test is
simply inherited by it.
"""

from __future__ import annotations

import ctypes
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from service.core.host import cpu_cores
from service.core.settings import Settings
from service.runtime.engine_protocol import InferenceEngine
from service.serving.control_block import ControlBlock
from service.serving.engine_process import EngineProcessContext, run_engine_process
from service.serving.front_end import WorkerContext

log = logging.getLogger("vitserve.supervisor")

_POLL_S = 0.05
_QUICK_DEATH_S = 5.0  # a child dying sooner than this after its start counts as crash-looping
_MAX_BACKOFF_S = 5.0
# Past the drain deadline, before a child that has not exited is killed (a process's own watchdog
# exits it 4 s past the deadline: service/http/server.py).
_KILL_MARGIN_S = 6.0
_PR_SET_PDEATHSIG = 1
_LISTEN_BACKLOG = 2048

# Workers for VITSERVE_WORKERS=0 on a host without a GPU, per bench/serve.py (bench/RESULTS.md):
# on 2 cores the near-free model peaks with 2 workers; one per core beyond that, the engine
# process needing little CPU on its own.
CPU_WORKERS_PER_CORE = 1


def automatic_workers(on_gpu: bool | None = None) -> int:
    """How many front-end workers ``workers=0`` means on this host (see bench/RESULTS.md)."""
    return max(1, cpu_cores() * CPU_WORKERS_PER_CORE)


def resolve_workers(settings: Settings) -> int:
    return settings.workers or automatic_workers()


def enable_multiprocess_metrics(directory: Path) -> None:
    """prometheus_client's multiprocess mode for every metric created from now on, in this process
    and the ones it forks (the mode is chosen per metric at creation)."""
    from prometheus_client import values

    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(directory)
    values.ValueClass = values.MultiProcessValue()


@dataclass(eq=False)
class _Child:
    role: str  # "engine" or "worker"
    index: int
    pid: int
    started_at: float = field(default_factory=time.monotonic)


class Supervisor:
    """Runs and watches the processes of one server.

    Args:
        settings: the configuration (host, port, grace...).
        workers: how many front-end workers.
        make_engine: builds the engine, called in the engine process.
        serve_worker: a front-end worker's main (HTTP): given the worker's context, returns an exit code.
        listener: a socket already bound to settings.host:port (the CLI binds before anything else,
            so a busy port is one line); None binds here.
    """

    def __init__(
        self,
        settings: Settings,
        workers: int,
        make_engine: Callable[[], InferenceEngine],
        serve_worker: Callable[[WorkerContext], int],
        listener: socket.socket | None = None,
    ) -> None:
        self.settings = settings
        self.workers = workers
        self.make_engine = make_engine
        self.serve_worker = serve_worker
        self.control = ControlBlock(workers)
        self.runtime_dir = Path(tempfile.mkdtemp(prefix="vitserve-"))
        self.metrics_dir = self.runtime_dir / "metrics"
        self.metrics_dir.mkdir()
        self.socket_path = self.runtime_dir / "engine.sock"
        self.listener: socket.socket | None = listener
        self.children: dict[int, _Child] = {}  # pid -> child
        self._failures: dict[tuple[str, int], int] = {}
        self._restart_at: dict[tuple[str, int], float] = {}
        self._signals = 0
        self._pid = os.getpid()

    # -- the main loop ----------------------------------------------------------------------------
    def run(self) -> int:
        enable_multiprocess_metrics(self.metrics_dir)
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        try:
            if self.listener is None:
                self.listener = self._bind()
            code = self._start()
            if code is not None:
                return code
            self._watch()
            return self._drain()
        finally:
            for child in list(self.children.values()):
                _kill(child.pid)
            if self.listener is not None:
                self.listener.close()
            shutil.rmtree(self.runtime_dir, ignore_errors=True)

    def _on_signal(self, signum: int, frame: object) -> None:
        self._signals += 1
        if self._signals > 1:  # a second signal: the workers stop at once (their second signal)
            for child in list(self.children.values()):
                if child.role == "worker":
                    _signal(child.pid, signal.SIGTERM)

    def _bind(self) -> socket.socket:
        host = self.settings.host
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, self.settings.port))
        sock.set_inheritable(True)
        return sock

    def _start(self) -> int | None:
        """Start the engine, then (once it has loaded the model) listen and start the workers.

        Returns an exit code when the server cannot start, None when it runs."""
        engine = self._spawn_engine()
        generation = self.control.engine_generation
        while self.control.engine_listening != generation:
            if self._signals:
                return self._drain()
            pid, status = os.waitpid(engine.pid, os.WNOHANG)
            if pid:
                self.children.pop(pid, None)
                code = os.waitstatus_to_exitcode(status)
                print(f"vitserve serve: the engine process exited with {code} before it was ready", file=sys.stderr)
                return 2 if code == 2 else 1
            time.sleep(_POLL_S)
        assert self.listener is not None
        self.listener.listen(_LISTEN_BACKLOG)
        for index in range(self.workers):
            self._spawn_worker(index)
        host, port = self.listener.getsockname()[:2]
        log.info("supervisor: %d workers and one engine process on %s:%d", self.workers, host, port)
        return None

    def _watch(self) -> None:
        while not self._signals:
            self._reap(restart=True)
            now = time.monotonic()
            for key, when in list(self._restart_at.items()):
                if now >= when:
                    del self._restart_at[key]
                    role, index = key
                    self._spawn_engine() if role == "engine" else self._spawn_worker(index)
            time.sleep(_POLL_S)

    def _reap(self, restart: bool) -> list[tuple[_Child, int]]:
        exited = []
        while self.children:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            child = self.children.pop(pid, None)
            if child is None:
                continue
            code = os.waitstatus_to_exitcode(status)
            exited.append((child, code))
            self._mark_dead(child)
            if restart:
                self._schedule_restart(child, code)
        return exited

    def _mark_dead(self, child: _Child) -> None:
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(child.pid, str(self.metrics_dir))
        if child.role == "worker":
            self.control.set_worker_up(child.index, False)
        else:
            self.control.engine_ready = False

    def _schedule_restart(self, child: _Child, code: int) -> None:
        key = (child.role, child.index)
        quick = time.monotonic() - child.started_at < _QUICK_DEATH_S
        self._failures[key] = self._failures.get(key, 0) + 1 if quick else 0
        delay = min(_MAX_BACKOFF_S, 0.1 * 2 ** self._failures[key]) if quick else 0.0
        name = "engine process" if child.role == "engine" else f"worker {child.index}"
        log.error("%s (pid %d) exited with %d; restarting it in %.1f s", name, child.pid, code, delay)
        self._restart_at[key] = time.monotonic() + delay

    # -- children -----------------------------------------------------------------------------------
    def _spawn_engine(self) -> _Child:
        generation = self.control.next_engine_generation()
        self.control.engine_ready = False
        context = EngineProcessContext(self.control, self.socket_path, self.metrics_dir, generation)
        pid = self._fork(lambda: run_engine_process(self.settings, self.make_engine, context), close_listener=True)
        child = self.children[pid] = _Child("engine", 0, pid)
        return child

    def _spawn_worker(self, index: int) -> _Child:
        assert self.listener is not None
        context = WorkerContext(index, self.workers, self.control, self.socket_path, self.metrics_dir, self.listener)
        pid = self._fork(lambda: self.serve_worker(context), close_listener=False)
        child = self.children[pid] = _Child("worker", index, pid)
        return child

    def _fork(self, main: Callable[[], int], *, close_listener: bool) -> int:
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid:
            return pid
        code = 1
        try:
            os.setpgid(0, 0)  # a terminal's Ctrl-C goes to the supervisor alone
            _die_with_parent(self._pid)
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            if close_listener and self.listener is not None:
                self.listener.close()
            code = main()
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        except BaseException:  # noqa: BLE001 - a child must never return into the supervisor's loop
            logging.getLogger("vitserve").exception("process failed")
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
        raise AssertionError("unreachable")

    # -- shutdown -----------------------------------------------------------------------------------
    def _drain(self) -> int:
        """Workers first (they finish their requests), then the engine. Exit code 0 if all exited cleanly."""
        log.info("supervisor: draining %d process(es)", len(self.children))
        self.control.draining = True
        self._restart_at.clear()
        if self.listener is not None:
            # The workers keep their copies (and answer 503 while they drain); ours must not keep
            # the socket accepting connections that no one will serve once they are gone.
            self.listener.close()
            self.listener = None
        clean = True
        # Set before any child is signalled: each reads it when its SIGTERM comes.
        self.control.drain_deadline = deadline = time.monotonic() + self.settings.shutdown_grace_s
        for role in ("worker", "engine"):
            group = [c for c in self.children.values() if c.role == role]
            for child in group:
                _signal(child.pid, signal.SIGTERM)
            clean &= self._wait_for(group, max(deadline, time.monotonic()) + _KILL_MARGIN_S)
        return 0 if clean else 1

    def _wait_for(self, group: list[_Child], deadline: float) -> bool:
        """Reap ``group``; kill what is still running at ``deadline`` (time.monotonic()). True if all exited 0."""
        clean = True
        waiting = {c.pid for c in group}
        while waiting:
            for child, code in self._reap(restart=False):
                waiting.discard(child.pid)
                if code != 0:
                    name = "engine process" if child.role == "engine" else f"worker {child.index}"
                    log.warning("%s exited with %d while draining", name, code)
                    clean = False
            waiting &= set(self.children)
            if waiting and time.monotonic() >= deadline:
                for pid in waiting:
                    log.error("pid %d still running %.0f s past the drain deadline; killing it", pid, _KILL_MARGIN_S)
                    _kill(pid)
                clean = False
                deadline = time.monotonic() + _KILL_MARGIN_S
            time.sleep(_POLL_S / 5)
        return clean


def _die_with_parent(parent_pid: int) -> None:
    """SIGTERM this (child) process when the supervisor dies, whatever kills it (Linux)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        return
    if os.getppid() != parent_pid:  # it died before prctl took effect
        os.kill(os.getpid(), signal.SIGTERM)


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _kill(pid: int) -> None:
    _signal(pid, signal.SIGKILL)
    try:
        os.waitpid(pid, 0)
    except ChildProcessError:
        pass


def run(
    settings: Settings,
    workers: int,
    make_engine: Callable[[], InferenceEngine],
    serve_worker: Callable[[WorkerContext], int],
    listener: socket.socket | None = None,
) -> int:
    """Serve with ``workers`` front-end processes and one engine process until SIGTERM; the exit code."""
    if not hasattr(os, "fork") or not hasattr(os, "memfd_create"):
        print("vitserve serve: --workers > 1 needs Linux (fork, memfd); use --workers 1", file=sys.stderr)
        return 2
    return Supervisor(settings, workers, make_engine, serve_worker, listener).run()
