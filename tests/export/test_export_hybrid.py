"""Exporting the hybrid (R+ViT): weight standardisation folded into the Conv weights, GroupNorm as ONNX
GroupNormalization, one fused Attention per block, the backbone named in the metadata, fp32/fp16/int8
verified against PyTorch on ONNX Runtime's CPU provider."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

import model.export as export_module
from model.config import ViTConfig
from model.export import export_model
from model.hybrid import StdConv2dSame, fold_weight_standardization
from model.verify import photo_inputs, verify_export
from model.vit import VisionTransformer
from service.cli import main
from service.core.metadata import ModelMetadata, Preprocessing

# Two stages of one block at 64 px: every layer kind of the real backbones (SAME padding at stride 2
# included, (2, 3) for the stem at 64 as at 224), small enough to export in seconds.
MINI = ViTConfig(
    image_size=64,
    patch_size=1,
    embed_dim=64,
    depth=2,
    num_heads=2,
    mlp_dim=128,
    num_classes=10,
    name="vit_test_r8_s8_64",
    backbone_layers=(1, 1),
)
MINI_GROUP_NORMS = 1 + 2 * 3 + 2  # stem, 3 per block, the shortcut of each stage's first block
PREPROCESSING = Preprocessing.timm_eval(64)
LABELS = [f"class {i}" for i in range(10)]


def make_mini() -> VisionTransformer:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = VisionTransformer(MINI)
        for module in model.modules():
            if isinstance(module, torch.nn.GroupNorm):  # not left at 1 / 0
                torch.nn.init.normal_(module.weight, 1.0, 0.2)
                torch.nn.init.normal_(module.bias, 0.0, 0.2)
        torch.nn.init.normal_(model.head.weight, std=0.1)
    return model.eval()


@pytest.fixture(scope="module")
def mini() -> VisionTransformer:
    return make_mini()


@pytest.fixture(scope="module")
def hybrid_exports(mini, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("hybrid")
    return {
        p: export_model(mini, MINI, root / f"{p}.onnx", labels=LABELS, preprocessing=PREPROCESSING, precision=p)
        for p in ("fp32", "fp16", "int8")
    }


def test_folding_keeps_the_outputs_and_leaves_the_model_alone(mini):
    folded = fold_weight_standardization(mini)
    assert not any(isinstance(m, StdConv2dSame) for m in folded.modules())
    assert sum(isinstance(m, StdConv2dSame) for m in mini.modules()) == MINI_GROUP_NORMS  # one conv per norm
    x = torch.from_numpy(photo_inputs(PREPROCESSING))
    with torch.no_grad():
        torch.testing.assert_close(folded(x), mini(x), rtol=0, atol=1e-5)
    plain = VisionTransformer(MINI.replace(backbone_layers=None, patch_size=8))
    assert fold_weight_standardization(plain) is plain  # nothing to fold, nothing copied


@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8"])
def test_export_is_fused_folded_and_matches_pytorch(hybrid_exports, mini, precision):
    result = hybrid_exports[precision]
    report = verify_export(result.path, mini)
    assert report.passed, report.failures()
    graph = report.info.graph
    assert graph.fused_attention == MINI.depth and graph.softmax == 0
    assert graph.op_counts.get("BatchNormalization", 0) == 0 and "ReduceMean" not in graph.op_counts
    assert graph.op_counts["GroupNormalization"] == MINI_GROUP_NORMS and graph.opset >= 21
    if precision == "fp32":
        assert all(p.max_abs_diff <= 1e-4 for p in report.parity)
    model = onnx.load(result.path, load_external_data=False)
    for node in (n for n in model.graph.node if n.op_type == "GroupNormalization"):
        attributes = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        # stash_type 1: mean and variance in fp32 also in the fp16 graph
        assert attributes["num_groups"] == 32 and attributes.get("stash_type", 1) == 1
        assert abs(attributes["epsilon"] - 1e-5) < 1e-9
    meta = ModelMetadata.from_props({p.key: p.value for p in model.metadata_props})
    assert meta.architecture == MINI.name and meta.precision == precision
    assert meta.extra["backbone"] == "ResNetV2-8 (1, 1)" and meta.extra["backbone_stride"] == "8"


def test_unfolded_weight_standardisation_fails_verification(mini, tmp_path, monkeypatch):
    """The BatchNormalization check can fail: export without the fold and verification names it."""
    monkeypatch.setattr(export_module, "fold_weight_standardization", lambda module: module)
    result = export_model(mini, MINI, tmp_path / "unfolded.onnx", labels=LABELS, preprocessing=PREPROCESSING)
    failures = verify_export(result.path, mini).failures()
    assert any("BatchNormalization node(s): weight standardisation was not folded" in f for f in failures), failures


@pytest.mark.slow
def test_cli_exports_and_verifies_a_named_hybrid(tmp_path, capsys):
    out = tmp_path / "r_ti.onnx"
    assert main(["export", "random:vit_tiny_r_s16_p8_224", "-o", str(out), "--target", "cpu", "--no-progress"]) == 0
    summary = capsys.readouterr().out
    assert "12 fused node(s) for depth 12, 0 Softmax" in summary and "PASSED" in summary
    assert "backbone      ResNetV2 stem, stride 4: 1 GroupNormalization, 0 BatchNormalization" in summary


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_fp16_hybrid_runs_on_cuda_without_cpu_fallback(hybrid_exports, mini, tmp_path):
    """GroupNormalization, the folded Convs, MaxPool and Attention all on the CUDA provider."""
    from export_testlib import HEAVY_OPS, cuda_session, providers_by_op

    session = cuda_session(hybrid_exports["fp16"].path, profile_dir=tmp_path)
    pixels = photo_inputs(PREPROCESSING)
    logits = session.run(["logits"], {"pixel_values": pixels})[0]
    placed = providers_by_op(session.end_profiling())
    assert placed.get("Attention") == {"CUDAExecutionProvider"}, placed
    # Should ONNX Runtime expand GroupNormalization into its function body, the pieces count as heavy too.
    elementwise = {"ReduceMean", "InstanceNormalization", "Sub", "Div", "Mul", "Sqrt", "Add", "Relu", "Pad"}
    on_cpu = {op for op, providers in placed.items() if "CPUExecutionProvider" in providers}
    assert not on_cpu & (HEAVY_OPS | elementwise), on_cpu
    with torch.no_grad():
        expected = mini(torch.from_numpy(pixels)).numpy()
    assert np.abs(logits - expected).max() <= 1e-2 * max(1.0, float(np.abs(expected).max()))
