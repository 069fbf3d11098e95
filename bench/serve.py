"""Load-test `vitserve serve` on 127.0.0.1 with real photographs, next to the in-process ceiling.

    .venv/bin/python bench/serve.py --model vit_tiny.onnx [--concurrency 1,8,32,64] [--duration-s 15]

What it does, all bounded in time:
1. In-process ceiling, in this process: pre-process the photos (service.runtime.preprocess, one
   thread) and run the ONNX Runtime session (service.runtime.engine, the same intra-op threads as the
   server) for batch sizes 1..16 back to back; the best batch size's images/s is the ceiling,
   re-measured right before every concurrency level (the server idle meanwhile) so that a
   drifting machine load hits both sides alike. Also the single-image latency, median.
2. Starts `vitserve serve` on a free port and, for each concurrency C, keeps C keep-alive
   connections busy for --duration-s (closed loop: each sends its next request as soon as the
   answer arrives) with JPEG photographs from skimage.data (astronaut, coffee, chelsea, rocket),
   after a short warm-up per level. The load generator is raw asyncio HTTP/1.1 (pre-built
   requests, no client library) so it takes as little of the shared CPU as possible.
3. Prints one table: req/s, p50/p95/p99 latency, req/s / ceiling, p99/p50, mean batch size
   (from the server's /metrics), and CPU milliseconds per image of the server process next to
   the in-process loop's: on a shared machine wall-clock rates drift with other load, CPU time
   per image shows the overhead regardless.

On a GPU host the one-thread ceiling is the decoder, not the GPU: ``--decode-capacity-s`` measures
what all the host's cores decode (JPEG -> normalised pixels, one process per core), the bound a
JPEG service can reach there, and the table gives req/s against it; ``--gpu-memory`` samples the
device's memory during every level (first, highest, last MiB: it must stay flat);
``--server-args`` passes flags to `vitserve serve` (e.g. ``--workers 16``); ``--json`` keeps every number.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import multiprocessing
import os
import platform
import re
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket")


def photos_jpeg(quality: int = 90) -> list[bytes]:
    import skimage.data
    from PIL import Image

    out = []
    for name in PHOTOS:
        buf = io.BytesIO()
        Image.fromarray(getattr(skimage.data, name)()).convert("RGB").save(buf, "JPEG", quality=quality)
        out.append(buf.getvalue())
    return out


# -- 1. the in-process ceiling ---------------------------------------------------------------------
class InProcess:
    """The reference the server is compared with: pre-process + session.run in one loop, no HTTP."""

    def __init__(self, model: Path, images: list[bytes], intra_op_threads: int, jpeg_draft: bool) -> None:
        from service.runtime.engine import Engine

        self.engine = Engine(model, intra_op_threads=intra_op_threads, log_placement=False)
        self.images = images
        self.jpeg_draft = jpeg_draft

    def _pixels(self, i: int) -> np.ndarray:
        from service.runtime.preprocess import load_pixels

        return load_pixels(
            self.images[i % len(self.images)],
            self.engine.metadata.preprocessing,
            max_pixels=10**8,
            jpeg_draft=self.jpeg_draft,
        )

    def rate(self, n: int, seconds: float) -> tuple[float, float]:
        """(images/s, CPU ms per image) for batches of n, pre-processing included, over ~``seconds``."""
        self.engine.run(np.stack([self._pixels(j) for j in range(n)]))  # warm this shape
        done, i, started, cpu_started = 0, 0, time.perf_counter(), time.process_time()
        while time.perf_counter() - started < seconds or done < 3 * n:
            self.engine.run(np.stack([self._pixels(i + j) for j in range(n)]))
            done += n
            i += n
        return done / (time.perf_counter() - started), (time.process_time() - cpu_started) * 1000 / done

    def single_ms(self, seconds: float) -> float:
        """Median latency of one image: pre-process + run."""
        times: list[float] = []
        while sum(times) < seconds * 1000 or len(times) < 20:
            started = time.perf_counter()
            self.engine.run(self._pixels(len(times))[None])
            times.append((time.perf_counter() - started) * 1000)
        return statistics.median(times)


def _decode_worker(args: tuple[list[bytes], object, float]) -> int:
    from service.runtime.preprocess import load_pixels

    images, preprocessing, seconds = args
    done, stop = 0, time.perf_counter() + seconds
    while time.perf_counter() < stop:
        load_pixels(images[done % len(images)], preprocessing, max_pixels=10**8, jpeg_draft=True)
        done += 1
    return done


def decode_capacity(images: list[bytes], preprocessing, seconds: float) -> tuple[float, int]:
    """(images/s, processes): JPEG -> normalised pixels on every core at once, one process each."""
    cores = len(os.sched_getaffinity(0))
    with multiprocessing.get_context("fork").Pool(cores) as pool:
        started = time.perf_counter()
        done = sum(pool.map(_decode_worker, [(images, preprocessing, seconds)] * cores))
        elapsed = time.perf_counter() - started
    return done / elapsed, cores


class DeviceMemory:
    """Samples the GPU's used memory (nvidia-smi, MiB) in a thread while a level runs: first, highest, last."""

    def __init__(self, interval_s: float = 0.5) -> None:
        self.interval_s = interval_s
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @staticmethod
    def read() -> float | None:
        try:
            out = subprocess.run(
                ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                capture_output=True,
                text=True,
                timeout=5,
            )
            return float(out.stdout.split()[0]) if out.returncode == 0 else None
        except (OSError, subprocess.SubprocessError, ValueError, IndexError):
            return None

    def __enter__(self) -> DeviceMemory:
        self.samples = []
        self._stop.clear()

        def sample() -> None:
            while True:
                value = self.read()
                if value is None:
                    return
                self.samples.append(value)
                if self._stop.wait(self.interval_s):
                    return

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def summary(self) -> dict:
        if not self.samples:
            return {}
        return {"first_mib": self.samples[0], "max_mib": max(self.samples), "last_mib": self.samples[-1]}


