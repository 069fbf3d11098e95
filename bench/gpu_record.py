"""The GPU machine's record (bench/gpu.sh, stage 1): the machine, the onnxruntime it runs, and how attention ran.

    python3 bench/gpu_record.py --model vit_b16_fp16.onnx --model vit_b16_fp32.onnx --markdown machine.md
    python3 bench/gpu_record.py --compare vit_b16_fp32.onnx vit_b16_fp16.onnx     # fp16 vs fp32, photographs

Per model, from one profiled run of ``service.runtime.engine.Engine`` (as the service runs it):
- node placement from ONNX Runtime's profile: every fused attention node of the graph, by name,
  and the provider that ran it; compute-heavy ops that ran on the CPU; Memcpy nodes;
- the GPU kernels of one run, from CUPTI through torch.profiler (the machine's torch shares the
  process's CUDA context), with the attention kernels picked out;
- the first attention node alone, as a one-node graph with the same inputs and attributes, run
  and traced the same way: its kernels are exactly what ONNX Runtime chose for Attention
  (flash, memory-efficient, cuDNN, or unfused softmax), with ORT's own kernel report
  (ORT_ENABLE_ATTENTION_KERNEL_DEBUG_INFO) where this build prints one.
Without CUDA (the dry run here) it records the same for the CPU provider and says what it could not.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import re
import subprocess
import sys
import tempfile
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from service.core.onnx_facts import (  # noqa: E402
    CPU_PROVIDER,
    CUDA_PROVIDER,
    FUSED_ATTENTION_OP_TYPES,
    is_fused_attention,
)

HEAVY_OPS = frozenset({"Attention", "MultiHeadAttention", "MatMul", "Gemm", "Conv", "LayerNormalization", "Gelu"})
# Kernel families, tried in order: cuDNN's fused SDPA names itself; flash; memory-efficient (cutlass FMHA).
ATTENTION_KERNELS = (
    ("cuDNN fused attention", re.compile(r"cudnn.*(sdpa|fmha|flash|attn)|sm\d+_.*fprop.*attn", re.I)),
    ("flash attention", re.compile(r"flash", re.I)),
    ("memory-efficient attention", re.compile(r"fmha|AttentionKernel|efficient_attention|mem_eff", re.I)),
)
UNFUSED = re.compile(r"softmax", re.I)
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "camera", "cat")


def run_text(cmd: list[str], timeout: float = 30) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        return (out.stdout + out.stderr).strip()
    except (OSError, subprocess.SubprocessError) as exc:
        return f"({' '.join(cmd[:2])}: {exc})"


# -- the machine ----------------------------------------------------------------------------------------
def machine_lines() -> list[str]:
    query = "name,driver_version,compute_cap,memory.total,memory.used,clocks.sm,clocks.max.sm,power.limit,pstate"
    lines = ["nvidia-smi: " + run_text(["nvidia-smi", f"--query-gpu={query}", "--format=csv"]).replace("\n", " / ")]
    cpu = next(
        (ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines() if "model name" in ln),
        platform.processor(),
    )
    mem = next(
        (ln.split(":", 1)[1].strip() for ln in Path("/proc/meminfo").read_text().splitlines() if "MemTotal" in ln), "?"
    )
    lines.append(f"CPU: {cpu} x {os.cpu_count()}, memory {mem}, kernel {platform.release()}")
    return lines


def version_lines() -> list[str]:
    import onnx
    import onnxruntime as ort

    lines = [
        f"Python {platform.python_version()} ({sys.executable}), numpy {np.__version__}, onnx {onnx.__version__}",
        f"onnxruntime {ort.__version__} from {Path(ort.__file__).parent}; providers {ort.get_available_providers()}",
    ]
    try:
        import torch

        lines.append(
            f"torch {torch.__version__} (CUDA {torch.version.cuda}); "
            f"torch.cuda.is_available() = {torch.cuda.is_available()}"
        )
    except ImportError as exc:
        lines.append(f"torch: not importable ({exc})")
    # The image's own onnxruntime: -I drops PYTHONPATH, so the carried one is out of the way.
    own = run_text(
        [
            sys.executable,
            "-I",
            "-c",
            "import onnxruntime as o; print(o.__version__, o.__file__, o.get_available_providers())",
        ]
    )
    lines.append(f"the image's own onnxruntime (python3 -I): {own}")
    return lines


def cuda_available() -> bool:
    import onnxruntime as ort

    from service.runtime.engine import automatic_providers

    return CUDA_PROVIDER in ort.get_available_providers() and CUDA_PROVIDER in automatic_providers()


def cuda_probe_line() -> str:
    """What a session asking for CUDA gets, on a one-node graph."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    if hasattr(ort, "preload_dlls"):
        with contextlib.suppress(Exception):
            ort.preload_dlls()
    vec = helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])
    out = helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])
    graph = helper.make_graph([helper.make_node("Add", ["x", "x"], ["y"])], "probe", [vec], [out])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)
    try:
        session = ort.InferenceSession(model.SerializeToString(), providers=[CUDA_PROVIDER, CPU_PROVIDER])
        return f"a session asking for CUDA gets {session.get_providers()}"
    except Exception as exc:  # noqa: BLE001 - the record says what failed, the run goes on
        return f"a session asking for CUDA failed: {str(exc).splitlines()[0][:300]}"


