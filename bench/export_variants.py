"""Images/s of one ViT as PyTorch eager, ONNX unfused, ONNX fused fp32 and ONNX int8, on the CPU.

    .venv/bin/python bench/export_variants.py                       # ViT-B/16 at 224, batch 1, 8, 32
    .venv/bin/python bench/export_variants.py --model vit_tiny_patch16_224 --batch-sizes 1 8
    .venv/bin/python bench/export_variants.py --model vit_small_r26_s32_224 vit_base_r50_s16_224  # the hybrids

Every variant runs the same random-weight model (``random:<model>``) on the same random input,
ONNX Runtime with the CPU provider. "ONNX unfused" is the same export with the model's explicit
softmax attention (MatMul-Softmax-MatMul, what exporters produced before opset 23); "fused" and
"int8" are exactly what `vitserve export --precision fp32|int8` ships. For a hybrid (R+ViT) the
ONNX variants carry its weight standardisation folded into the Conv weights, the eager model
recomputes it at every call (as timm does); int8 quantizes the transformer's MatMul/Gemm only,
the backbone's convolutions stay fp32.

Each variant is timed in blocks of calls, in several passes over all variants (see measure()),
and the median call reported. Prints a markdown table and the two target ratios.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model.checkpoint import import_checkpoint  # noqa: E402 - needs sys.path above
from model.export import export_model, torch_to_onnx  # noqa: E402 - needs sys.path above
from model.onnx_io import save_onnx  # noqa: E402 - needs sys.path above
from model.verify import graph_stats  # noqa: E402 - needs sys.path above

VARIANTS = ("PyTorch eager", "ONNX unfused", "ONNX fused fp32", "ONNX int8")


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def ort_runner(path: Path, threads: int | None) -> Callable[[np.ndarray], np.ndarray]:
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return lambda x: session.run(["logits"], {"pixel_values": x})[0]


def torch_runner(model: torch.nn.Module) -> Callable[[np.ndarray], np.ndarray]:
    def run(x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return model(torch.from_numpy(x)).numpy()

    return run


def build_variants(model_name: str, workdir: Path, threads: int | None) -> dict[str, Callable]:
    loaded = import_checkpoint(f"random:{model_name}")
    model, config = loaded.model.eval(), loaded.config
    common = dict(
        labels=loaded.labels,
        preprocessing=loaded.preprocessing,
        source=loaded.source,
        weights_sha256=loaded.weights_sha256,
    )
    print(
        f"exporting {model_name} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters) ...",
        file=sys.stderr,
    )
    model.set_explicit_attention(True)
    try:
        unfused = torch_to_onnx(model, config)
    finally:
        model.set_explicit_attention(False)
    save_onnx(unfused, workdir / "unfused.onnx")
    fused = export_model(model, config, workdir / "fused.onnx", precision="fp32", **common)
    int8 = export_model(model, config, workdir / "int8.onnx", precision="int8", **common)
    stats = {name: graph_stats(onnx.load(workdir / f"{name}.onnx")) for name in ("unfused", "fused", "int8")}
    for name, s in stats.items():
        print(
            f"  {name:8} {s.node_count:4} nodes, {s.fused_attention} fused attention, {s.softmax} Softmax",
            file=sys.stderr,
        )
    return {
        "PyTorch eager": torch_runner(model),
        "ONNX unfused": ort_runner(workdir / "unfused.onnx", threads),
        "ONNX fused fp32": ort_runner(fused.path, threads),
        "ONNX int8": ort_runner(int8.path, threads),
    }


def measure(
    runners: dict[str, Callable], batch: int, image_size: int, passes: int, seconds_per_block: float, min_calls: int
) -> tuple[dict[str, float], dict[str, float]]:
    """Median images/s and median CPU milliseconds per image of each runner at one batch size.

    Each pass runs every variant as one block of timed calls (``min_calls`` at least, more until
    ``seconds_per_block``); the first pass starts each block with an untimed warm-up call
    (allocations, kernel selection, thread pool start). Blocks, not alternating single calls:
    ONNX Runtime's worker threads spin for a while after each run and would steal the cores from
    whatever runs next. Several passes spread the noise of a shared machine over all variants.
    CPU time (this process, all its threads) is far less sensitive to other processes than wall
    time; it includes the runtimes' spin-waiting, so it overstates the work a little.
    """
    x = np.random.default_rng(0).standard_normal((batch, 3, image_size, image_size), dtype=np.float32)
    times: dict[str, list[float]] = {name: [] for name in runners}
    cpu_times: dict[str, list[float]] = {name: [] for name in runners}
    for pass_index in range(passes):
        for name, run in runners.items():
            if pass_index == 0:
                run(x)
            block_start = time.perf_counter()
            calls = 0
            while calls < min_calls or time.perf_counter() - block_start < seconds_per_block:
                t0, c0 = time.perf_counter(), time.process_time()
                run(x)
                times[name].append(time.perf_counter() - t0)
                cpu_times[name].append(time.process_time() - c0)
                calls += 1
    rates = {name: batch / statistics.median(t) for name, t in times.items()}
    cpu_ms = {name: 1000 * statistics.median(t) / batch for name, t in cpu_times.items()}
    return rates, cpu_ms


def report(model_name: str, args: argparse.Namespace) -> None:
    """Measure every variant of one model and print its tables and ratios."""
    with tempfile.TemporaryDirectory(prefix="vitserve-bench-") as tmp:
        runners = build_variants(model_name, Path(tmp), args.threads)
        image_size = int(model_name.rsplit("_", 1)[1])
        results, cpu_ms = {}, {}
        load_before = os.getloadavg()[0]
        for batch in args.batch_sizes:
            print(f"measuring batch {batch} ...", file=sys.stderr)
            results[batch], cpu_ms[batch] = measure(
                runners, batch, image_size, args.passes, args.seconds_per_block, args.min_calls
            )

    when = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    print(f"{model_name}, images/s (median over {args.passes} passes of timed blocks), {when}")
    print(
        f"{cpu_name()}, {os.cpu_count()} logical cores; "
        f"torch {torch.__version__} ({torch.get_num_threads()} threads), "
        f"onnxruntime threads: {args.threads or 'default'}, "
        f"onnxruntime {ort.__version__} CPUExecutionProvider; "
        f"load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after\n"
    )
    header = "| variant | " + " | ".join(f"batch {b}" for b in args.batch_sizes) + " |"
    print(header)
    print("|" + "---|" * (len(args.batch_sizes) + 1))
    for name in VARIANTS:
        print(f"| {name} | " + " | ".join(f"{results[b][name]:.1f}" for b in args.batch_sizes) + " |")
    print("\nCPU milliseconds per image (all threads of this process; lower is better):\n")
    print(header)
    print("|" + "---|" * (len(args.batch_sizes) + 1))
    for name in VARIANTS:
        print(f"| {name} | " + " | ".join(f"{cpu_ms[b][name]:.0f}" for b in args.batch_sizes) + " |")
    print()
    for b in args.batch_sizes:
        r = results[b]
        print(
            f"batch {b}: fused fp32 / eager = {r['ONNX fused fp32'] / r['PyTorch eager']:.2f}x, "
            f"fused / unfused = {r['ONNX fused fp32'] / r['ONNX unfused']:.2f}x, "
            f"int8 / fused fp32 = {r['ONNX int8'] / r['ONNX fused fp32']:.2f}x; by CPU time: "
            f"{cpu_ms[b]['PyTorch eager'] / cpu_ms[b]['ONNX fused fp32']:.2f}x, "
            f"{cpu_ms[b]['ONNX unfused'] / cpu_ms[b]['ONNX fused fp32']:.2f}x, "
            f"{cpu_ms[b]['ONNX fused fp32'] / cpu_ms[b]['ONNX int8']:.2f}x"
        )
    if 8 in results:
        r = results[8]
        ok_fused = r["ONNX fused fp32"] / r["PyTorch eager"] >= 1.3
        ok_int8 = r["ONNX int8"] / r["ONNX fused fp32"] >= 1.5
        print(
            f"\ntargets at batch 8: fused fp32 >= 1.3x eager: {'met' if ok_fused else 'MISSED'}; "
            f"int8 >= 1.5x fused fp32: {'met' if ok_int8 else 'MISSED'}"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--model", nargs="+", default=["vit_base_patch16_224"], help="one table per model (plain or hybrid)"
    )
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--passes", type=int, default=2, help="blocks per variant and batch size")
    parser.add_argument("--seconds-per-block", type=float, default=2.0)
    parser.add_argument("--min-calls", type=int, default=2, help="timed calls per block at least")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="intra-op threads for PyTorch and ONNX Runtime alike (default: their own, one per core). "
        "1 on a shared machine: PyTorch's OpenMP threads wait at barriers for a descheduled "
        "sibling, which made eager 3-30x slower here under load while ONNX Runtime's pool coped",
    )
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    for model_name in args.model:
        report(model_name, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
