"""model.verify: it passes good exports, fails bad ones with the numbers, and names what is wrong with a file."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from export_testlib import DEPTH, make_model
from onnx import TensorProto, helper

from model.onnx_io import save_onnx
from model.verify import (
    TOLERANCES,
    ExportFileError,
    VerificationFailed,
    compare,
    format_summary,
    inspect_export,
    verify_against_source,
    verify_export,
)
from service.core.metadata import PRECISIONS


@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8"])
def test_good_exports_pass_with_figures_on_random_and_photos(exports, tiny_model, precision):
    result = exports[precision]
    report = verify_export(result.path, tiny_model, expected_sha256=result.metadata.weights_sha256)
    assert report.failures() == [] and report.passed
    assert report.info.graph.fused_attention == report.depth == DEPTH
    assert report.weights_match is True
    random_set, photos = report.parity
    assert (random_set.name, random_set.rows, photos.name, photos.rows) == ("random", 8, "photos", 4)
    assert photos.top1_agree == photos.top1_rows == 4
    summary = format_summary(report.info, report)
    assert "PASSED" in summary and f"{DEPTH} fused node(s) for depth {DEPTH}" in summary
    assert f"precision     {precision}" in summary


def test_other_weights_fail_loudly_with_the_numbers(exports):
    other = make_model(seed=1)
    report = verify_export(exports["fp32"].path, other, expected_sha256="f" * 64)
    failures = report.failures()
    assert report.weights_match is False
    assert any("exported from other weights" in f for f in failures)
    assert any(f.startswith("random: max abs diff") and "> bound" in f for f in failures)
    with pytest.raises(VerificationFailed) as raised:
        report.raise_for_failures()
    assert raised.value.report is report
    assert "FAILED" in format_summary(report.info, report)


def test_unfused_graph_fails_the_fused_count(tmp_path, exports, tiny_model, unfused_graph):
    graph = onnx.ModelProto()
    graph.CopyFrom(unfused_graph)
    helper.set_model_props(graph, exports["fp32"].metadata.to_props())
    save_onnx(graph, tmp_path / "unfused.onnx")
    report = verify_export(tmp_path / "unfused.onnx", tiny_model)
    assert f"0 fused attention nodes, expected depth {DEPTH}" in report.failures()
    assert f"{DEPTH} Softmax node(s) outside fused attention" in report.failures()
    # The numbers themselves are fine: the explicit path computes the same function.
    assert all(p.failures() == [] for p in report.parity)


def test_ties_are_not_counted_for_top1():
    reference = np.array([[0.0, 0.0, 0.0], [0.0, 1.0, 0.5]], dtype=np.float32)
    candidate = np.array([[0.0, 0.0, 1e-3], [0.0, 1.0, 0.5]], dtype=np.float32)
    parity = compare("photos", reference, candidate, TOLERANCES["fp32"])
    assert (parity.top1_agree, parity.top1_rows) == (1, 1)
    flipped = compare("photos", reference, np.array([[0.0, 0.0, 0.0], [1.0, 0.0, 0.5]]), TOLERANCES["fp32"])
    assert (flipped.top1_agree, flipped.top1_rows) == (0, 1)
    assert any("top-1 agreement 0/1" in f for f in flipped.failures())


def test_a_zero_head_is_flagged_as_vacuous_parity(exports, tiny_model):
    zero_head = make_model()
    zero_head.reset_head(zero_head.config.num_classes)  # the paper's fresh head: all logits 0
    report = verify_export(exports["fp32"].path, zero_head)
    assert all(p.constant_reference for p in report.parity)
    assert "cannot see the transformer body" in format_summary(report.info, report)
    assert not any(p.constant_reference for p in verify_export(exports["fp32"].path, tiny_model).parity)


def _foreign_model() -> onnx.ModelProto:
    """A valid ONNX file that is not ours: y = x + x, no vitserve metadata."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])
    graph = helper.make_graph([helper.make_node("Add", ["x", "x"], ["y"])], "foreign", [x], [y])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _bad_files(tmp_path, good: bytes) -> dict:
    files = {
        "random bytes": (np.random.default_rng(0).bytes(4096), "not an ONNX model"),
        "truncated": (good[: len(good) // 2], "not an ONNX model"),
        "empty": (b"", "not an ONNX model"),
        "text": (b"<html>404 Not Found</html>\n", "not an ONNX model"),
        "foreign": (_foreign_model().SerializeToString(), "not a vitserve export"),
    }
    paths = {}
    for name, (data, message) in files.items():
        path = tmp_path / f"{name.replace(' ', '_')}.onnx"
        path.write_bytes(data)
        paths[name] = (path, message)
    return paths


def test_corrupt_and_foreign_files_give_one_clear_error(tmp_path, exports):
    for name, (path, message) in _bad_files(tmp_path, exports["fp32"].path.read_bytes()).items():
        with pytest.raises(ExportFileError, match=message) as raised:
            inspect_export(path)
        assert str(path) in str(raised.value), name
        assert "\n" not in str(raised.value), name
    with pytest.raises(ExportFileError, match="no such file"):
        inspect_export(tmp_path / "missing.onnx")
    with pytest.raises(ExportFileError, match="no such file"):
        inspect_export(tmp_path)


def test_wrong_signature_is_named(tmp_path, exports):
    model = onnx.load(exports["fp32"].path)
    model.graph.input[0].name = "images"
    for node in model.graph.node:
        node.input[:] = ["images" if i == "pixel_values" else i for i in node.input]
    save_onnx(model, tmp_path / "renamed.onnx")
    with pytest.raises(ExportFileError, match="expected input 'pixel_values' and output 'logits'.*'images'"):
        inspect_export(tmp_path / "renamed.onnx")


def test_unknown_precision_in_metadata_is_named(tmp_path, exports):
    model = onnx.load(exports["fp32"].path)
    for prop in model.metadata_props:
        if prop.key == "vitserve.precision":
            prop.value = "bf16"
    save_onnx(model, tmp_path / "bf16.onnx")
    with pytest.raises(ExportFileError, match="vitserve.precision must be one of fp32, fp16, int8, got 'bf16'"):
        inspect_export(tmp_path / "bf16.onnx")


def test_every_precision_the_metadata_accepts_has_a_tolerance():
    assert set(TOLERANCES) == set(PRECISIONS)


def test_verify_checks_the_file_before_loading_the_source(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x00" * 100)
    # The source does not exist either: the file's error must come first and alone.
    with pytest.raises(ExportFileError, match="not an ONNX model"):
        verify_against_source(bad, "/nonexistent/checkpoint.safetensors")
