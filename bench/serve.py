"""Load-test `vitserve serve` on 127.0.0.1 with real photographs, next to the in-process ceiling.

    .venv/bin/python bench/serve.py --model vit_tiny.onnx [--concurrency 1,8,32,64] [--duration-s 15]

What it does, all bounded in time:
1. In-process ceiling, in this process with the server not running: pre-process the photos
   (service.preprocess, one thread) and run the ONNX Runtime session (service.engine, the same
   intra-op threads as the server) for batch sizes 1..max, back to back; the best images/s is
   the ceiling. Also the single-image latency (pre-process 1 + run 1), median.
2. Starts `vitserve serve` on a free port and, for each concurrency C, keeps C keep-alive
   connections busy for --duration-s (closed loop: each sends its next request as soon as the
   answer arrives) with JPEG photographs from skimage.data (astronaut, coffee, chelsea, rocket),
   after a short warm-up per level. The load generator is raw asyncio HTTP/1.1 (pre-built
   requests, no client library) so it takes as little of the shared CPU as possible.
3. Prints one table: req/s, p50/p95/p99 latency, req/s / ceiling, p99/p50, mean batch size
   (from the server's /metrics).
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import platform
import re
import signal
import socket
import statistics
import subprocess
import sys
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
def in_process_ceiling(model: Path, images: list[bytes], batch_sizes: list[int], intra_op_threads: int,
                       seconds_per_size: float) -> dict:
    from service.engine import Engine
    from service.preprocess import load_pixels

    engine = Engine(model, intra_op_threads=intra_op_threads, log_placement=False)
    p = engine.metadata.preprocessing
    engine.warmup(batch_sizes, repeats=2)
    rates = {}
    for n in batch_sizes:
        done, started = 0, time.perf_counter()
        i = 0
        while time.perf_counter() - started < seconds_per_size or done < 3 * n:
            batch = np.stack([load_pixels(images[(i + j) % len(images)], p, max_pixels=10**8) for j in range(n)])
            engine.run(batch)
            done += n
            i += n
        rates[n] = done / (time.perf_counter() - started)
    single = []
    for i in range(max(20, int(seconds_per_size * 20))):
        started = time.perf_counter()
        engine.run(load_pixels(images[i % len(images)], p, max_pixels=10**8)[None])
        single.append((time.perf_counter() - started) * 1000)
        if sum(single) > seconds_per_size * 1000 and len(single) >= 20:
            break
    best = max(rates, key=rates.get)
    return {"rates": rates, "best_batch": best, "ceiling": rates[best], "single_ms": statistics.median(single),
            "providers": engine.providers, "threads": engine.intra_op_threads,
            "architecture": engine.metadata.architecture}


# -- 2. the load generator -------------------------------------------------------------------------
def build_requests(images: list[bytes], port: int) -> list[bytes]:
    return [(f"POST /v1/classify?top_k=5 HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: image/jpeg\r\n"
             f"Content-Length: {len(data)}\r\n\r\n").encode() + data for data in images]


async def _read_response(reader: asyncio.StreamReader) -> int:
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head[9:12])
    match = re.search(rb"(?i)content-length:\s*(\d+)", head)
    await reader.readexactly(int(match.group(1)) if match else 0)
    return status


async def _connection(port: int, requests: list[bytes], offset: int, stop_at: float, record_from: float,
                      latencies: list[float], errors: list[int]) -> None:
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
    await asyncio.gather(*(_connection(port, requests, c, stop_at, record_from, latencies, errors)
                           for c in range(concurrency)))
    elapsed = time.perf_counter() - record_from
    q = np.percentile(latencies, [50, 95, 99]) if latencies else [float("nan")] * 3
    return {"rps": len(latencies) / elapsed, "p50": q[0], "p95": q[1], "p99": q[2], "n": len(latencies),
            "errors": len(errors)}


# -- 3. server control ------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scrape(port: int, name: str) -> float:
    import urllib.request

    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    match = re.search(rf"^{re.escape(name)} ([0-9.e+-]+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else float("nan")


def start_server(args, port: int) -> subprocess.Popen:
    import urllib.error
    import urllib.request

    cmd = [sys.executable, "-m", "service.cli", "serve", "--model", str(args.model), "--port", str(port),
           "--max-batch-size", str(args.max_batch_size), "--max-queue-delay-ms", str(args.max_queue_delay_ms),
           "--log-level", "warning"]
    if args.intra_op_threads:
        cmd += ["--intra-op-threads", str(args.intra_op_threads)]
    env = dict(os.environ, VITSERVE_MAX_QUEUE_SIZE="1024", VITSERVE_API_KEY="")
    process = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL)
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
    parser.add_argument("--ceiling-seconds", type=float, default=4.0, help="seconds per batch size for the ceiling")
    args = parser.parse_args()

    images = photos_jpeg()
    sizes = [int(s) for s in args.ceiling_batch_sizes.split(",")]
    ceiling = in_process_ceiling(args.model, images, sizes, args.intra_op_threads, args.ceiling_seconds)
    port = free_port()
    server = start_server(args, port)
    rows = []
    try:
        requests = build_requests(images, port)
        for c in (int(x) for x in args.concurrency.split(",")):
            batches_before = scrape(port, "vitserve_batch_size_count")
            images_before = scrape(port, "vitserve_batch_size_sum")
            result = asyncio.run(load(port, requests, c, args.warmup_s, args.duration_s))
            batches = scrape(port, "vitserve_batch_size_count") - batches_before
            result["mean_batch"] = (scrape(port, "vitserve_batch_size_sum") - images_before) / max(batches, 1)
            result["concurrency"] = c
            rows.append(result)
            print(f"  c={c}: {result['rps']:.1f} req/s, p50 {result['p50']:.1f} ms", file=sys.stderr, flush=True)
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()

    print(f"\nvitserve serve vs in-process ceiling: {ceiling['architecture']} ({args.model.name}), "
          f"{ceiling['providers'][0]}, {ceiling['threads']} intra-op threads, {os.cpu_count()} CPUs, "
          f"{platform.processor() or platform.machine()}, max_batch_size {args.max_batch_size}, "
          f"max_queue_delay_ms {args.max_queue_delay_ms}")
    print("in-process (pre-process + session.run, one thread feeding): "
          + ", ".join(f"batch {n}: {r:.1f} img/s" for n, r in ceiling["rates"].items())
          + f"; ceiling {ceiling['ceiling']:.1f} img/s at batch {ceiling['best_batch']};"
          f" single image {ceiling['single_ms']:.2f} ms (median)\n")
    print("| concurrency | req/s | p50 ms | p95 ms | p99 ms | p99/p50 | req/s / ceiling | mean batch | errors |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['concurrency']} | {r['rps']:.1f} | {r['p50']:.1f} | {r['p95']:.1f} | {r['p99']:.1f} | "
              f"{r['p99'] / r['p50']:.2f} | {r['rps'] / ceiling['ceiling']:.3f} | {r['mean_batch']:.1f} | "
              f"{r['errors']} |")
    if rows and rows[0]["concurrency"] == 1:
        print(f"\nconcurrency 1: p50 {rows[0]['p50']:.2f} ms vs in-process single image {ceiling['single_ms']:.2f} ms "
              f"(+{rows[0]['p50'] - ceiling['single_ms']:.2f} ms)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