# -- 2. the load generator -------------------------------------------------------------------------
def build_requests(images: list[bytes], port: int) -> list[bytes]:
    return [
        (
            f"POST /v1/classify?top_k=5 HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: image/jpeg\r\n"
            f"Content-Length: {len(data)}\r\n\r\n"
        ).encode()
        + data
        for data in images
    ]


async def _read_response(reader: asyncio.StreamReader) -> int:
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head[9:12])
    match = re.search(rb"(?i)content-length:\s*(\d+)", head)
    await reader.readexactly(int(match.group(1)) if match else 0)
    return status


async def _connection(
    port: int,
    requests: list[bytes],
    offset: int,
    stop_at: float,
    record_from: float,
    latencies: list[float],
    errors: list[int],
) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    i = offset
    try:
        while True:
            now = time.perf_counter()
            if now >= stop_at:
                break
            writer.write(requests[i % len(requests)])
            status = await _read_response(reader)
            done = time.perf_counter()
            if now >= record_from:
                (latencies.append((done - now) * 1000) if status == 200 else errors.append(status))
            i += 1
    finally:
        writer.close()


async def load(port: int, requests: list[bytes], concurrency: int, warmup_s: float, duration_s: float) -> dict:
    start = time.perf_counter()
    record_from, stop_at = start + warmup_s, start + warmup_s + duration_s
    latencies: list[float] = []
    errors: list[int] = []
    await asyncio.gather(
        *(_connection(port, requests, c, stop_at, record_from, latencies, errors) for c in range(concurrency))
    )
    elapsed = time.perf_counter() - record_from
    q = np.percentile(latencies, [50, 95, 99]) if latencies else [float("nan")] * 3
    return {
        "rps": len(latencies) / elapsed,
        "p50": q[0],
        "p95": q[1],
        "p99": q[2],
        "n": len(latencies),
        "errors": len(errors),
    }


