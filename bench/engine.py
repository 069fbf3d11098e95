"""Engine throughput and latency per batch size, for each exported model, provider and engine option set.

    .venv/bin/python bench/engine.py --export vit_tiny_patch16_224 --precisions fp32,int8     # here (CPU)
    python3 bench/engine.py --model vit_b16_fp16.onnx --model vit_b16_fp32.onnx              # GPU (bench/gpu.sh)

Every number comes from ``service.runtime.engine.Engine``, exactly as the service runs it. One timed
call = stack n single images into a batch (as the batcher does) + ``engine.run`` (upload,
compute, logits back to the host, synchronised). Per batch size: a warm-up, then calls for
``--seconds`` (3 at least, best of ``--passes`` blocks); images/s = n / median call.

Engine option sets ("configs"; by default all on CUDA, ``default`` alone on the CPU):
  default           the service's defaults (IO binding with a device input per batch size on CUDA)
  plain             no IO binding: session.run with host arrays
  buckets           batch_buckets = the measured sizes: fixed device buffers bound once
  static            buckets + one fixed-batch session per bucket (shape arithmetic folded; any provider)
  pinned            buckets + page-locked host buffers
  cudagraph         buckets + one CUDA graph per bucket
  cudagraph+pinned  both
  X/buffer          X, the batch stacked straight into the engine's (pinned) buffer: what the batcher
                    could do with engine.input_buffer(n), saving one host copy per batch
Also measured: host->device copy of one batch from pageable and from pinned memory, and JPEG
decode + resize + normalise per image on one core (service.runtime.preprocess), so the service's ceiling
can be split into decode, transfer and compute.

Prints markdown tables (device, versions, date on top); ``--markdown``/``--json`` write them to files.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from service.core.gpu_config import GpuOptions  # noqa: E402 - needs sys.path above
from service.runtime.engine import CPU, CUDA, GPU_PROVIDERS, TENSORRT, Engine, automatic_providers  # noqa: E402 - needs sys.path above
from service.runtime.gpu_options import pinned_array  # noqa: E402 - needs sys.path above

DEFAULT_BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256)
GPU_CONFIGS = (
    "default",
    "plain",
    "buckets",
    "static",
    "pinned",
    "cudagraph",
    "cudagraph+pinned",
    "pinned/buffer",
    "cudagraph+pinned/buffer",
)
# The targets for ViT-B/16 fp16 on one H200 (issue 21; ~35 GFLOP per image bounds it at ~22,000 img/s).
TARGET_IMAGES_PER_S = 12000.0
TARGET_BATCH1_MS = 1.5
# The option sets the service can turn on, and the settings that do it (bench/gpu.sh serves with the
# best one); "plain", "static" and the "/buffer" rows have no service setting.
SERVICE_OPTION_SETTINGS = {
    "buckets": {},
    "pinned": {"VITSERVE_PINNED_HOST_MEMORY": "true"},
    "cudagraph": {"VITSERVE_CUDA_GRAPHS": "true"},
    "cudagraph+pinned": {"VITSERVE_CUDA_GRAPHS": "true", "VITSERVE_PINNED_HOST_MEMORY": "true"},
}


# -- what runs where ---------------------------------------------------------------------------------
def device_name(provider: str) -> str:
    if provider in GPU_PROVIDERS:
        try:
            query = ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"]
            out = subprocess.run(query, capture_output=True, text=True, timeout=20, check=True).stdout.strip()
            return f"{out.splitlines()[0]} (name, driver, memory)"
        except (OSError, subprocess.SubprocessError, IndexError):
            return "unknown GPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()}, {len(os.sched_getaffinity(0))} cores"
    except OSError:
        pass
    return platform.processor() or platform.machine()


def versions() -> str:
    import onnxruntime as ort

    return f"onnxruntime {ort.__version__}, numpy {np.__version__}, Python {platform.python_version()}"


def engine_for(model: Path, provider: str, config: str, sizes: list[int]) -> Engine:
    buckets = tuple(sorted(set(sizes)))
    options = {
        "default": GpuOptions(),
        "plain": GpuOptions(),
        "buckets": GpuOptions(batch_buckets=buckets),
        "static": GpuOptions(batch_buckets=buckets, static_shapes=True),
        "pinned": GpuOptions(batch_buckets=buckets, pinned_host_memory=True),
        "cudagraph": GpuOptions(batch_buckets=buckets, cuda_graphs=True),
        "cudagraph+pinned": GpuOptions(batch_buckets=buckets, cuda_graphs=True, pinned_host_memory=True),
        "trt-cache": GpuOptions(trt_cache_dir=Path(tempfile.gettempdir()) / "vitserve-trt-cache"),
    }[config.split("/")[0]]
    providers = [provider] if provider == CPU else [provider, CPU]
    return Engine(
        model,
        providers=providers,
        log_placement=False,
        io_binding=False if config == "plain" else None,
        gpu_options=options,
    )


# -- measuring ------------------------------------------------------------------------------------------
def time_sizes(
    engine: Engine,
    sizes: list[int],
    seconds: float,
    max_call_s: float,
    passes: int = 1,
    feed: str = "array",
    seed: int = 0,
) -> dict:
    """batch size -> {images_per_s, p50_ms, p90_ms, p99_ms, calls, pass_images_per_s}.

    One call stacks n single images into a batch and runs it, as the service's batcher does:
    ``feed="array"`` stacks into a new array (the batcher today), ``"buffer"`` stacks straight
    into ``engine.input_buffer(n)`` (with buckets: the bucket's own, maybe pinned, host buffer).

    Each size is timed in ``passes`` blocks of ``seconds``; the block with the lowest median call
    is reported (on a shared machine the least disturbed one), every block's rate is kept.
    Sizes after one whose median call exceeds ``max_call_s`` are skipped.
    """
    rng = np.random.default_rng(seed)
    results: dict[int, dict] = {}

    def call(images: list[np.ndarray]) -> None:
        batch = np.stack(images, out=engine.input_buffer(len(images))) if feed == "buffer" else np.stack(images)
        engine.run(batch)

    for n in sizes:
        # Several distinct batches: a single one would let caches hold the input (METHOD.md).
        inputs = [list(rng.standard_normal((n, *engine.input_shape), dtype=np.float32)) for _ in range(3)]
        for images in inputs[:2]:  # warm-up: allocation, kernel choice, graph capture
            call(images)
        blocks: list[list[float]] = []
        cpu_s: list[float] = []  # process CPU time (every thread) per block
        for _ in range(max(1, passes)):
            times: list[float] = []
            cpu_started = time.process_time()
            started = time.perf_counter()
            while len(times) < 3 or time.perf_counter() - started < seconds:
                images = inputs[len(times) % len(inputs)]
                t0 = time.perf_counter()
                call(images)
                times.append(time.perf_counter() - t0)
            cpu_s.append(time.process_time() - cpu_started)
            blocks.append(times)
        best = min(range(len(blocks)), key=lambda i: statistics.median(blocks[i]))
        times = blocks[best]
        p50, p90, p99 = np.percentile(times, [50, 90, 99])
        results[n] = {
            "images_per_s": n / p50,
            "p50_ms": p50 * 1e3,
            "p90_ms": p90 * 1e3,
            "p99_ms": p99 * 1e3,
            "calls": len(times),
            "pass_images_per_s": [n / statistics.median(b) for b in blocks],
            # CPU time per image hardly moves when neighbours take the cores; wall time does.
            "cpu_ms_per_image": cpu_s[best] / (len(times) * n) * 1e3,
        }
        spread = ", ".join(f"{n / statistics.median(b):.1f}" for b in blocks)
        print(
            f"    batch {n:4}: {n / p50:9.1f} img/s, p50 {p50 * 1e3:8.2f} ms ({len(times)} calls; passes {spread})",
            file=sys.stderr,
            flush=True,
        )
        if p50 > max_call_s:
            break  # larger batches would take longer than the budget allows
    return results


def time_uploads(shape_chw: tuple[int, int, int], sizes: list[int], repeats: int = 10) -> dict:
    """batch size -> median ms to copy float32 pixels host->device, from pageable and from pinned memory."""
    import onnxruntime as ort

    out: dict[int, dict] = {}
    for n in sizes:
        host = np.random.default_rng(n).standard_normal((n, *shape_chw), dtype=np.float32)
        device = ort.OrtValue.ortvalue_from_shape_and_type(host.shape, np.float32, "cuda", 0)
        row = {}
        sources = [("pageable", host)]
        try:
            pinned, _ = pinned_array(host.shape, np.float32)
            pinned[:] = host
            sources.append(("pinned", np.asarray(pinned)))
        except OSError as exc:
            print(f"    no pinned memory: {exc}", file=sys.stderr)
        for name, source in sources:
            device.update_inplace(source)
            times = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                device.update_inplace(source)
                times.append(time.perf_counter() - t0)
            ms = statistics.median(times) * 1e3
            row[name] = {"ms": ms, "gb_per_s": host.nbytes / (ms / 1e3) / 1e9}
        out[n] = row
    return out


def time_decode(image_size: int, seconds: float = 2.0) -> dict:
    """JPEG bytes -> normalised pixels for the skimage photographs, on one core: ms per image."""
    import skimage.data
    from PIL import Image

    from service.core.metadata import Preprocessing
    from service.runtime.preprocess import load_pixels

    jpegs = []
    for name in ("astronaut", "coffee", "chelsea", "rocket"):
        buf = io.BytesIO()
        Image.fromarray(getattr(skimage.data, name)()).convert("RGB").save(buf, "JPEG", quality=90)
        jpegs.append(buf.getvalue())
    p = Preprocessing.timm_eval(image_size)
    times = []
    started = time.perf_counter()
    while len(times) < 20 or time.perf_counter() - started < seconds:
        t0 = time.perf_counter()
        load_pixels(jpegs[len(times) % len(jpegs)], p, max_pixels=10**8)
        times.append(time.perf_counter() - t0)
    ms = statistics.median(times) * 1e3
    return {"ms_per_image": ms, "images_per_s_per_core": 1e3 / ms, "cores": len(os.sched_getaffinity(0))}


# -- exporting (here, where torch is) ---------------------------------------------------------------------
def export_models(name: str, precisions: list[str], workdir: Path) -> list[Path]:
    from model.checkpoint import import_checkpoint
    from model.export import export_model

    loaded = import_checkpoint(f"random:{name}")
    paths = []
    for precision in precisions:
        path = workdir / f"{name}_{precision}.onnx"
        print(f"exporting {name} {precision} ...", file=sys.stderr, flush=True)
        export_model(
            loaded.model,
            loaded.config,
            path,
            labels=loaded.labels,
            preprocessing=loaded.preprocessing,
            source=loaded.source,
            weights_sha256=loaded.weights_sha256,
            precision=precision,
        )
        paths.append(path)
    return paths


# -- reporting --------------------------------------------------------------------------------------------
def markdown(report: dict) -> str:
    sizes = report["batch_sizes"]
    lines = [
        f"### bench/engine.py, {report['date']}",
        "",
        f"- device: {report['device']}",
        f"- {report['versions']}; per batch size the median call of the best of {report['passes']} "
        f"block(s) of {report['seconds']} s",
        f"- command: `{report['command']}`",
        "",
        "images/s (p50 ms per call; CPU ms of this process per image); `-` = not run (a smaller batch "
        "already took over the per-call budget)",
        "",
        "| model | precision | provider | config | " + " | ".join(f"batch {b}" for b in sizes) + " |",
        "|---|---|---|---|" + "---:|" * len(sizes),
    ]
    for row in report["rows"]:
        cells = []
        for b in sizes:
            r = row["results"].get(str(b)) or row["results"].get(b)
            cells.append(f"{r['images_per_s']:.1f} ({r['p50_ms']:.2f}; {r['cpu_ms_per_image']:.1f})" if r else "-")
        provider = row["provider"].removesuffix("ExecutionProvider")
        lines.append(
            f"| {row['architecture']} | {row['precision']} | {provider} | {row['config']} | " + " | ".join(cells) + " |"
        )
    for row in report["rows"]:
        if row.get("error"):
            lines.append(
                f"\n{row['architecture']} {row['precision']} {row['provider']} {row['config']}: FAILED: {row['error']}"
            )
    if report.get("uploads"):
        lines += [
            "",
            "host->device copy of one float32 batch, median ms (GB/s)",
            "",
            "| batch | pageable | pinned |",
            "|---:|---:|---:|",
        ]

        def cell(row: dict, k: str) -> str:
            return f"{row[k]['ms']:.3f} ({row[k]['gb_per_s']:.1f})" if k in row else "-"

        for n, row in report["uploads"].items():
            lines.append(f"| {n} | {cell(row, 'pageable')} | {cell(row, 'pinned')} |")
    if report.get("decode"):
        d = report["decode"]
        lines += [
            "",
            f"JPEG decode + resize + normalise (service.runtime.preprocess, skimage photos): "
            f"{d['ms_per_image']:.2f} ms per image per core = {d['images_per_s_per_core']:.0f} img/s per core, "
            f"{d['images_per_s_per_core'] * d['cores']:.0f} img/s on {d['cores']} cores at best",
        ]
    lines += ["", *report.get("verdicts", [])]
    return "\n".join(lines) + "\n"


def verdicts(rows: list[dict]) -> list[str]:
    out = []
    for row in rows:
        results = {int(k): v for k, v in row["results"].items()}
        if not results:
            continue
        best_n = max(results, key=lambda n: results[n]["images_per_s"])
        line = (
            f"- {row['architecture']} {row['precision']} {row['provider'].removesuffix('ExecutionProvider')} "
            f"{row['config']}: best {results[best_n]['images_per_s']:.0f} img/s at batch {best_n}"
        )
        if 1 in results:
            line += f"; batch 1 p50 {results[1]['p50_ms']:.2f} ms"
        if row["provider"] in GPU_PROVIDERS and row["precision"] == "fp16" and "base" in row["architecture"]:
            met = (
                results[best_n]["images_per_s"] >= TARGET_IMAGES_PER_S
                and results.get(1, {"p50_ms": 1e9})["p50_ms"] <= TARGET_BATCH1_MS
            )
            line += (
                f" (targets >= {TARGET_IMAGES_PER_S:.0f} img/s, batch 1 <= {TARGET_BATCH1_MS} ms: "
                f"{'met' if met else 'MISSED'})"
            )
        out.append(line)
    return out


def best_options(report: dict, precision: str = "fp16", buckets: str = "1,8,32,128") -> tuple[dict[str, str], str]:
    """(service settings, why) for the engine option set that pays most on CUDA for ``precision``.

    Compared at the largest batch size every option set was timed at: an option set pays when its
    images/s beat the service's default by more than the default row's own spread between timed
    blocks (at least 2%). Nothing pays -> no settings (the defaults).
    """
    rows = {
        r["config"]: {int(k): v for k, v in r["results"].items()}
        for r in report["rows"]
        if r.get("precision") == precision and r["provider"] == CUDA and r["results"] and not r.get("error")
    }
    default = rows.get("default")
    if not default:
        return {}, f"no {precision} default row on CUDA: the service keeps its defaults"
    options = {c: rows[c] for c in SERVICE_OPTION_SETTINGS if c in rows}
    shared = set(default).intersection(*options.values()) if options else set()
    if not shared:
        return {}, "no option set was timed on CUDA at a batch size the default row has: defaults"
    n = max(shared)
    rates = default[n]["pass_images_per_s"]
    spread = max(0.02, (max(rates) - min(rates)) / statistics.median(rates))
    base = default[n]["images_per_s"]
    config, rate = max(((c, r[n]["images_per_s"]) for c, r in options.items()), key=lambda cr: cr[1])
    if rate <= base * (1 + spread):
        return {}, (
            f"at batch {n} no option set beats the default ({base:.0f} img/s) by more than {spread:.1%} "
            f"(best {config}: {rate:.0f}): defaults"
        )
    settings = {"VITSERVE_BATCH_BUCKETS": buckets, **SERVICE_OPTION_SETTINGS[config]}
    return settings, f"at batch {n} {config} runs {rate:.0f} img/s, the default {base:.0f} (spread {spread:.1%})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, action="append", default=[], help="exported .onnx file (repeatable)")
    parser.add_argument(
        "--export", metavar="NAME", help="export random:NAME first (needs torch), e.g. vit_base_patch16_224"
    )
    parser.add_argument("--precisions", default="fp32,int8", help="with --export: comma list of fp32, fp16, int8")
    parser.add_argument(
        "--providers", default="", help="comma list (cuda, tensorrt, cpu); default: the GPU ones that load, else cpu"
    )
    parser.add_argument(
        "--configs",
        default="",
        help=f"comma list of {', '.join(GPU_CONFIGS)}, trt-cache; default: "
        "all on CUDA, default+trt-cache on TensorRT, default on CPU",
    )
    parser.add_argument("--batch-sizes", default=",".join(map(str, DEFAULT_BATCH_SIZES)))
    parser.add_argument(
        "--option-batch-sizes",
        default="",
        help="batch sizes for every option set but 'default' (e.g. 32,128); empty = --batch-sizes",
    )
    parser.add_argument(
        "--best-env",
        type=Path,
        metavar="ENGINE_JSON",
        help="print why (a '# ' line), then the service settings (KEY=VALUE lines) of the option set that "
        "paid most in this --json report, and exit",
    )
    parser.add_argument("--seconds", type=float, default=1.0, help="timed seconds per batch size")
    parser.add_argument(
        "--passes",
        type=int,
        default=1,
        help="timed blocks per batch size; the least disturbed one is reported (use 3 on a shared CPU)",
    )
    parser.add_argument("--max-call-s", type=float, default=3.0, help="stop a row once one call takes this long")
    parser.add_argument("--markdown", type=Path, help="also write the tables here")
    parser.add_argument("--json", type=Path, help="also write every number here")
    args = parser.parse_args(argv)
    if args.best_env:
        settings, why = best_options(json.loads(args.best_env.read_text()))
        print("\n".join([f"# {why}", *(f"{k}={v}" for k, v in settings.items())]))
        return 0

    sizes = [int(s) for s in args.batch_sizes.split(",") if s.strip()]
    option_sizes = [int(s) for s in args.option_batch_sizes.split(",") if s.strip()] or sizes
    aliases = {"cuda": CUDA, "tensorrt": TENSORRT, "trt": TENSORRT, "cpu": CPU}
    if args.providers:
        providers = [aliases.get(p.strip().lower(), p.strip()) for p in args.providers.split(",") if p.strip()]
    else:
        found = automatic_providers()
        providers = [p for p in found if p != CPU] or [CPU]
    tmp = tempfile.TemporaryDirectory(prefix="vitserve-bench-engine-")
    models = list(args.model)
    if args.export:
        models += export_models(args.export, [p.strip() for p in args.precisions.split(",")], Path(tmp.name))
    if not models:
        parser.error("give --model PATH (repeatable) or --export NAME")

    rows: list[dict] = []
    device = "; ".join(sorted({device_name(p) for p in providers}))
    command = "bench/engine.py " + " ".join(argv if argv is not None else sys.argv[1:])

    def write_report(rows: list[dict], finished: bool, extra: dict | None = None) -> dict:
        """The report so far, written to --markdown/--json: after every row, so a run cut short keeps its rows."""
        report = {
            "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
            "device": device,
            "versions": versions(),
            "command": command,
            "seconds": args.seconds,
            "passes": args.passes,
            "batch_sizes": sorted(set(sizes) | set(option_sizes)),
            "rows": rows,
            "finished": finished,
            **{k: v for k, v in (extra or {}).items() if k in ("uploads", "decode")},
        }
        report["verdicts"] = [*verdicts(rows), f"- service settings to serve with: {best_options(report)[1]}"]
        if not finished:
            report["verdicts"].append("- (partial: the run has not finished)")
        if args.markdown:
            args.markdown.write_text(markdown(report))
        if args.json:
            args.json.write_text(json.dumps(report, indent=1, default=str))
        return report

    for provider in providers:
        if args.configs:
            configs = [c.strip() for c in args.configs.split(",") if c.strip()]
        else:
            configs = {CUDA: list(GPU_CONFIGS), TENSORRT: ["default", "trt-cache"]}.get(provider, ["default"])
        for model in models:
            for config in configs:
                print(f"{model.name} on {provider}, {config}", file=sys.stderr, flush=True)
                row = {"model": model.name, "provider": provider, "config": config, "results": {}}
                config_sizes = sizes if config == "default" else option_sizes
                try:
                    engine = engine_for(model, provider, config, config_sizes)
                    row.update(
                        architecture=engine.metadata.architecture,
                        precision=engine.metadata.precision,
                        providers=engine.providers,
                        describe=engine.describe(),
                        image_size=engine.input_shape[1],
                    )
                    if engine.providers[0] != provider:
                        raise RuntimeError(f"asked for {provider}, the session runs on {engine.providers}")
                    if provider in GPU_PROVIDERS:
                        engine.warmup(config_sizes)  # every size (graph capture included) before any timing
                    feed = "buffer" if config.endswith("/buffer") else "array"
                    row["results"] = time_sizes(engine, config_sizes, args.seconds, args.max_call_s, args.passes, feed)
                except Exception as exc:  # noqa: BLE001 - one failing option set must not lose the others
                    row.setdefault("architecture", model.stem)
                    row.setdefault("precision", "?")
                    row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"
                    print(f"    FAILED: {row['error']}", file=sys.stderr)
                finally:
                    engine = None  # free the device memory before the next option set
                rows.append(row)
                write_report(rows, finished=False)

    image_size = next((r["image_size"] for r in rows if "image_size" in r), 224)
    report = write_report(rows, finished=False)
    report["uploads"] = time_uploads((3, image_size, image_size), sizes) if CUDA in providers else {}
    report["decode"] = time_decode(image_size)
    print(markdown(write_report(rows, finished=True, extra=report)))
    tmp.cleanup()
    return 1 if any(r.get("error") for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
