"""Load-test `vitserve serve` on 127.0.0.1 with real photographs, next to the in-process ceiling.

    .venv/bin/python bench/serve.py --model vit_tiny.onnx [--concurrency 1,8,32,64] [--duration-s 15]
    .venv/bin/python bench/serve.py --near-free --workers 1,2,4 --plain   # the front end alone

``--workers 1,2,4`` runs `vitserve serve --workers W` for each W in turn; ``--plain`` adds a plain
per-request FastAPI server on the same model (bench/plain_server.py); ``--near-free`` serves an
ONNX graph that costs almost nothing (a mean and one small MatMul to 1000 logits), so only the
server's own work shows. Each run also measures the all-core in-process ceiling: one process per
core, each decoding + pre-processing + running batches in a loop, no HTTP. The CPU columns sum the
whole server (supervisor, engine process, workers); "overhead" is the server's CPU per request
minus the in-process loop's for the same image (decode + pre-process + inference), i.e. what HTTP,
the batcher and the processes' messages cost.

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
import tempfile
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


def write_near_free_model(path: Path, image_size: int = 224, classes: int = 1000) -> Path:
    """An ONNX graph pixel_values [N,3,S,S] -> logits [N,1000]: a mean over the pixels and one (3, 1000)
    MatMul, with vitserve metadata (timm's eval transform). Its inference costs microseconds."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from service.core.metadata import ModelMetadata, Preprocessing

    weights = np.random.default_rng(0).normal(size=(3, classes)).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("ReduceMean", ["pixel_values", "axes"], ["means"], keepdims=0),
            helper.make_node("MatMul", ["means", "weights"], ["logits"]),
        ],
        "near_free",
        [helper.make_tensor_value_info("pixel_values", TensorProto.FLOAT, ["batch", 3, image_size, image_size])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", classes])],
        [numpy_helper.from_array(np.array([2, 3], np.int64), "axes"), numpy_helper.from_array(weights, "weights")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=9)
    metadata = ModelMetadata(
        architecture="near_free",
        labels=tuple(f"class{i}" for i in range(classes)),
        preprocessing=Preprocessing.timm_eval(image_size, 0.875, "bicubic"),
    )
    helper.set_model_props(model, metadata.to_props())
    onnx.save(model, path)
    return path


def _ceiling_process(model: str, images: list[bytes], batch: int, seconds: float, out) -> None:
    reference = InProcess(Path(model), images, intra_op_threads=1, jpeg_draft=True)
    out.put(reference.rate(batch, seconds)[0])


def all_core_ceiling(model: Path, images: list[bytes], processes: int, batch: int, seconds: float) -> float:
    """images/s of ``processes`` processes at once, each pre-processing + running batches in a loop."""
    context = multiprocessing.get_context("spawn")
    out = context.Queue()
    workers = [
        context.Process(target=_ceiling_process, args=(str(model), images, batch, seconds, out))
        for _ in range(processes)
    ]
    for worker in workers:
        worker.start()
    rates = [out.get(timeout=seconds + 120) for _ in workers]
    for worker in workers:
        worker.join(timeout=30)
    return sum(rates)


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


def tree_cpu_s(pid: int) -> float:
    """CPU seconds of a process and all its descendants (a multi-process server is a tree)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    total, stack = 0.0, [pid]
    while stack:
        current = stack.pop()
        try:
            total += process_cpu_s(current)
        except (OSError, IndexError, ValueError):
            continue
        stack.extend(children.get(current, []))
    return total


def scrape(port: int, name: str) -> float:
    import urllib.request

    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    values = re.findall(rf"^{re.escape(name)}(?:{{[^}}]*}})? ([0-9.e+-]+)$", text, re.MULTILINE)
    return sum(float(v) for v in values) if values else float("nan")


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
    # No API key unless ``env`` gives one (an empty key is refused, so the outer one is left out).
    outer = {k: v for k, v in os.environ.items() if k != "VITSERVE_API_KEY"}
    process = subprocess.Popen(cmd, cwd=REPO, env={**outer, **env}, stdout=subprocess.DEVNULL)
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


def start_server(args, model: Path, port: int, workers: int) -> subprocess.Popen:
    flags = ["--max-batch-size", str(args.max_batch_size), "--max-queue-delay-ms", str(args.max_queue_delay_ms)]
    flags += ["--workers", str(workers)]
    if args.intra_op_threads:
        flags += ["--intra-op-threads", str(args.intra_op_threads)]
    flags += shlex.split(args.server_args)
    return launch_server(model, port, flags, {"VITSERVE_MAX_QUEUE_SIZE": "1024"})


def start_plain_server(args, model: Path, port: int) -> subprocess.Popen:
    import urllib.error
    import urllib.request

    cmd = [sys.executable, str(REPO / "bench" / "plain_server.py"), str(model), str(port), str(args.intra_op_threads)]
    process = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1).status == 200:
                return process
        except (urllib.error.URLError, ConnectionError, OSError):
            time.sleep(0.2)
    process.kill()
    raise SystemExit("plain server not ready within 60 s")


def stop(process: subprocess.Popen) -> None:
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        process.kill()


def measure(args, variant: dict, c: int, images, reference, best, memory: DeviceMemory) -> dict:
    """One concurrency level against one running server, with the in-process reference right before."""
    port, server, name = variant["port"], variant["process"], variant["name"]
    metrics = name != "plain FastAPI"
    # The machine's load drifts: the reference is re-measured right before each measurement (the
    # servers are idle meanwhile; their ONNX Runtime threads sleep, they do not spin).
    ceiling, ceiling_cpu_ms = reference.rate(best, args.ceiling_seconds)
    single = reference.single_ms(args.ceiling_seconds) if c == 1 else float("nan")
    batches_before = scrape(port, "vitserve_batch_size_count") if metrics else 0.0
    images_before = scrape(port, "vitserve_batch_size_sum") if metrics else 0.0
    cpu_before = tree_cpu_s(server.pid)
    with memory if args.gpu_memory else contextlib.nullcontext():
        result = asyncio.run(load(port, variant["requests"], c, args.warmup_s, args.duration_s))
    cpu_s = tree_cpu_s(server.pid) - cpu_before
    # Every request is one image; without the server's own count, the load generator's will do.
    sent = (scrape(port, "vitserve_batch_size_sum") - images_before) if metrics else result["n"]
    batches = (scrape(port, "vitserve_batch_size_count") - batches_before) if metrics else sent
    result.update(
        variant=name,
        concurrency=c,
        ceiling=ceiling,
        single_ms=single,
        ceiling_cpu_ms=ceiling_cpu_ms,
        server_cpu_ms=cpu_s * 1000 / max(sent, 1),
        mean_batch=sent / max(batches, 1),
        device_memory=memory.summary() if args.gpu_memory else {},
    )
    print(
        f"  {name} c={c}: {result['rps']:.1f} req/s (one-core ceiling {ceiling:.1f}), "
        f"p50 {result['p50']:.1f} ms, {result['server_cpu_ms']:.2f} CPU ms/req",
        file=sys.stderr,
        flush=True,
    )
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, help="exported .onnx model (or --near-free)")
    parser.add_argument("--near-free", action="store_true", help="serve a graph that costs ~nothing (mean + MatMul)")
    parser.add_argument("--workers", default="1", help="comma list of `vitserve serve --workers` values to run")
    parser.add_argument("--plain", action="store_true", help="also run a plain per-request FastAPI server")
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
    if args.near_free == (args.model is not None):
        parser.error("give --model or --near-free (one of them)")
    model = args.model or write_near_free_model(Path(tempfile.mkdtemp(prefix="vitserve-bench-")) / "near_free.onnx")

    load_before = os.getloadavg()[0]
    images = photos_jpeg()
    reference = InProcess(model, images, args.intra_op_threads, jpeg_draft=True)
    sweep = {n: reference.rate(n, args.ceiling_seconds) for n in (int(s) for s in args.ceiling_batch_sizes.split(","))}
    best = max(sweep, key=lambda n: sweep[n][0])
    cores = os.cpu_count() or 1
    all_core = all_core_ceiling(model, images, cores, best, args.ceiling_seconds)
    capacity = (
        decode_capacity(images, reference.engine.metadata.preprocessing, args.decode_capacity_s)
        if args.decode_capacity_s > 0
        else None
    )
    memory = DeviceMemory()
    variants = []
    try:
        for workers in (int(w) for w in args.workers.split(",")):
            port = free_port()
            process = start_server(args, model, port, workers)
            variants.append({"name": f"vitserve --workers {workers}", "port": port, "process": process})
        if args.plain:
            port = free_port()
            variants.append({"name": "plain FastAPI", "port": port, "process": start_plain_server(args, model, port)})
        for variant in variants:
            variant["requests"] = build_requests(images, variant["port"])
        # Every server runs all along and the levels interleave (c=1 on each, then c=8 on each...),
        # so a change in the machine's load hits every server alike.
        rows = [
            measure(args, variant, c, images, reference, best, memory)
            for c in (int(x) for x in args.concurrency.split(","))
            for variant in variants
        ]
    finally:
        for variant in variants:
            stop(variant["process"])
    rows.sort(key=lambda r: [v["name"] for v in variants].index(r["variant"]))
    all_core_after = all_core_ceiling(model, images, cores, best, args.ceiling_seconds)

    engine = reference.engine
    print(
        f"\nservers vs in-process: {engine.metadata.architecture} ({model.name}), {engine.providers[0]}, "
        f"{engine.intra_op_threads} intra-op threads, {cores} CPUs ({platform.machine()}), "
        f"max_batch_size {args.max_batch_size}, max_queue_delay_ms {args.max_queue_delay_ms}, "
        f"load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after"
    )
    print(
        "in-process sweep, one process (pre-process + session.run): "
        + ", ".join(f"batch {n}: {r:.1f} img/s ({cpu:.1f} CPU ms/img)" for n, (r, cpu) in sweep.items())
        + f"; best batch {best}"
    )
    print(
        f"all-core in-process ceiling ({cores} processes, batch {best}, 1 thread each): "
        f"{all_core:.1f} img/s before the servers, {all_core_after:.1f} after\n"
    )
    ceiling = (all_core + all_core_after) / 2
    print(
        "| server | concurrency | req/s | / all-core ceiling | p50 ms | p95 ms | p99 ms | p99/p50 | mean batch "
        "| CPU ms/req server | CPU ms/img in-process | overhead CPU us/req | errors |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        overhead_us = (r["server_cpu_ms"] - r["ceiling_cpu_ms"]) * 1000
        print(
            f"| {r['variant']} | {r['concurrency']} | {r['rps']:.1f} | {r['rps'] / ceiling:.3f} | "
            f"{r['p50']:.1f} | {r['p95']:.1f} | {r['p99']:.1f} | {r['p99'] / r['p50']:.2f} | "
            f"{r['mean_batch']:.1f} | {r['server_cpu_ms']:.2f} | {r['ceiling_cpu_ms']:.2f} | {overhead_us:.0f} | "
            f"{r['errors']} |"
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
                f"\n{r['variant']}, concurrency 1: p50 {r['p50']:.2f} ms vs in-process single image "
                f"{r['single_ms']:.2f} ms (difference {r['p50'] - r['single_ms']:+.2f} ms)"
            )
    if args.json:
        summary = {
            "model": model.name,
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
