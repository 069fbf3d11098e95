"""The CPU-testable logic of the GPU engine options (service/runtime/gpu_options.py, service/runtime/buckets.py):
bucket planning, padded runs equal to unpadded ones on a real ViT export, provider options,
settings validation. Runs everywhere; the GPU side is test_gpu_engine.py."""

from __future__ import annotations

from itertools import pairwise
from pathlib import Path

import numpy as np
import pytest
from gpu_testlib import cuda_unavailable_reason
from hypothesis import given
from hypothesis import strategies as st

from service.core.gpu_config import GpuOptions, GpuOptionsError, parse_buckets
from service.core.settings import Settings
from service.runtime.gpu_options import cuda_provider_options, pinned_array, plan_chunks, tensorrt_provider_options

bucket_sets = st.lists(st.integers(1, 300), min_size=1, max_size=6, unique=True).map(lambda b: tuple(sorted(b)))


@given(n=st.integers(1, 2000), buckets=bucket_sets)
def test_bucket_plan_covers_the_batch_in_order_with_bucket_sizes(n, buckets):
    chunks = plan_chunks(n, buckets)
    assert chunks[0][0] == 0 and chunks[-1][1] == n
    assert all(stop == start for (_, stop, _), (start, _, _) in pairwise(chunks))
    for start, stop, size in chunks:
        assert size in buckets and stop - start <= size
    # Only the last run is padded, and to the smallest bucket that holds it.
    *full, (start, stop, size) = chunks
    assert all(stop_ - start_ == size_ == buckets[-1] for start_, stop_, size_ in full)
    assert size == min(b for b in buckets if b >= stop - start)