# -- 3. server control ------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def process_cpu_s(pid: int) -> float:
    """user + system CPU seconds of a process (Linux /proc): the server's cost, whatever the load."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def scrape(port: int, name: str) -> float:
    import urllib.request

    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    match = re.search(rf"^{re.escape(name)} ([0-9.e+-]+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else float("nan")


def launch_server(model: Path | str, port: int, flags: list[str], env: dict[str, str]) -> subprocess.Popen:
    """`vitserve serve --model MODEL --port PORT FLAGS` with ``env`` added; returns once /readyz is 200."""
    import urllib.error
    import urllib.request

    cmd = [
        sys.executable,
        "-m",
        "service.cli",
        "serve",
        "--model",
        str(model),
        "--port",
        str(port),
        "--log-level",
        "warning",
        *flags,
    ]
    process = subprocess.Popen(cmd, cwd=REPO, env={**os.environ, **env}, stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"server exited with {process.returncode}")
        try:
            if urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1).status == 200:
                return process
        except (urllib.error.URLError, ConnectionError, OSError):
            time.sleep(0.2)
    process.kill()
    raise SystemExit("server not ready within 120 s")


def start_server(args, port: int) -> subprocess.Popen:
    flags = ["--max-batch-size", str(args.max_batch_size), "--max-queue-delay-ms", str(args.max_queue_delay_ms)]
    if args.intra_op_threads:
        flags += ["--intra-op-threads", str(args.intra_op_threads)]
    flags += shlex.split(args.server_args)
    return launch_server(args.model, port, flags, {"VITSERVE_MAX_QUEUE_SIZE": "1024", "VITSERVE_API_KEY": ""})


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, required=True, help="exported .onnx model")
    parser.add_argument("--concurrency", default="1,8,32,64", help="comma list of concurrent clients")
    parser.add_argument("--duration-s", type=float, default=15.0, help="measured seconds per concurrency")
    parser.add_argument("--warmup-s", type=float, default=3.0, help="unmeasured seconds before each level")
    parser.add_argument("--max-batch-size", type=int, default=8)
    parser.add_argument("--max-queue-delay-ms", type=float, default=2.0)
    parser.add_argument("--intra-op-threads", type=int, default=0, help="0 = one per core (the server's default)")
    parser.add_argument("--ceiling-batch-sizes", default="1,2,4,8,16")
    parser.add_argument(
        "--ceiling-seconds", type=float, default=4.0, help="seconds per measurement of the in-process reference"
    )
    parser.add_argument("--server-args", default="", help="more `vitserve serve` flags, e.g. '--workers 16'")
    parser.add_argument(
        "--decode-capacity-s",
        type=float,
        default=0.0,
        help="measure JPEG decode + pre-processing on every core for this long (0 = not measured)",
    )
    parser.add_argument("--gpu-memory", action="store_true", help="sample the GPU's used memory during each level")
    parser.add_argument("--json", type=Path, help="also write every number here")
    args = parser.parse_args()

    load_before = os.getloadavg()[0]
    images = photos_jpeg()
    reference = InProcess(args.model, images, args.intra_op_threads, jpeg_draft=True)
    sweep = {n: reference.rate(n, args.ceiling_seconds) for n in (int(s) for s in args.ceiling_batch_sizes.split(","))}
    best = max(sweep, key=lambda n: sweep[n][0])
    capacity = (
        decode_capacity(images, reference.engine.metadata.preprocessing, args.decode_capacity_s)
        if args.decode_capacity_s > 0
        else None
    )
    memory = DeviceMemory()
    port = free_port()
    server = start_server(args, port)
    rows = []
    try:
        requests = build_requests(images, port)
        for c in (int(x) for x in args.concurrency.split(",")):
            # The machine's load can drift: re-measure the reference right before each level (the
            # server is idle meanwhile; its ONNX Runtime threads sleep, they do not spin).
            ceiling, ceiling_cpu_ms = reference.rate(best, args.ceiling_seconds)
            single = reference.single_ms(args.ceiling_seconds) if c == 1 else float("nan")
            batches_before = scrape(port, "vitserve_batch_size_count")
            images_before = scrape(port, "vitserve_batch_size_sum")
            cpu_before = process_cpu_s(server.pid)
            with memory if args.gpu_memory else contextlib.nullcontext():
                result = asyncio.run(load(port, requests, c, args.warmup_s, args.duration_s))
            cpu_s = process_cpu_s(server.pid) - cpu_before
            images_run = scrape(port, "vitserve_batch_size_sum") - images_before
            batches = scrape(port, "vitserve_batch_size_count") - batches_before
            result.update(
                concurrency=c,
                ceiling=ceiling,
                single_ms=single,
                ceiling_cpu_ms=ceiling_cpu_ms,
                server_cpu_ms=cpu_s * 1000 / max(images_run, 1),
                mean_batch=images_run / max(batches, 1),
                device_memory=memory.summary() if args.gpu_memory else {},
            )
            rows.append(result)
            print(
                f"  c={c}: {result['rps']:.1f} req/s (ceiling {ceiling:.1f}), p50 {result['p50']:.1f} ms",
                file=sys.stderr,
                flush=True,
            )
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()

    engine = reference.engine
    print(
        f"\nvitserve serve vs in-process: {engine.metadata.architecture} ({args.model.name}), {engine.providers[0]}, "
        f"{engine.intra_op_threads} intra-op threads, {os.cpu_count()} CPUs ({platform.machine()}), "
        f"max_batch_size {args.max_batch_size}, max_queue_delay_ms {args.max_queue_delay_ms}, "
        f"load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after"
    )
    print(
        "in-process sweep (pre-process + session.run): "
        + ", ".join(f"batch {n}: {r:.1f} img/s ({cpu:.1f} CPU ms/img)" for n, (r, cpu) in sweep.items())
        + f"; best batch {best}\n"
    )
    print(
        "| concurrency | req/s | in-process ceiling img/s | ratio | p50 ms | p95 ms | p99 ms | p99/p50 "
        "| mean batch | CPU ms/img server | CPU ms/img in-process | errors |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['concurrency']} | {r['rps']:.1f} | {r['ceiling']:.1f} | {r['rps'] / r['ceiling']:.3f} | "
            f"{r['p50']:.1f} | {r['p95']:.1f} | {r['p99']:.1f} | {r['p99'] / r['p50']:.2f} | "
            f"{r['mean_batch']:.1f} | {r['server_cpu_ms']:.1f} | {r['ceiling_cpu_ms']:.1f} | {r['errors']} |"
        )
    if capacity is not None:
        rate, cores = capacity
        print(
            f"\nhost decode capacity (JPEG -> normalised pixels, {cores} processes at once): {rate:.0f} img/s; "
            + ", ".join(f"c={r['concurrency']}: {r['rps'] / rate:.2f} of it" for r in rows)
        )
    if args.gpu_memory:
        print(
            "\ndevice memory during each level (nvidia-smi, MiB used on the GPU, every process): "
            + (
                "; ".join(
                    f"c={r['concurrency']}: first {m['first_mib']:.0f}, highest {m['max_mib']:.0f}, "
                    f"last {m['last_mib']:.0f}"
                    for r in rows
                    if (m := r["device_memory"])
                )
                or "not available (no nvidia-smi)"
            )
        )
    for r in rows:
        if r["concurrency"] == 1:
            print(
                f"\nconcurrency 1: server p50 {r['p50']:.2f} ms vs in-process single image {r['single_ms']:.2f} ms "
                f"(difference {r['p50'] - r['single_ms']:+.2f} ms)"
            )
    if args.json:
        summary = {
            "model": args.model.name,
            "providers": engine.providers,
            "server_args": args.server_args,
            "settings": {k: v for k, v in os.environ.items() if k.startswith("VITSERVE_")},
            "sweep": {n: {"images_per_s": r, "cpu_ms": c} for n, (r, c) in sweep.items()},
            "decode_capacity": {"images_per_s": capacity[0], "processes": capacity[1]} if capacity else None,
            "rows": rows,
        }
        args.json.write_text(json.dumps(summary, indent=1, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