# -- kernels ----------------------------------------------------------------------------------------------
def gpu_kernels(run) -> tuple[Counter, str]:
    """(kernel name -> launches, note) of one call of run(), traced with CUPTI through torch.profiler."""
    try:
        import torch
        from torch.autograd import DeviceType
        from torch.profiler import ProfilerActivity, profile
    except ImportError as exc:
        return Counter(), f"no torch ({exc})"
    if not torch.cuda.is_available():
        return Counter(), "torch sees no CUDA device"
    torch.cuda.init()
    run()  # outside the trace: nothing left to allocate or choose
    with profile(activities=[ProfilerActivity.CUDA]) as trace:
        run()
        torch.cuda.synchronize()
    kernels = Counter({e.key: e.count for e in trace.key_averages() if e.device_type == DeviceType.CUDA})
    return kernels, ""


def attention_family(kernels: Counter) -> str:
    for family, pattern in ATTENTION_KERNELS:
        found = sorted(k for k in kernels if pattern.search(k))
        if found:
            return f"{family}: {'; '.join(found)}"
    softmax = sorted(k for k in kernels if UNFUSED.search(k))
    if softmax:
        return f"UNFUSED (softmax kernels): {'; '.join(softmax)}"
    return "no attention kernel recognised (see the kernel list)"


@contextlib.contextmanager
def captured_fd_output():
    """What native code writes to stdout/stderr inside the block (ONNX Runtime prints its kernel report
    with std::cout), as a list that holds the text afterwards."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    text: list[str] = []
    with tempfile.TemporaryFile(mode="w+b") as sink:
        os.dup2(sink.fileno(), 1)
        os.dup2(sink.fileno(), 2)
        try:
            yield text
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)
            sink.seek(0)
            text.append(sink.read().decode(errors="replace"))


def attention_only_model(model_path: Path):
    """The graph's first fused attention node alone: same inputs (types, shapes), attributes and opsets."""
    import onnx
    from onnx import helper

    model = onnx.load(str(model_path), load_external_data=False)
    typed = {v.name: v for v in [*model.graph.value_info, *model.graph.input, *model.graph.output]}
    node = next(n for n in model.graph.node if is_fused_attention(n.domain, n.op_type))
    inputs = [typed[name] for name in node.input if name]
    outputs = [helper.make_value_info(name, onnx.TypeProto()) for name in node.output if name]
    graph = helper.make_graph([node], "attention_only", inputs, outputs)
    return helper.make_model(graph, opset_imports=model.opset_import, ir_version=model.ir_version), node


def attention_only_report(model_path: Path, providers: list[str], batch: int) -> list[str]:
    import onnx
    import onnxruntime as ort

    probe, node = attention_only_model(model_path)
    feeds = {}
    rng = np.random.default_rng(0)
    for value in probe.graph.input:
        dims = [d.dim_value if d.dim_value else batch for d in value.type.tensor_type.shape.dim]
        dtype = onnx.helper.tensor_dtype_to_np_dtype(value.type.tensor_type.elem_type)
        feeds[value.name] = rng.standard_normal(dims).astype(dtype)
    shapes = ", ".join(f"{k} {list(v.shape)} {v.dtype}" for k, v in feeds.items())
    lines = [f"- the node alone ({node.op_type} {node.name}, inputs {shapes}):"]
    os.environ["ORT_ENABLE_ATTENTION_KERNEL_DEBUG_INFO"] = "1"
    try:
        with captured_fd_output() as native:
            session = ort.InferenceSession(probe.SerializeToString(), providers=providers)
            session.run(None, feeds)
    except Exception as exc:  # noqa: BLE001 - recorded, the record goes on
        return [*lines, f"  - FAILED: {str(exc).splitlines()[0][:300]}"]
    finally:
        os.environ.pop("ORT_ENABLE_ATTENTION_KERNEL_DEBUG_INFO", None)
    lines.append(f"  - session providers {session.get_providers()}")
    report = [ln.strip() for ln in "".join(native).splitlines() if re.search(r"kernel|attention", ln, re.I)]
    lines.append("  - ORT's kernel report: " + ("; ".join(report[:6]) if report else "none printed by this build"))
    kernels, note = gpu_kernels(lambda: session.run(None, feeds))
    if note:
        lines.append(f"  - GPU kernels: not traced ({note})")
    else:
        lines.append(f"  - attention kernel: {attention_family(kernels)}")
        lines.append("  - every GPU kernel of the node: " + "; ".join(f"{k} x{n}" for k, n in sorted(kernels.items())))
    return lines


