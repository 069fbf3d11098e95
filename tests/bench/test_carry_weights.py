"""bench/carry/weights.py: a skeleton keeps the graph and small tensors, the weights drawn again follow the
original statistics, and an fp16/fp32 pair stays a pair (fp16 weights = the fp32 ones rounded)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from bench.carry import weights

REPO = Path(__file__).resolve().parents[2]


def linear_pair(tmp_path: Path) -> tuple[Path, Path]:
    """y = x @ W + b in fp32, and the same in fp16 the way model/export.py writes it (Cast in and out,
    weights under 'inner.'): W large, b small, C a large constant."""
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((96, 64)) * 0.02 + 0.001).astype(np.float32)
    b = rng.standard_normal(64).astype(np.float32)
    c = np.full((64, 64), 0.5, np.float32)

    def model(prefix: str, dtype) -> onnx.ModelProto:
        elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
        nodes = []
        x = "x"
        if dtype is np.float16:
            nodes.append(helper.make_node("Cast", ["x"], ["x16"], to=elem))
            x = "x16"
        nodes += [
            helper.make_node("MatMul", [x, f"{prefix}W"], ["h"]),
            helper.make_node("Add", ["h", f"{prefix}b"], ["hb"]),
            helper.make_node("MatMul", ["hb", f"{prefix}C"], ["y16" if dtype is np.float16 else "y"]),
        ]
        if dtype is np.float16:
            nodes.append(helper.make_node("Cast", ["y16"], ["y"], to=TensorProto.FLOAT))
        inits = [numpy_helper.from_array(a.astype(dtype), f"{prefix}{n}") for n, a in (("W", w), ("b", b), ("C", c))]
        graph = helper.make_graph(
            nodes,
            "linear",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 96])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 64])],
            inits,
        )
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)

    paths = tmp_path / "lin_fp32.onnx", tmp_path / "lin_fp16.onnx"
    onnx.save(model("", np.float32), str(paths[0]))
    onnx.save(model("inner.", np.float16), str(paths[1]))
    return paths


def initializers(path: Path) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer}


def test_pair_is_stripped_and_drawn_again_consistently(tmp_path):
    fp32, fp16 = linear_pair(tmp_path)
    skeletons = weights.strip([fp32, fp16], tmp_path / "skel")
    assert [s.name for s in skeletons] == ["lin_fp32.skeleton.onnx", "lin_fp16.skeleton.onnx"]
    skeleton = {t.name: t for t in onnx.load(str(skeletons[0])).graph.initializer}
    assert not skeleton["W"].raw_data and not skeleton["C"].raw_data  # stripped
    assert skeletons[0].stat().st_size < 2000 < fp32.stat().st_size

    drawn = {}
    for skel, name in zip(skeletons, ("fp32", "fp16"), strict=True):
        out = tmp_path / f"drawn_{name}.onnx"
        result = weights.regenerate(skel, out)
        assert result == {"tensors": 2, "identical": True, "numpy": np.__version__}
        drawn[name] = initializers(out)
    original = initializers(fp32)
    np.testing.assert_array_equal(drawn["fp32"]["b"], original["b"])  # small: travels as it is
    np.testing.assert_array_equal(drawn["fp32"]["C"], original["C"])  # constant: stays that constant
    w = drawn["fp32"]["W"]
    assert not np.array_equal(w, original["W"]) and np.isfinite(w).all() and (w != 0).all()
    assert abs(w.mean() - original["W"].mean()) < 5e-4 and abs(w.std() / original["W"].std() - 1) < 0.05
    np.testing.assert_array_equal(drawn["fp16"]["inner.W"], w.astype(np.float16))  # the pair stays a pair
    np.testing.assert_array_equal(drawn["fp16"]["inner.b"], original["b"].astype(np.float16))

    x = np.random.default_rng(1).standard_normal((4, 96)).astype(np.float32)
    outputs = [
        ort.InferenceSession(str(tmp_path / f"drawn_{n}.onnx"), providers=["CPUExecutionProvider"]).run(None, {"x": x})[
            0
        ]
        for n in ("fp32", "fp16")
    ]
    np.testing.assert_allclose(outputs[1], outputs[0], rtol=2e-2, atol=2e-2)


def test_digits_model_drawn_again_runs_and_is_reproducible(tmp_path):
    (skeleton,) = weights.strip([REPO / "models" / "digits" / "model.onnx"], tmp_path)
    first, second = tmp_path / "a.onnx", tmp_path / "b.onnx"
    assert weights.regenerate(skeleton, first)["tensors"] > 0
    weights.regenerate(skeleton, second)
    assert first.read_bytes() == second.read_bytes()
    original = onnx.load(str(REPO / "models" / "digits" / "model.onnx"))
    drawn = onnx.load(str(first))
    assert [n.op_type for n in drawn.graph.node] == [n.op_type for n in original.graph.node]
    assert drawn.metadata_props == original.metadata_props  # what the service reads travels unchanged
    session = ort.InferenceSession(str(first), providers=["CPUExecutionProvider"])
    feed = session.get_inputs()[0]
    shape = [d if isinstance(d, int) else 3 for d in feed.shape]
    (logits,) = session.run(None, {feed.name: np.random.default_rng(0).standard_normal(shape, dtype=np.float32)})
    assert logits.shape[0] == 3 and np.isfinite(logits).all()


def test_a_key_with_two_shapes_is_refused(tmp_path):
    fp32, _ = linear_pair(tmp_path)
    other = onnx.load(str(fp32))
    w = next(t for t in other.graph.initializer if t.name == "W")
    w.CopyFrom(numpy_helper.from_array(np.ones((64, 96), np.float32), "inner.W"))
    onnx.save(other, str(tmp_path / "other.onnx"))
    with pytest.raises(weights.WeightsError, match="shape"):
        weights.strip([fp32, tmp_path / "other.onnx"], tmp_path / "skel")


def test_a_skeleton_that_does_not_match_its_manifest_is_refused(tmp_path):
    fp32, _ = linear_pair(tmp_path)
    (skeleton,) = weights.strip([fp32], tmp_path / "skel")
    manifest = skeleton.with_name("lin_fp32" + weights.MANIFEST_SUFFIX)
    data = json.loads(manifest.read_text())
    data["tensors"][0]["dims"] = [1, 2]
    manifest.write_text(json.dumps(data))
    with pytest.raises(weights.WeightsError, match="not the one the manifest describes"):
        weights.regenerate(skeleton, tmp_path / "out.onnx")