@given(n=st.integers(1, 2000), max_chunk=st.one_of(st.none(), st.integers(1, 300)))
def test_unbucketed_plan_splits_only_above_max_chunk(n, max_chunk):
    chunks = plan_chunks(n, (), max_chunk)
    assert [size for _, _, size in chunks] == [stop - start for start, stop, _ in chunks]
    assert sum(size for _, _, size in chunks) == n
    assert len(chunks) == (1 if max_chunk is None else -(-n // max_chunk))


def test_parse_buckets():
    assert parse_buckets("64, 1,16,4,16") == (1, 4, 16, 64)
    assert parse_buckets("") == () and parse_buckets(None) == ()
    for bad in ("0", "-4", "1,x", "2.5", "1e3"):
        with pytest.raises(GpuOptionsError):
            parse_buckets(bad)


def test_cuda_graphs_need_buckets():
    with pytest.raises(GpuOptionsError, match="cuda_graphs needs batch_buckets"):
        GpuOptions(cuda_graphs=True)
    with pytest.raises(GpuOptionsError):
        GpuOptions(batch_buckets=(8, 1))  # unsorted: the planner relies on the order
    assert GpuOptions(batch_buckets=(1, 8), cuda_graphs=True).per_bucket_sessions
    assert not GpuOptions(batch_buckets=(1, 8)).per_bucket_sessions


def test_cuda_provider_options():
    assert cuda_provider_options() == {"device_id": "0"}  # ORT's defaults otherwise: the service's behaviour
    assert cuda_provider_options(cuda_graph=True)["enable_cuda_graph"] == "1"


def test_tensorrt_provider_options(tmp_path):
    options = tensorrt_provider_options(
        GpuOptions(batch_buckets=(1, 8, 32), trt_cache_dir=tmp_path),
        input_name="pixel_values",
        image_shape=(3, 224, 224),
    )
    assert options["trt_profile_min_shapes"] == "pixel_values:1x3x224x224"
    assert options["trt_profile_opt_shapes"] == "pixel_values:32x3x224x224"
    assert options["trt_profile_max_shapes"] == "pixel_values:32x3x224x224"
    assert options["trt_engine_cache_enable"] == options["trt_timing_cache_enable"] == "True"
    assert options["trt_engine_cache_path"] == options["trt_timing_cache_path"] == str(tmp_path)
    assert options["trt_fp16_enable"] == "True"
    plain = tensorrt_provider_options(GpuOptions(trt_fp16=False), input_name="x", image_shape=(384, 384, 3))
    assert plain["trt_profile_max_shapes"] == "x:256x384x384x3" and plain["trt_fp16_enable"] == "False"
    assert "trt_engine_cache_enable" not in plain


def test_settings_give_gpu_options(monkeypatch, tmp_path):
    monkeypatch.setenv("VITSERVE_BATCH_BUCKETS", "16,1,4")
    monkeypatch.setenv("VITSERVE_CUDA_GRAPHS", "true")
    monkeypatch.setenv("VITSERVE_TRT_CACHE_DIR", str(tmp_path))
    options = Settings().gpu_options()
    assert options == GpuOptions(batch_buckets=(1, 4, 16), cuda_graphs=True, trt_cache_dir=tmp_path)
    assert Settings(batch_buckets="", cuda_graphs=False, trt_cache_dir="").gpu_options() == GpuOptions()


@pytest.mark.parametrize(
    "bad", [dict(cuda_graphs=True, batch_buckets=""), dict(batch_buckets="1,0"), dict(batch_buckets="eight")]
)
def test_settings_reject_bad_gpu_options(monkeypatch, bad):
    for key in ("VITSERVE_BATCH_BUCKETS", "VITSERVE_CUDA_GRAPHS"):
        monkeypatch.delenv(key, raising=False)
    with pytest.raises(ValueError):
        Settings(**bad)


def test_pinned_memory_is_pinned_or_refused():
    from service.runtime.gpu_options import is_pinned

    if cuda_unavailable_reason() is None:
        array, source = pinned_array((2, 3, 8, 8), np.float32)
        assert source in ("onnxruntime", "cudaHostAlloc") and is_pinned(array)
        assert array.shape == (2, 3, 8, 8) and not array.any()
    else:
        with pytest.raises(OSError):
            pinned_array((2, 3, 8, 8), np.float32)


# -- padded runs on a real export (CPU provider) ------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_export(tmp_path_factory) -> Path:
    """A 2-block ViT with real attention across tokens: padding must not leak between images."""
    import torch

    from model.config import ViTConfig
    from model.export import export_model
    from model.vit import build_vit
    from service.core.metadata import Preprocessing

    config = ViTConfig(
        image_size=32,
        patch_size=8,
        embed_dim=32,
        depth=2,
        num_heads=2,
        mlp_dim=64,
        num_classes=10,
        name="vit_test_patch8_32",
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = build_vit(config).eval()
        torch.nn.init.normal_(model.head.weight, std=1.0)
    path = tmp_path_factory.mktemp("bucket_model") / "tiny.onnx"
    export_model(
        model,
        config,
        path,
        labels=[f"c{i}" for i in range(10)],
        preprocessing=Preprocessing.timm_eval(32),
        source="tests/gpu",
    )
    return path


@pytest.fixture(scope="module")
def batches() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.standard_normal((n, 3, 32, 32), dtype=np.float32) for n in (1, 3, 4, 8, 11, 20)]


@pytest.mark.slow
@pytest.mark.parametrize("io_binding", [False, True], ids=["host-feed", "io-binding"])
@pytest.mark.parametrize("static_shapes", [False, True], ids=["shared-session", "session-per-bucket"])
def test_bucketed_runs_equal_unpadded_runs(tiny_export, batches, io_binding, static_shapes):
    from service.runtime.engine import Engine

    plain = Engine(tiny_export, providers="cpu", log_placement=False)
    bucketed = Engine(
        tiny_export,
        providers="cpu",
        io_binding=io_binding,
        gpu_options=GpuOptions(batch_buckets=(1, 4, 8), static_shapes=static_shapes),
    )
    assert set(bucketed.warmup([2])) == {1, 2, 4, 8}  # every bucket is warmed, plus what was asked
    for batch in batches:  # 3 -> padded to 4, 11 -> 8 + 3 padded to 4, 20 -> 8 + 8 + 4
        expected = plain.run(batch)
        got = bucketed.run(batch)
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(got.argmax(1), expected.argmax(1))
    # Writing straight into the bucket's buffer (no host copy) gives the same answer.
    buffer = bucketed.input_buffer(3)
    buffer[:] = batches[1]
    np.testing.assert_allclose(bucketed.run(buffer), plain.run(batches[1]), rtol=1e-5, atol=1e-5)
    assert bucketed.describe()["batch_buckets"] == [1, 4, 8]
    assert bucketed.describe()["pinned_host_memory"] is None  # CPU provider: nothing to pin for


@pytest.mark.slow
def test_device_input_cache_is_bounded(tiny_export, batches):
    from service.runtime.engine import _MAX_CACHED_DEVICE_INPUTS, Engine

    plain = Engine(tiny_export, providers="cpu", log_placement=False)
    bound = Engine(tiny_export, providers="cpu", io_binding=True, log_placement=False)
    rng = np.random.default_rng(1)
    pool = rng.standard_normal((12, 3, 32, 32), dtype=np.float32)
    for n in (*range(1, 13), 1, 2):  # more sizes than the cache holds, then evicted ones again
        np.testing.assert_allclose(bound.run(pool[:n]), plain.run(pool[:n]), rtol=1e-5, atol=1e-5)
    assert len(bound._device_inputs) == _MAX_CACHED_DEVICE_INPUTS


def test_buckets_refuse_a_fixed_batch_graph(tmp_path):
    """A graph with a fixed batch pads to it already; buckets on top would be silently wrong."""
    import onnx
    from onnx import TensorProto, helper

    from service.core.metadata import ModelMetadata, Preprocessing
    from service.runtime.engine import Engine, EngineError

    graph = helper.make_graph(
        [
            helper.make_node("ReduceMean", ["pixel_values"], ["pooled"], axes=[2, 3], keepdims=0),
            helper.make_node("Identity", ["pooled"], ["logits"]),
        ],
        "fixed",
        [helper.make_tensor_value_info("pixel_values", TensorProto.FLOAT, [4, 3, 16, 16])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [4, 3])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)
    meta = ModelMetadata(architecture="fixed", labels=("a", "b", "c"), preprocessing=Preprocessing.timm_eval(16))
    helper.set_model_props(model, meta.to_props())
    path = tmp_path / "fixed.onnx"
    onnx.save(model, path)
    with pytest.raises(EngineError, match="batch_buckets"):
        Engine(path, providers="cpu", log_placement=False, gpu_options=GpuOptions(batch_buckets=(1, 4)))


@pytest.mark.slow
def test_a_bucket_whose_cuda_graph_fails_runs_without_one(tiny_export, batches, caplog):
    """Graph capture happens on an early run; a failure there must cost the bucket its graph only."""
    from service.runtime.engine import Engine

    class CaptureFails:
        def run(self, *args, **kwargs):
            raise RuntimeError("CUDA failure 900: operation not permitted when stream is capturing")

    plain = Engine(tiny_export, providers="cpu", log_placement=False)
    engine = Engine(
        tiny_export,
        providers="cpu",
        log_placement=False,
        gpu_options=GpuOptions(batch_buckets=(1, 4), static_shapes=True),
    )
    broken = engine._buckets._buckets[4]
    broken.session, broken.cuda_graph = CaptureFails(), True  # what a CUDA bucket whose capture fails looks like
    np.testing.assert_allclose(engine.run(batches[1]), plain.run(batches[1]), rtol=1e-5, atol=1e-5)
    assert "CUDA graph of batch bucket 4 failed" in caplog.text
    assert engine.cuda_graph_buckets == []
    np.testing.assert_allclose(engine.run(batches[1]), plain.run(batches[1]), rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_engine_builds_tensorrt_options_from_the_graph(tiny_export, tmp_path):
    """TensorRT's profile needs the input's name and shape before its session exists (read from a CPU one)."""
    from service.runtime.engine import TENSORRT, Engine

    engine = Engine(
        tiny_export,
        providers="cpu",
        log_placement=False,
        gpu_options=GpuOptions(batch_buckets=(1, 8), trt_cache_dir=tmp_path),
    )
    options = engine._provider_options(TENSORRT)
    assert options["trt_profile_min_shapes"] == "pixel_values:1x3x32x32"
    assert options["trt_profile_max_shapes"] == "pixel_values:8x3x32x32"
    assert options["trt_engine_cache_path"] == str(tmp_path)


def test_serve_flags_reach_the_gpu_settings():
    from service.cli import build_parser
    from service.cli.serve import build_settings

    args = build_parser().parse_args(
        [
            "serve",
            "--batch-buckets",
            "1,8",
            "--cuda-graphs",
            "true",
            "--pinned-host-memory",
            "true",
            "--trt-cache-dir",
            "/tmp/trt",
        ]
    )
    settings = build_settings(args)
    assert (settings.batch_buckets, settings.cuda_graphs, settings.pinned_host_memory) == ("1,8", True, True)
    assert str(settings.trt_cache_dir) == "/tmp/trt"
