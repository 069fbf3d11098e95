"""ViT-B/16 on ONNX Runtime's CUDA provider through service.runtime.engine.Engine, as the service runs it.

- fp16 agrees with fp32 on real photographs (top-1 identical, logits within 1e-2);
- every attention node runs on the CUDA provider, and as a fused kernel (flash or
  memory-efficient, read from the GPU's own kernel trace), not as separate softmax kernels;
- no Memcpy node inside the graph (the ORT profile): nothing goes back to the host mid-run;
- CUDA graphs per batch bucket, pinned uploads: captured, pinned, and the same answers;
- device memory stays flat over many batches of varying size.

Skipped cleanly without CUDA (conftest.py). bench/gpu.sh runs this file on the GPU machine with
models it exported once (VITSERVE_GPU_MODELS) and keeps the kernel names it saw.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
from gpu_testlib import model_path, photo_batch, report

pytestmark = [pytest.mark.gpu, pytest.mark.slow]

ATTENTION_OPS = ("Attention", "MultiHeadAttention", "GroupQueryAttention")
HEAVY_OPS = frozenset(
    {
        *ATTENTION_OPS,
        "MatMul",
        "Gemm",
        "Conv",
        "LayerNormalization",
        "SkipLayerNormalization",
        "Gelu",
        "BiasGelu",
        "FastGelu",
        "Erf",
    }
)
# ORT's fused attention kernels: flash (onnxruntime::flash::flash_fwd_*), memory-efficient
# (cutlass fmha / AttentionKernel), cuDNN's SDPA (cudnn ... sdpa / fmha).
FUSED_ATTENTION_KERNEL = re.compile(r"flash|fmha|AttentionKernel|attention_kernel|efficient_attention|sdpa", re.I)
DEPTH = 12  # ViT-B


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, object]:
    folder = tmp_path_factory.mktemp("gpu_models")
    return {precision: model_path(precision, folder) for precision in ("fp16", "fp32")}


def cuda_engine(path, **kwargs):
    from service.runtime.engine import CUDA, Engine

    engine = Engine(path, providers="cuda,cpu", **kwargs)
    assert engine.providers[0] == CUDA, engine.providers
    return engine


@pytest.fixture(scope="module")
def fp16_engine(models):
    engine = cuda_engine(models["fp16"], log_placement=True)
    engine.warmup([1, 8])  # the first run is profiled for node placement
    return engine


@pytest.fixture(scope="module")
def photos(fp16_engine) -> np.ndarray:
    return photo_batch(fp16_engine.metadata.preprocessing)


def test_fp16_matches_fp32_on_photographs(models, fp16_engine, photos):
    fp32 = cuda_engine(models["fp32"], log_placement=False)
    reference = fp32.run(photos)
    logits = fp16_engine.run(photos)
    report(
        "fp16 vs fp32",
        f"fp16 vs fp32 on {len(photos)} photos: max |diff| {np.abs(logits - reference).max():.2e}, "
        f"top-1 {logits.argmax(1).tolist()} vs {reference.argmax(1).tolist()}",
    )
    np.testing.assert_array_equal(logits.argmax(1), reference.argmax(1))
    assert np.abs(logits - reference).max() <= 1e-2


def test_every_attention_node_runs_on_cuda(fp16_engine):
    placement = fp16_engine.placement
    report("node placement (ORT profile)", repr(placement))
    cuda_attention = sum(placement.get("CUDAExecutionProvider", {}).get(op, 0) for op in ATTENTION_OPS)
    assert cuda_attention == DEPTH, placement
    on_cpu = set(placement.get("CPUExecutionProvider", {}))
    assert not on_cpu & HEAVY_OPS, placement


def test_no_host_copies_inside_the_graph(fp16_engine):
    copies = {
        f"{provider}: {op}": n
        for provider, ops in fp16_engine.placement.items()
        for op, n in ops.items()
        if op.startswith("Memcpy")
    }
    assert not copies, copies


def test_attention_runs_as_fused_kernels(fp16_engine, photos):
    import torch
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.init()
    fp16_engine.run(photos)  # outside the trace: nothing left to allocate or choose
    with profile(activities=[ProfilerActivity.CUDA]) as trace:
        fp16_engine.run(photos)
        torch.cuda.synchronize()
    kernels = [e.key for e in trace.key_averages() if e.device_type == DeviceType.CUDA]
    report(
        "GPU kernels (torch profiler)",
        f"GPU activity of one fp16 run, batch {len(photos)}:\n  " + "\n  ".join(sorted(kernels)),
    )
    fused = [k for k in kernels if FUSED_ATTENTION_KERNEL.search(k)]
    assert fused, f"no fused attention kernel among {sorted(kernels)}"
    unfused = [k for k in kernels if "softmax" in k.lower()]
    assert not unfused, f"softmax kernels ran, attention is not fused: {unfused}"


def test_cuda_graph_buckets_with_pinned_uploads_match_plain_runs(models, fp16_engine, photos):
    from service.core.gpu_config import GpuOptions
    from service.runtime.gpu_options import is_pinned

    engine = cuda_engine(
        models["fp16"],
        log_placement=False,
        gpu_options=GpuOptions(batch_buckets=(1, 8, 32), cuda_graphs=True, pinned_host_memory=True),
    )
    engine.warmup([1])
    report("CUDA graph buckets", repr({k: v for k, v in engine.describe().items() if k != "placement"}))
    assert engine.cuda_graph_buckets == [1, 8, 32], engine.describe()
    assert engine.describe()["pinned_host_memory"] in ("onnxruntime", "cudaHostAlloc")
    assert is_pinned(engine.input_buffer(8))
    rng = np.random.default_rng(3)
    for n in (1, 5, 8, 6, 33, 70):  # replays with new data, padded runs, and splits over buckets
        batch = np.concatenate(
            [photos, rng.standard_normal((max(0, n - len(photos)), *photos.shape[1:]), dtype=np.float32)]
        )[:n]
        expected = fp16_engine.run(batch)
        got = engine.run(batch)
        assert got.shape == expected.shape
        # Another batch size may pick other fp16 GEMM kernels: rounding differs by ~1e-3; a wrong row by ~0.5.
        np.testing.assert_allclose(got, expected, atol=5e-3, rtol=0)
    buffer = engine.input_buffer(6)  # the zero-copy path: the batch is written into the pinned buffer
    buffer[:] = photos
    np.testing.assert_allclose(engine.run(buffer), fp16_engine.run(photos), atol=5e-3, rtol=0)


@pytest.mark.parametrize("buckets", [(), (1, 4, 16, 64)], ids=["per-size-buffers", "buckets"])
def test_device_memory_is_flat_over_varying_batches(models, buckets):
    import torch

    from service.core.gpu_config import GpuOptions

    engine = cuda_engine(models["fp16"], log_placement=False, gpu_options=GpuOptions(batch_buckets=buckets))
    rng = np.random.default_rng(0)
    pool = rng.standard_normal((64, *engine.input_shape), dtype=np.float32)

    def used_mib_after(sizes) -> float:
        for n in sizes:
            engine.run(pool[:n])
        torch.cuda.synchronize()
        free, total = torch.cuda.mem_get_info()
        return (total - free) / 2**20

    warm = used_mib_after(range(1, 65))  # every size once
    settled = used_mib_after(rng.integers(1, 65, size=150))  # the arena may still settle once here
    after = used_mib_after(rng.integers(1, 65, size=300))
    report(
        "device memory",
        f"buckets {buckets or 'none'}: {warm:.0f} MiB in use after every size once, "
        f"{settled:.0f} after 150 random batches, {after:.0f} after 300 more",
    )
    assert after - settled <= 32, f"device memory grew by {after - settled:.1f} MiB over 300 batches"
    assert settled - warm <= 256, f"device memory grew by {settled - warm:.1f} MiB after every size had run"