# -- one model --------------------------------------------------------------------------------------------
def model_report(model_path: Path, batch: int) -> list[str]:
    import onnx

    from service.runtime.engine import Engine

    graph = onnx.load(str(model_path), load_external_data=False).graph
    attention_nodes = [n.name for n in graph.node if is_fused_attention(n.domain, n.op_type)]
    on_gpu = cuda_available()
    providers = [CUDA_PROVIDER, CPU_PROVIDER] if on_gpu else [CPU_PROVIDER]
    engine = Engine(model_path, providers=providers, log_placement=True)
    pixels = np.random.default_rng(1).standard_normal((batch, *engine.input_shape), dtype=np.float32)
    engine.run(pixels)  # the profiled run
    placed = engine.node_placement
    ran = {name: placed[name][1] for name in attention_nodes if name in placed}
    by_provider = Counter(ran.values())
    lines = [
        f"### {model_path.name}: {engine.metadata.architecture} {engine.metadata.precision}, batch {batch}, "
        f"session providers {engine.providers}",
        "",
        f"- fused attention nodes in the graph: {len(attention_nodes)}; ran on "
        + (", ".join(f"{p}: {n}" for p, n in by_provider.items()) or "none recorded")
        + (
            f"; not in the profile (renamed or fused by ORT): {len(attention_nodes) - len(ran)}"
            if len(ran) < len(attention_nodes)
            else ""
        ),
    ]
    # ORT may fuse further at load time: count every fused attention op type the profile saw, too.
    profiled = Counter((op, p) for op, p in placed.values() if op in FUSED_ATTENTION_OP_TYPES)
    lines.append(
        "- fused attention ops in the profile: "
        + (", ".join(f"{op} on {p}: {n}" for (op, p), n in sorted(profiled.items())) or "none")
    )
    every = on_gpu and by_provider.get(CUDA_PROVIDER, 0) == len(attention_nodes) and len(attention_nodes) > 0
    lines.append(f"- every attention node on CUDA: {'YES' if every else 'NO' if on_gpu else 'n/a (no CUDA here)'}")
    heavy_cpu = sorted({op for op, p in placed.values() if p == CPU_PROVIDER and op in HEAVY_OPS})
    lines.append(
        f"- compute-heavy ops on the CPU: {', '.join(heavy_cpu) or 'none'}" if on_gpu else "- (all on the CPU provider)"
    )
    copies = Counter(op for op, _ in placed.values() if op.startswith("Memcpy"))
    lines.append(f"- Memcpy nodes: {dict(copies) or 'none'}")
    kernels, note = gpu_kernels(lambda: engine.run(pixels))
    if note:
        lines.append(f"- GPU kernels of one run: not traced ({note})")
    else:
        lines.append(f"- attention kernels of one run: {attention_family(kernels)}")
        lines.append(f"- GPU kernels of one run ({sum(kernels.values())} launches, {len(kernels)} kinds):")
        lines += [f"  - {name} x{n}" for name, n in sorted(kernels.items(), key=lambda kv: -kv[1])[:40]]
    lines += attention_only_report(model_path, providers, batch)
    return [*lines, ""]


# -- fp16 vs fp32 -------------------------------------------------------------------------------------------
def photo_batch(preprocessing) -> np.ndarray:
    import skimage.data
    from PIL import Image

    from service.runtime.preprocess import preprocess

    return np.stack(
        [preprocess(Image.fromarray(getattr(skimage.data, n)()).convert("RGB"), preprocessing) for n in PHOTOS]
    )


def compare(reference: Path, other: Path, atol: float = 1e-2) -> int:
    """Logits of two exports of one model on photographs: top-1 must agree and differ by <= atol."""
    from service.runtime.engine import Engine

    engines = [Engine(p, log_placement=False) for p in (reference, other)]
    photos = photo_batch(engines[0].metadata.preprocessing)
    ref, got = (e.run(photos) for e in engines)
    top2 = np.sort(ref, axis=1)[:, -2:]
    same = int((ref.argmax(1) == got.argmax(1)).sum())
    diff = float(np.abs(ref - got).max())
    print(
        f"{other.name} vs {reference.name} on {len(photos)} photographs ({engines[0].providers[0]}): "
        f"max |logit difference| {diff:.2e}, top-1 identical on {same} of {len(photos)}, "
        f"smallest top-1 margin {float((top2[:, 1] - top2[:, 0]).min()):.3f}"
    )
    return 0 if same == len(photos) and diff <= atol else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, action="append", default=[], help="exported .onnx (repeatable)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--markdown", type=Path, help="also write the record here")
    parser.add_argument("--compare", type=Path, nargs=2, metavar=("REFERENCE", "OTHER"))
    args = parser.parse_args(argv)
    if args.compare:
        return compare(*args.compare)

    lines = [f"## Machine record, {datetime.now(UTC):%Y-%m-%d %H:%M UTC}", ""]
    lines += [f"- {ln}" for ln in machine_lines() + version_lines()]
    lines += [f"- {cuda_probe_line()}", ""]
    status = 0

    def write() -> None:  # after every section: a record cut short keeps what it has
        if args.markdown:
            args.markdown.write_text("\n".join(lines) + "\n")

    write()
    for model in args.model:
        try:
            lines += model_report(model, args.batch)
        except Exception as exc:  # noqa: BLE001 - one model's failure is recorded, the other still runs
            lines += [f"### {model.name}: FAILED: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}", ""]
            status = 1
        write()
    print("\n".join(lines))
    return status


if __name__ == "__main__":
    sys.exit(main())
