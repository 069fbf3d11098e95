"""Batch scoring benchmark: `vitserve score` vs the in-process ceiling, and online latency while a job runs.

    .venv/bin/python bench/score.py [--export vit_tiny_patch16_224 | --model m.onnx] [--images 200]
                                    [--rounds 3] [--pairs 5] [--online-s 15] [--append bench/RESULTS.md]

1. Writes --images JPEG photographs (skimage.data astronaut, coffee, chelsea, rocket at their
   own sizes, 90 % quality) into a temporary folder.
2. In-process ceiling (this process): for each image decode + pre-process (service.runtime.preprocess,
   one thread) then run the engine (service.runtime.engine, all cores) batch by batch, no result file,
   no parallel decoding: the same definition as bench/serve.py's ceiling. The engine alone on
   pre-decoded pixels is printed too (the hard upper bound).
3. `vitserve score FOLDER -o out.jsonl` as a subprocess (the real command): its images/s from its
   own summary (after start-up) and wall clock including start-up. (2) and (3) alternate for
   --rounds rounds; the ratio is the median of each round's (3) / (2), so a shared machine's
   drifting load hits both sides alike.
4. Starts `vitserve serve` and measures concurrency-8 closed-loop /v1/classify traffic
   (bench/serve.py's raw-asyncio load generator) in --pairs alternating windows: without a job,
   then while a scoring job over the same images runs (POST /v1/jobs manifest under
   VITSERVE_JOB_ROOT, submitted as the window starts, cancelled at its end), and so on; medians
   of p50/p95 and req/s, job images scored during the online windows, and the job's own rate
   on the idle service.
Prints a markdown table; --append adds it to a results file with date and machine.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import io
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket")


def _bench_serve():
    # bench/serve.py's load generator and helpers (bench/ is not a package)
    spec = importlib.util.spec_from_file_location("bench_serve", REPO / "bench" / "serve.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_photos(folder: Path, count: int) -> list[bytes]:
    import skimage.data
    from PIL import Image

    jpegs = []
    for name in PHOTOS:
        buf = io.BytesIO()
        Image.fromarray(getattr(skimage.data, name)()).convert("RGB").save(buf, "JPEG", quality=90)
        jpegs.append(buf.getvalue())
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        (folder / f"{i:05d}_{PHOTOS[i % 4]}.jpg").write_bytes(jpegs[i % 4])
    return jpegs


def export_random(name: str, workdir: Path) -> Path:
    from model.checkpoint import import_checkpoint
    from model.export import export_model

    loaded = import_checkpoint(f"random:{name}")
    path = workdir / f"{name}.onnx"
    print(f"exporting {name} (random weights) ...", file=sys.stderr, flush=True)
    export_model(
        loaded.model,
        loaded.config,
        path,
        labels=loaded.labels,
        preprocessing=loaded.preprocessing,
        source=loaded.source,
        weights_sha256=loaded.weights_sha256,
    )
    return path


def in_process_ceiling(model: Path, folder: Path, batch_size: int) -> tuple[float, float, float]:
    """(decode + engine images/s, engine-only images/s, CPU ms per image) over the folder, serially."""
    from service.runtime.engine import Engine
    from service.runtime.preprocess import load_pixels

    engine = Engine(model, log_placement=False)
    p = engine.metadata.preprocessing
    files = sorted(folder.iterdir())
    engine.run(np.stack([load_pixels(files[0].read_bytes(), p, max_pixels=10**8)] * batch_size))  # warm the shape
    started, cpu_started = time.perf_counter(), time.process_time()
    engine_s = 0.0
    for start in range(0, len(files), batch_size):
        batch = np.stack([load_pixels(f.read_bytes(), p, max_pixels=10**8) for f in files[start : start + batch_size]])
        t0 = time.perf_counter()
        engine.run(batch)
        engine_s += time.perf_counter() - t0
    total_s = time.perf_counter() - started
    cpu_ms = 1000.0 * (time.process_time() - cpu_started) / len(files)  # all threads, ORT's included
    return len(files) / total_s, len(files) / engine_s, cpu_ms


def run_score_command(
    model: Path, folder: Path, out: Path, workers: int, batch_size: int
) -> tuple[float, float, float]:
    """(images/s the command reports, images/s over its wall clock incl. start-up, its CPU ms per image)."""
    started = time.perf_counter()
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "service.cli",
            "score",
            str(folder),
            "-o",
            str(out),
            "--model",
            str(model),
            "--workers",
            str(workers),
            "--batch-size",
            str(batch_size),
            "--quiet",
        ],
        capture_output=True,
        text=True,
        timeout=1800,
        cwd=REPO,
    )
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"vitserve score failed:\n{done.stderr}")
    rate = float(re.search(r"([0-9.]+) images/s", done.stderr).group(1))
    cpu_ms = float(re.search(r"([0-9.]+) CPU ms/image", done.stderr).group(1))
    lines = sum(1 for _ in open(out))
    return rate, lines / wall, cpu_ms


def start_server(model: Path, port: int, env: dict[str, str]) -> subprocess.Popen:
    return _bench_serve().launch_server(model, port, [], env)


def http_json(port: int, method: str, path: str, body: bytes | None = None, content_type: str = "") -> dict:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}",
        data=body,
        method=method,
        headers={"Content-Type": content_type} if content_type else {},
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def online_with_and_without_job(
    model: Path, folder: Path, jpegs: list[bytes], concurrency: int, online_s: float, pairs: int, data_dir: Path
) -> dict:
    serve = _bench_serve()
    port = serve.free_port()
    server = start_server(
        model,
        port,
        {
            "VITSERVE_DATA_DIR": str(data_dir),
            "VITSERVE_JOB_ROOT": str(folder),
            "VITSERVE_MAX_QUEUE_SIZE": "1024",
        },
    )
    try:
        requests = serve.build_requests(jpegs, port)
        body = json.dumps({"paths": sorted(p.name for p in folder.iterdir())}).encode()
        # Alternate windows (no job, job, no job, job, ...) so that drifting load from other processes
        # on a shared machine hits both sides alike; each job starts with its window and is cancelled
        # at its end.
        alone, with_job, during = [], [], 0
        for window in range(2 * pairs):
            if window % 2 == 0:
                alone.append(asyncio.run(serve.load(port, requests, concurrency, 1.0, online_s / pairs)))
                continue
            job = http_json(port, "POST", "/v1/jobs", body, "application/json")
            with_job.append(asyncio.run(serve.load(port, requests, concurrency, 1.0, online_s / pairs)))
            during += http_json(port, "DELETE", f"/v1/jobs/{job['id']}")["done"]
        # The job alone, for its own throughput on the idle service.
        job = http_json(port, "POST", "/v1/jobs", body, "application/json")
        while (state := http_json(port, "GET", f"/v1/jobs/{job['id']}"))["state"] != "done":
            time.sleep(0.1)
        return {
            "alone": alone,
            "with_job": with_job,
            "job_images_during": during,
            "job_alone_rate": state["images_per_second"],
        }
    finally:
        server.terminate()
        server.wait(timeout=30)


def median_of(rows: list[dict], key: str) -> float:
    return float(np.median([row[key] for row in rows]))


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        model_name = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if "model name" in line)
        cpu = model_name
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {len(os.sched_getaffinity(0))} cores, {platform.system()} {platform.release()}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="exported .onnx model (default: export's --export, random weights)")
    parser.add_argument("--export", default="vit_tiny_patch16_224", help="timm-style name to export when no --model")
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved (ceiling, vitserve score) rounds")
    parser.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--online-s", type=float, default=12.0, help="online seconds measured per side")
    parser.add_argument("--pairs", type=int, default=5, help="alternating (no job, job) window pairs")
    parser.add_argument("--append", type=Path, help="append the table to this markdown file")
    args = parser.parse_args(argv)

    workdir = Path(tempfile.mkdtemp(prefix="vitserve-bench-score-"))
    load_before = os.getloadavg()[0]
    try:
        model = args.model or export_random(args.export, workdir)
        folder = workdir / "images"
        jpegs = write_photos(folder, args.images)
        # Interleaved rounds (ceiling, command, ceiling, command...): each ratio compares neighbours.
        rounds = []
        for r in range(args.rounds):
            print(
                f"round {r + 1}/{args.rounds}: in-process ceiling, then vitserve score ...", file=sys.stderr, flush=True
            )
            ceiling, engine_only, ceiling_cpu = in_process_ceiling(model, folder, args.batch_size)
            rate, wall_rate, score_cpu = run_score_command(
                model, folder, workdir / f"out{r}.jsonl", args.workers, args.batch_size
            )
            rounds.append(
                {
                    "ceiling": ceiling,
                    "engine": engine_only,
                    "rate": rate,
                    "wall": wall_rate,
                    "ceiling_cpu": ceiling_cpu,
                    "score_cpu": score_cpu,
                }
            )
        print("online traffic with and without a job ...", file=sys.stderr, flush=True)
        online = online_with_and_without_job(
            model, folder, jpegs, args.concurrency, args.online_s, args.pairs, workdir / "data"
        )
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    load_after = os.getloadavg()[0]

    ratios = [r["rate"] / r["ceiling"] for r in rounds]
    alone, with_job = online["alone"], online["with_job"]
    a50, j50 = median_of(alone, "p50"), median_of(with_job, "p50")
    alone_p50s = ", ".join(f"{w['p50']:.0f}" for w in alone)
    job_p50s = ", ".join(f"{w['p50']:.0f}" for w in with_job)
    per_round = "; ".join(f"{r['rate']:.1f}/{r['ceiling']:.1f}" for r in rounds)
    table = "\n".join(
        [
            f"### bench/score.py, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
            "",
            f"- machine: {machine()}; load average {load_before:.1f} before, {load_after:.1f} after (a shared "
            "machine: other processes ran meanwhile)",
            f"- model: {args.model.name if args.model else args.export + ' (random weights)'}; {args.images} JPEG "
            f"photos (skimage.data, 300x451 to 512x512); batch {args.batch_size}; `vitserve score --workers "
            f"{args.workers}`; {args.rounds} interleaved rounds; online: c={args.concurrency} closed loop, "
            f"{args.pairs} alternating window pairs of {args.online_s / args.pairs:.1f} s",
            "",
            "| measure | value |",
            "| --- | --- |",
            f"| in-process ceiling (decode + engine, one loop), median | {median_of(rounds, 'ceiling'):.1f} img/s |",
            f"| engine alone on decoded pixels, median | {median_of(rounds, 'engine'):.1f} img/s |",
            f"| `vitserve score` (its own rate, after start-up), median | {median_of(rounds, 'rate'):.1f} img/s |",
            f"| `vitserve score` / ceiling, median of rounds | **{float(np.median(ratios)):.2f}** "
            f"(rounds: {', '.join(f'{x:.2f}' for x in ratios)}; img/s {per_round}) |",
            f"| `vitserve score` wall clock incl. start-up, median | {median_of(rounds, 'wall'):.1f} img/s |",
            f"| CPU ms per image: ceiling loop / `vitserve score` (process + decode workers), median | "
            f"{median_of(rounds, 'ceiling_cpu'):.1f} / {median_of(rounds, 'score_cpu'):.1f} "
            f"(ratio {median_of(rounds, 'score_cpu') / median_of(rounds, 'ceiling_cpu'):.2f}) |",
            f"| online, no job: p50 / p95 / req/s / errors (median of windows) | {a50:.1f} ms / "
            f"{median_of(alone, 'p95'):.1f} ms / {median_of(alone, 'rps'):.1f} / {sum(w['errors'] for w in alone)} |",
            f"| online, job running: p50 / p95 / req/s / errors (median of windows) | {j50:.1f} ms / "
            f"{median_of(with_job, 'p95'):.1f} ms / {median_of(with_job, 'rps'):.1f} / "
            f"{sum(w['errors'] for w in with_job)} |",
            f"| online p50 with job / without | **{j50 / a50:.2f}** (p50 per window, ms: no job {alone_p50s}; "
            f"job {job_p50s}) |",
            f"| job images scored while online traffic ran ({args.pairs} jobs, cancelled at window end) | "
            f"{online['job_images_during']} |",
            f"| the job alone on the idle service | {online['job_alone_rate']:.1f} img/s |",
            "",
        ]
    )
    print(table)
    if args.append:
        with open(args.append, "a") as f:
            f.write("\n" + table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
