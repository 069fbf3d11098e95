"""The exported graph: fused attention, parity per precision, dynamic batch, metadata, external data."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from export_testlib import DEPTH, LABELS, SHA, SOURCE, export, make_model

from model.export import ExportError, export_model, resolve_precision, torch_to_onnx
from model.onnx_io import save_onnx
from model.verify import ExportFileError, graph_stats, inspect_export
from service.core.metadata import ModelMetadata, Preprocessing


def run(path, pixels: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(["logits"], {"pixel_values": pixels})[0]


@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8"])
def test_every_block_is_one_fused_attention_node_and_no_softmax_remains(exports, precision):
    model = onnx.load(exports[precision].path)
    stats = graph_stats(model)
    attention = [n for n in model.graph.node if n.op_type == "Attention"]
    assert len(attention) == DEPTH == stats.fused_attention
    assert all(n.domain in ("", "ai.onnx") for n in attention)  # the standard op, not a contrib one
    assert stats.softmax == 0 and "Softmax" not in stats.op_counts
    assert stats.opset == 23


def test_explicit_attention_exports_unfused_and_the_count_sees_it(unfused_graph):
    stats = graph_stats(unfused_graph)
    assert stats.fused_attention == 0
    assert stats.softmax == DEPTH


def test_fp32_matches_pytorch_within_1e_4(exports, fixed_inputs, torch_logits):
    logits = run(exports["fp32"].path, fixed_inputs)
    assert logits.dtype == np.float32
    assert np.abs(logits - torch_logits).max() <= 1e-4
    np.testing.assert_array_equal(logits.argmax(1), torch_logits.argmax(1))


def test_fp16_matches_pytorch_fp32_within_1e_2_with_identical_top1(exports, fixed_inputs, torch_logits):
    logits = run(exports["fp16"].path, fixed_inputs)
    assert logits.dtype == np.float32  # float32 out as well as in: the casts are inside the graph
    diff = np.abs(logits - torch_logits).max()
    assert 0 < diff <= 1e-2  # > 0: it really computed in half precision
    np.testing.assert_array_equal(logits.argmax(1), torch_logits.argmax(1))


def test_fp16_graph_computes_in_half_with_layernorm_statistics_in_fp32(exports):
    model = onnx.load(exports["fp16"].path)
    float_types = {t.data_type for t in model.graph.initializer} - {onnx.TensorProto.INT64}
    assert float_types == {onnx.TensorProto.FLOAT16}  # every weight is half; shape constants stay int64
    for node in model.graph.node:
        if node.op_type == "LayerNormalization":
            stash = next((a.i for a in node.attribute if a.name == "stash_type"), 1)
            assert stash == onnx.TensorProto.FLOAT


def test_int8_top1_agreement_is_reported_and_bounded(exports, fixed_inputs, torch_logits):
    model = onnx.load(exports["int8"].path)
    assert graph_stats(model).op_counts.get("MatMulInteger", 0) >= 4 * DEPTH  # qkv, proj, fc1, fc2 per block
    logits = run(exports["int8"].path, fixed_inputs)
    agreement = float((logits.argmax(1) == torch_logits.argmax(1)).mean())
    scale = np.abs(torch_logits).max()
    print(
        f"int8 top-1 agreement {agreement:.2f}, max abs diff {np.abs(logits - torch_logits).max():.3g} "
        f"(logit scale {scale:.2f})"
    )
    assert agreement >= 0.75
    assert np.abs(logits - torch_logits).max() <= 0.2 * scale
    assert exports["int8"].file_bytes < 0.5 * exports["fp32"].file_bytes


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_dynamic_batch_rows_equal_batch_one(exports, fixed_inputs, precision):
    session = ort.InferenceSession(str(exports[precision].path), providers=["CPUExecutionProvider"])
    pixels = np.concatenate([fixed_inputs, fixed_inputs[:5]])  # 17 rows
    single = np.concatenate([session.run(["logits"], {"pixel_values": pixels[i : i + 1]})[0] for i in range(17)])
    atol = 1e-5 if precision == "fp32" else 1e-2
    for batch in (1, 3, 17):
        out = np.concatenate(
            [session.run(["logits"], {"pixel_values": pixels[i : i + batch]})[0] for i in range(0, 17, batch)]
        )
        assert out.shape == (17, len(LABELS))
        np.testing.assert_allclose(out, single, rtol=0, atol=atol)


def test_signature_is_pixel_values_to_logits_with_dynamic_batch(exports):
    model = onnx.load(exports["fp32"].path)
    (pixel_values,) = model.graph.input
    (logits,) = model.graph.output
    assert pixel_values.name == "pixel_values" and logits.name == "logits"
    in_dims = [d.dim_param or d.dim_value for d in pixel_values.type.tensor_type.shape.dim]
    out_dims = [d.dim_param or d.dim_value for d in logits.type.tensor_type.shape.dim]
    assert isinstance(in_dims[0], str) and in_dims[1:] == [3, 224, 224]
    assert out_dims == [in_dims[0], len(LABELS)]


@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8"])
def test_metadata_round_trips_through_model_metadata(exports, precision):
    result = exports[precision]
    model = onnx.load(result.path, load_external_data=False)
    meta = ModelMetadata.from_props({p.key: p.value for p in model.metadata_props})
    assert meta == result.metadata
    assert meta.labels == LABELS and meta.precision == precision and meta.input_dtype == "float32"
    assert meta.preprocessing == Preprocessing.timm_eval(224)
    assert meta.architecture == "vit_tiny_patch16_224" and meta.source == SOURCE and meta.weights_sha256 == SHA
    assert meta.extra["depth"] == str(DEPTH) and meta.extra["opset"] == "23"
    assert meta.extra["attention_op"] == "Attention"
    # No node carries the exporter's stack traces (they hold this machine's paths).
    assert not any(node.metadata_props for node in model.graph.node)


def test_external_data_round_trips(tmp_path, exports, tiny_model, fixed_inputs):
    result = export(tiny_model, tmp_path / "ext.onnx", "fp32", external_data_threshold_bytes=1024)
    data = tmp_path / "ext.onnx.data"
    assert result.external_data == data and data.is_file()
    assert result.path.stat().st_size < 0.1 * data.stat().st_size  # the weights really moved out
    assert data.stat().st_mode & 0o777 == result.path.stat().st_mode & 0o777  # readable by whoever reads the .onnx
    info = inspect_export(result.path)
    assert info.external_data == ("ext.onnx.data",) and info.file_bytes == result.file_bytes
    np.testing.assert_array_equal(run(result.path, fixed_inputs[:2]), run(exports["fp32"].path, fixed_inputs[:2]))

    # Writing again replaces the weights file instead of appending to it.
    size = data.stat().st_size
    save_onnx(onnx.load(result.path), result.path, external_data_threshold_bytes=1024)
    assert data.stat().st_size == size
    np.testing.assert_array_equal(run(result.path, fixed_inputs[:2]), run(exports["fp32"].path, fixed_inputs[:2]))

    # Moved without its weights: a clear error, not an ONNX Runtime traceback.
    moved = tmp_path / "moved"
    moved.mkdir()
    (moved / "ext.onnx").write_bytes(result.path.read_bytes())
    with pytest.raises(ExportFileError, match="ext.onnx.data, which is missing"):
        inspect_export(moved / "ext.onnx")


def test_small_model_under_threshold_is_one_file(exports):
    assert exports["fp32"].external_data is None
    assert not exports["fp32"].path.with_name(exports["fp32"].path.name + ".data").exists()


def test_precision_defaults_follow_target():
    assert resolve_precision(None, None) == "fp32"
    assert resolve_precision(None, "gpu") == "fp16"
    assert resolve_precision(None, "cpu") == "fp32"
    assert resolve_precision("int8", "gpu") == "int8"
    with pytest.raises(ExportError):
        resolve_precision("bf16", None)


def test_bad_requests_fail_before_exporting(tmp_path, tiny_model):
    with pytest.raises(ExportError, match="opset 18 has no fused Attention"):
        export(tiny_model, tmp_path / "x.onnx", "fp32", opset=18)
    with pytest.raises(ExportError, match="opset 26 is newer than this exporter converts to"):
        export(tiny_model, tmp_path / "x.onnx", "fp32", opset=26)
    with pytest.raises(ExportError, match="3 labels for a head with 10 classes"):
        export_model(
            tiny_model,
            tiny_model.config,
            tmp_path / "x.onnx",
            labels=["a", "b", "c"],
            preprocessing=Preprocessing.timm_eval(224),
        )
    headless = make_model()
    headless.reset_head(0)
    with pytest.raises(ExportError, match="no classification head"):
        export_model(
            headless, headless.config, tmp_path / "x.onnx", labels=[], preprocessing=Preprocessing.timm_eval(224)
        )
    assert not (tmp_path / "x.onnx").exists()


def test_export_leaves_the_model_unchanged(tiny_model, exports):
    fresh = make_model()
    for (name, a), b in zip(tiny_model.state_dict().items(), fresh.state_dict().values(), strict=True):
        assert a.dtype == b.dtype and bool((a == b).all()), name
    assert not tiny_model.training


def test_same_weights_give_byte_identical_files(tmp_path, tiny_model, exports):
    # No timestamps, stack traces or machine paths in the file: an export is reproducible.
    again = export(tiny_model, tmp_path / "again.onnx", "fp32")
    assert again.path.read_bytes() == exports["fp32"].path.read_bytes()


def test_newest_supported_opset_keeps_the_fused_node(tiny_model):
    stats = graph_stats(torch_to_onnx(tiny_model, tiny_model.config, opset=25))
    assert (stats.opset, stats.fused_attention, stats.softmax) == (25, DEPTH, 0)
