"""The ONNX Runtime engine against the PyTorch model it was exported from, on real photos."""

from __future__ import annotations

import io

import numpy as np
import onnx
import pytest
from PIL import Image

from service.runtime.engine import CPU, Engine, EngineError, fallback_problem, parse_providers
from service.runtime.preprocess import load_pixels

pytestmark = pytest.mark.slow  # the session fixture exports a ViT with torch.onnx (~6-12 s on 2 cores)


@pytest.fixture(scope="module")
def engine(tiny_onnx) -> Engine:
    return Engine(tiny_onnx, providers="cpu")


def test_logits_match_pytorch_on_photos_preprocessed_by_timm(engine, tiny_vit, photos):
    import torch
    from timm.data import create_transform, resolve_data_config

    _, model = tiny_vit
    p = engine.metadata.preprocessing
    reference = create_transform(
        **resolve_data_config(
            {
                "input_size": (3, p.image_size, p.image_size),
                "crop_pct": p.image_size / p.resize_size,
                "interpolation": p.interpolation,
                "mean": p.mean,
                "std": p.std,
            }
        )
    )
    timm_batch = torch.stack([reference(Image.open(io.BytesIO(d)).convert("RGB")) for d in photos.values()])
    with torch.no_grad():
        expected = model(timm_batch).numpy()
    ours = engine.run(np.stack([load_pixels(d, p, max_pixels=10**8) for d in photos.values()]))
    assert ours.dtype == np.float32 and ours.shape == (len(photos), 10)
    np.testing.assert_allclose(ours, expected, atol=1e-4, rtol=1e-4)
    assert (ours.argmax(1) == expected.argmax(1)).all()


def test_batch_of_n_equals_n_single_runs(engine):
    batch = np.random.default_rng(1).standard_normal((5, *engine.input_shape), dtype=np.float32)
    together = engine.run(batch)
    alone = np.concatenate([engine.run(batch[i : i + 1]) for i in range(5)])
    np.testing.assert_allclose(together, alone, atol=1e-5, rtol=1e-5)


def test_metadata_names_and_placement(engine):
    assert engine.metadata.architecture == "vit_test_patch8_32"
    assert engine.input_name == "pixel_values" and engine.output_name == "logits"
    assert engine.providers == [CPU] and not engine.on_gpu
    engine.warmup([1, 2])
    # Placement comes from ORT's profiler: both fused Attention nodes ran on the CPU provider here.
    assert engine.placement[CPU]["Attention"] == 2
    assert "Softmax" not in engine.placement[CPU]
    # Per node too: each Attention node of the graph by name, and the provider that ran it.
    attention = {name: where for name, where in engine.node_placement.items() if where[0] == "Attention"}
    assert len(attention) == 2 and set(attention.values()) == {("Attention", CPU)}


def test_rejects_wrong_input_shape(engine):
    with pytest.raises(ValueError, match="expected a batch of shape"):
        engine.run(np.zeros((1, 3, 16, 16), np.float32))


def test_model_without_metadata_is_refused_naming_the_keys(tiny_onnx, tmp_path):
    proto = onnx.load(str(tiny_onnx))
    del proto.metadata_props[:]
    bare = tmp_path / "bare.onnx"
    onnx.save(proto, str(bare))
    with pytest.raises(EngineError, match="vitserve.architecture"):
        Engine(bare, providers="cpu", log_placement=False)


def test_missing_model_file(tmp_path):
    with pytest.raises(EngineError, match="not found"):
        Engine(tmp_path / "nope.onnx")


def test_provider_names_and_aliases():
    assert parse_providers("cuda, CPU") == ["CUDAExecutionProvider", CPU]
    assert parse_providers("") is None and parse_providers(None) is None
    with pytest.raises(EngineError, match="unknown ONNX Runtime provider 'gpu'"):
        parse_providers("gpu")


def test_io_binding_path_gives_the_same_logits(tiny_onnx):
    # The CUDA path binds a reused device buffer; the same code runs here against the CPU device.
    bound = Engine(tiny_onnx, providers="cpu", io_binding=True, log_placement=False)
    plain = Engine(tiny_onnx, providers="cpu", io_binding=False, log_placement=False)
    rng = np.random.default_rng(2)
    for n in (3, 1, 3):  # a batch size seen twice reuses its buffer
        batch = rng.standard_normal((n, *plain.input_shape), dtype=np.float32)
        np.testing.assert_array_equal(bound.run(batch), plain.run(batch))
    assert sorted(bound._device_inputs) == [1, 3]


def test_requested_gpu_provider_falls_back_to_cpu_with_a_warning(tiny_onnx, caplog):
    # This host has the GPU wheel but no GPU: CUDA fails to initialise and the session must still
    # come up on the CPU, saying so loudly rather than failing or pretending.
    with caplog.at_level("WARNING", logger="vitserve.engine"):
        engine = Engine(tiny_onnx, providers="cuda,cpu", log_placement=False)
    assert engine.providers == [CPU] and not engine.on_gpu
    assert any("requested but the session runs on" in r.getMessage() for r in caplog.records)
    assert engine.run(np.zeros((1, *engine.input_shape), np.float32)).shape == (1, 10)


def test_a_gpu_only_provider_list_is_an_error_where_the_gpu_cannot_run(tiny_onnx):
    # Same host as above: `--providers cuda` (no cpu in the list) must not serve quietly on the CPU.
    with pytest.raises(EngineError, match=r"--providers cuda was asked for .* add cpu \(--providers cuda,cpu\)"):
        Engine(tiny_onnx, providers="cuda", log_placement=False)


def test_fallback_is_refused_only_when_cpu_was_not_asked_for():
    cuda, trt = "CUDAExecutionProvider", "TensorrtExecutionProvider"
    assert fallback_problem([cuda], [CPU]) is not None
    assert "--providers tensorrt,cuda" in fallback_problem([trt, cuda], [CPU])
    assert fallback_problem([cuda, CPU], [CPU]) is None  # cpu listed: falling back is allowed
    assert fallback_problem(None, [CPU]) is None  # automatic choice
    assert fallback_problem([cuda], [cuda, CPU]) is None  # it runs where it was asked to
