"""ONNX classifiers that are not our exports: model description sources, start-up validation, engine
layouts and batch axes, `vitserve inspect`, `vitserve export --from-onnx`.

The foreign graphs are built here with onnx.helper: a linear classifier over every pixel, so a wrong
transpose, dtype or normalisation changes the logits, and the expected logits are one numpy matmul.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from fastapi.testclient import TestClient
from onnx import TensorProto, helper, numpy_helper

from service.cli import main as cli_main
from service.core.metadata import ModelMetadata, Preprocessing
from service.core.settings import Settings
from service.core.spec import (
    ModelSpecError,
    SpecOptions,
    graph_io_from_onnx,
    load_labels,
    resolve_spec,
    sidecar_path,
)
from service.runtime.engine import Engine, EngineError
from service.runtime.preprocess import load_pixels

SIZE = 8
K = 5
LABELS = ("ant", "bee", "cat", "dog", "eel")
HF_NORM = ["--mean", "0.5,0.5,0.5", "--std", "0.5,0.5,0.5"]


def _weights(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.standard_normal((3 * SIZE * SIZE, K)).astype(np.float32), rng.standard_normal(K).astype(np.float32)


def expected_logits(batch: np.ndarray) -> np.ndarray:
    """(N, 3, H, W) -> (N, K): what every graph below computes, in numpy."""
    w, b = _weights()
    return batch.reshape(len(batch), -1).astype(np.float64) @ w + b


def build_classifier(
    path: Path,
    *,
    batch: int | str = "N",
    layout: str = "nchw",
    dtype: int = TensorProto.FLOAT,
    classes: int | str = K,
    output_rank: int = 2,
    input_rank: int = 4,
    extra_input: bool = False,
    extra_output: bool = False,
    props: dict[str, str] | None = None,
    height: int = SIZE,
) -> Path:
    """A linear classifier over all pixels (as ``expected_logits``), saved to ``path`` (opset 17, no metadata)."""
    w, b = _weights()
    if layout == "nhwc":  # the same function of the image: permute the weight rows to (H, W, C) order
        w = w.reshape(3, SIZE, SIZE, K).transpose(1, 2, 0, 3).reshape(-1, K)
    shape = {"nchw": [batch, 3, height, SIZE], "nhwc": [batch, height, SIZE, 3]}[layout]
    if input_rank != 4:
        shape = [batch, 3 * SIZE * SIZE]
    inputs = [helper.make_tensor_value_info("image", dtype, shape)]
    nodes = [
        helper.make_node("Cast", ["image"], ["image32"], to=TensorProto.FLOAT),
        helper.make_node("Reshape", ["image32", "flat_shape"], ["flat"]),
        helper.make_node("MatMul", ["flat", "w"], ["scores"]),
        helper.make_node("Add", ["scores", "b"], ["logits2d"]),
    ]
    out_shape = [batch, classes]
    if output_rank == 3:
        nodes.append(helper.make_node("Unsqueeze", ["logits2d", "axis2"], ["logits"]))
        out_shape = [batch, classes, 1]
    else:
        nodes.append(helper.make_node("Identity", ["logits2d"], ["logits"]))
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, out_shape)]
    if extra_input:
        inputs.append(helper.make_tensor_value_info("mask", TensorProto.FLOAT, [batch, SIZE, SIZE]))
        nodes.append(helper.make_node("ReduceSum", ["mask"], ["mask_sum"], keepdims=0))
        outputs.append(helper.make_tensor_value_info("mask_sum", TensorProto.FLOAT, []))
    if extra_output:
        outputs.append(helper.make_tensor_value_info("features", TensorProto.FLOAT, [batch, 3 * SIZE * SIZE]))
        nodes.append(helper.make_node("Identity", ["flat"], ["features"]))
    initializers = [
        numpy_helper.from_array(w, "w"),
        numpy_helper.from_array(b, "b"),
        numpy_helper.from_array(np.array([-1, 3 * SIZE * SIZE], np.int64), "flat_shape"),
        numpy_helper.from_array(np.array([2], np.int64), "axis2"),
    ]
    graph = helper.make_graph(nodes, "foreign_classifier", inputs, outputs, initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="elsewhere")
    model.ir_version = 8
    if props:
        helper.set_model_props(model, props)
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


@pytest.fixture
def labels_txt(tmp_path) -> Path:
    path = tmp_path / "labels.txt"
    path.write_text("\n".join(LABELS) + "\n\n")
    return path


@pytest.fixture
def foreign(tmp_path) -> Path:
    return build_classifier(tmp_path / "other.onnx")


def flags(labels: Path, **extra: str) -> SpecOptions:
    raw = {"mean": "0.5,0.5,0.5", "std": "0.5,0.5,0.5", "labels": str(labels), **extra}
    return SpecOptions.parse(raw, where="flags")


def spec_of(path: Path, options: SpecOptions | None = None):
    return resolve_spec(path, graph_io_from_onnx(onnx.load(str(path))), options)


def engine(path: Path, options: SpecOptions | None = None) -> Engine:
    return Engine(path, spec_options=options, providers="cpu", intra_op_threads=1, log_placement=False)


def random_batch(n: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 3, SIZE, SIZE)).astype(np.float32)


# --- where each value comes from ---------------------------------------------------------------------


def test_our_export_resolves_exactly_to_its_own_metadata(tiny_onnx, tmp_path):
    proto = onnx.load(str(tiny_onnx))
    ours = ModelMetadata.from_props({p.key: p.value for p in proto.metadata_props})
    spec = resolve_spec(tiny_onnx, graph_io_from_onnx(proto))
    assert spec.metadata == ours
    assert {
        spec.sources[k]
        for k in ("name", "image_size", "resize", "resize_mode", "interpolation", "mean", "std", "labels")
    } == {"metadata"}
    assert (spec.input_name, spec.output_name, spec.input_layout, spec.batch_size) == (
        "pixel_values",
        "logits",
        "nchw",
        None,
    )
    assert engine(tiny_onnx).metadata == ours


def test_metadata_wins_over_the_sidecar_and_a_flag_wins_over_both(tiny_onnx, tmp_path):
    model = tmp_path / "ours.onnx"
    model.write_bytes(tiny_onnx.read_bytes())
    sidecar_path(model).write_text(json.dumps({"mean": [0.1, 0.2, 0.3], "interpolation": "nearest"}))
    spec = spec_of(model)
    assert spec.metadata.preprocessing.mean == (0.485, 0.456, 0.406) and spec.sources["mean"] == "metadata"
    assert spec.metadata.preprocessing.interpolation == "bicubic" and spec.sources["interpolation"] == "metadata"
    spec = spec_of(model, SpecOptions.parse({"mean": "imagenet", "interpolation": "bilinear"}, where="flags"))
    assert spec.sources["interpolation"] == "flag" and spec.metadata.preprocessing.interpolation == "bilinear"
    assert spec.sources["mean"] == "flag" and spec.sources["std"] == "metadata"


def test_sidecar_describes_a_foreign_file_and_flags_override_it(foreign, tmp_path):
    (tmp_path / "names.json").write_text(json.dumps({"id2label": {str(i): n for i, n in enumerate(LABELS)}}))
    sidecar_path(foreign).write_text(
        json.dumps(
            {
                "mean": "inception",
                "std": [0.5, 0.5, 0.5],
                "labels": "names.json",
                "crop": 0.875,
                "interpolation": "bicubic",
                "name": "other_vit",
            }
        )
    )
    spec = spec_of(foreign)
    p = spec.metadata.preprocessing
    assert spec.metadata.labels == LABELS and spec.metadata.architecture == "other_vit"
    # crop is timm's crop_pct: resize = floor(8 / 0.875) = 9 on the short side, then the centre 8x8
    assert (p.image_size, p.resize_size, p.resize_mode, p.interpolation) == (SIZE, 9, "shortest", "bicubic")
    assert spec.sources == {
        **spec.sources,
        "mean": "sidecar",
        "labels": "sidecar",
        "resize": "sidecar",
        "image_size": "graph",
        "resize_mode": "default",
        "input_name": "graph",
    }
    spec = spec_of(foreign, SpecOptions.parse({"resize": "12", "mean": "0.4,0.4,0.4"}, where="flags"))
    assert spec.metadata.preprocessing.resize_size == 12 and spec.sources["resize"] == "flag"
    assert spec.metadata.preprocessing.mean == (0.4, 0.4, 0.4) and spec.sources["std"] == "sidecar"
    effective = engine(foreign).describe()["spec"]
    assert effective["labels"] == {"value": K, "source": "sidecar", "file": str(tmp_path / "names.json")}


def test_defaults_for_a_foreign_file_are_the_whole_image_bilinear(foreign, labels_txt):
    spec = spec_of(foreign, flags(labels_txt))
    p = spec.metadata.preprocessing
    assert (p.resize_size, p.resize_mode, p.interpolation, spec.metadata.architecture) == (
        SIZE,
        "squash",
        "bilinear",
        "other",
    )
    assert [spec.sources[k] for k in ("resize", "resize_mode", "interpolation", "name")] == ["default"] * 4


def test_missing_description_names_every_field_and_how_to_give_it(tmp_path, labels_txt):
    dynamic = build_classifier(tmp_path / "dyn.onnx", height="H")
    with pytest.raises(EngineError) as info:
        engine(dynamic)
    message = str(info.value)
    assert "these are not given: image_size, mean, std, labels" in message
    assert "carries no vitserve metadata" in message and "vitserve.architecture" in message
    assert "--mean" in message and "VITSERVE_LABELS" in message and str(sidecar_path(dynamic)) in message
    with pytest.raises(ModelSpecError, match="not given: std$|not given: std\\."):
        spec_of(
            dynamic, SpecOptions.parse({"mean": "imagenet", "labels": str(labels_txt), "image_size": 8}, where="flags")
        )


def test_labels_files(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps(list(LABELS)))
    (tmp_path / "b.json").write_text(json.dumps({"1": "bee", "0": "ant"}))
    (tmp_path / "gap.json").write_text(json.dumps({"0": "ant", "2": "cat"}))
    (tmp_path / "hole.txt").write_text("ant\n\nbee\n")
    assert load_labels(tmp_path / "a.json") == LABELS
    assert load_labels(tmp_path / "b.json") == ("ant", "bee")
    with pytest.raises(ValueError, match="without gaps"):
        load_labels(tmp_path / "gap.json")
    with pytest.raises(ValueError, match="empty label on line"):
        load_labels(tmp_path / "hole.txt")


def test_bad_values_and_unknown_sidecar_fields_are_named(foreign):
    with pytest.raises(ModelSpecError, match="flags: mean: expected 3 numbers"):
        SpecOptions.parse({"mean": "0.5,0.5"}, where="flags")
    with pytest.raises(ModelSpecError, match="either resize or crop"):
        SpecOptions.parse({"resize": 9, "crop": 0.9}, where="flags")
    sidecar_path(foreign).write_text(json.dumps({"means": [0.5, 0.5, 0.5]}))
    with pytest.raises(ModelSpecError, match="unknown field\\(s\\) means"):
        spec_of(foreign)


def test_settings_read_the_description_from_the_environment(monkeypatch, labels_txt):
    monkeypatch.setenv("VITSERVE_MEAN", "imagenet")
    monkeypatch.setenv("VITSERVE_LABELS", str(labels_txt))
    monkeypatch.setenv("VITSERVE_CROP", "0.9")
    monkeypatch.setenv("VITSERVE_OUTPUT_NAME", "")
    options = Settings().spec_options()
    assert options.mean == (0.485, 0.456, 0.406) and options.labels == LABELS and options.crop == 0.9
    assert options.output_name is None and options.std is None
    monkeypatch.setenv("VITSERVE_STD", "0,1,1")
    with pytest.raises(ValueError, match="std must be > 0"):
        Settings()


# --- start-up validation ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "options", "message"),
    [
        ({"input_rank": 2}, {}, "is not a 4-D image input"),
        ({"output_rank": 3}, {}, "output logits \\[N, 5, 1\\] float32 is not 2-D"),
        ({}, {"labels": "four.txt"}, "4 labels but output logits has 5 classes"),
        ({"dtype": TensorProto.UINT8}, {}, "element type uint8"),
        (
            {"extra_input": True},
            {},
            "has 2 inputs \\(image \\[N, 3, 8, 8\\] float32, mask \\[N, 8, 8\\] float32\\); pick one with --input-name",
        ),
        ({"extra_input": True}, {"input_name": "image"}, "needs more inputs than the image \\(mask\\)"),
        ({"extra_output": True}, {}, "has 2 outputs \\(logits \\[N, 5\\] float32, features \\[N, 192\\] float32\\)"),
        ({"extra_output": True}, {"output_name": "scores"}, "no output named 'scores'"),
        ({}, {"image_size": "16"}, "fixed height of 8 but image_size is 16"),
    ],
    ids=[
        "input-not-4d",
        "output-not-2d",
        "label-count",
        "uint8-input",
        "several-inputs",
        "other-inputs-unfed",
        "several-outputs",
        "unknown-output",
        "image-size-vs-graph",
    ],
)
def test_startup_validation_names_the_problem(tmp_path, labels_txt, kwargs, options, message):
    model = build_classifier(tmp_path / "bad.onnx", **kwargs)
    if options.get("labels") == "four.txt":
        labels_txt = tmp_path / "four.txt"
        labels_txt.write_text("a\nb\nc\nd\n")
        options = {}
    with pytest.raises(EngineError, match=message):
        engine(model, flags(labels_txt, **options))


def test_symbolic_class_axis_is_checked_by_a_probe_run(tmp_path, labels_txt):
    model = build_classifier(tmp_path / "sym.onnx", classes="classes")
    assert engine(model, flags(labels_txt)).metadata.num_classes == K
    (tmp_path / "four.txt").write_text("a\nb\nc\nd\n")
    with pytest.raises(EngineError, match="4 labels but output logits has 5 classes"):
        engine(model, flags(tmp_path / "four.txt"))


def test_output_name_picks_the_logits_among_several(tmp_path, labels_txt):
    model = build_classifier(tmp_path / "two_out.onnx", extra_output=True)
    served = engine(model, flags(labels_txt, output_name="logits"))
    batch = random_batch(3)
    np.testing.assert_allclose(served.run(batch), expected_logits(batch), rtol=1e-4, atol=1e-4)
    assert served.describe()["spec"]["output_name"] == {"value": "logits", "source": "flag"}


# --- layouts, dtypes, batch axes ------------------------------------------------------------------


def test_channels_last_input_is_fed_transposed(tmp_path, labels_txt):
    nhwc = engine(build_classifier(tmp_path / "nhwc.onnx", layout="nhwc"), flags(labels_txt))
    assert nhwc.channels_last and nhwc.spec.sources["input_layout"] == "graph"
    batch = random_batch(4)
    np.testing.assert_allclose(nhwc.run(batch), expected_logits(batch), rtol=1e-4, atol=1e-4)


def test_fp16_input_is_fed_float16(tmp_path, labels_txt):
    served = engine(build_classifier(tmp_path / "half.onnx", dtype=TensorProto.FLOAT16), flags(labels_txt))
    assert served.input_dtype == np.float16 and served.metadata.input_dtype == "float16"
    assert served.metadata.precision == "fp16"
    batch = random_batch(2)
    logits = served.run(batch)
    assert logits.dtype == np.float32
    np.testing.assert_allclose(logits, expected_logits(batch.astype(np.float16)), rtol=1e-3, atol=1e-3)


def test_fixed_batch_graph_is_padded_and_split(tmp_path, labels_txt):
    served = engine(build_classifier(tmp_path / "b1.onnx", batch=1), flags(labels_txt))
    assert served.max_batch_size == 1 and served.describe()["spec"]["batch_size"]["value"] == 1
    batch = random_batch(3)
    np.testing.assert_allclose(served.run(batch), expected_logits(batch), rtol=1e-4, atol=1e-4)
    three = engine(build_classifier(tmp_path / "b3.onnx", batch=3), flags(labels_txt))
    batch = random_batch(5)  # a chunk of 3, then 2 padded with zeros to 3
    np.testing.assert_allclose(three.run(batch), expected_logits(batch), rtol=1e-4, atol=1e-4)


def test_fixed_batch_of_one_is_served_with_batching_off(tmp_path, labels_txt, encode_photo, caplog):
    model = build_classifier(tmp_path / "b1.onnx", batch=1)
    settings = Settings(
        model=model,
        mean="0.5,0.5,0.5",
        std="0.5,0.5,0.5",
        labels=labels_txt,
        max_batch_size=8,
        intra_op_threads=1,
        preprocess_threads=2,
    )
    images = [
        ("files", (f"{name}.png", encode_photo(name, "PNG"), "image/png")) for name in ("coffee", "chelsea", "rocket")
    ]
    from service.http.app import create_app

    with caplog.at_level(logging.WARNING), TestClient(create_app(settings)) as client:
        deadline = time.monotonic() + 30
        while client.get("/readyz").status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.05)
        described = client.get("/v1/models").json()
        answer = client.post("/v1/classify/batch", files=images)
    assert "fixed batch of 1: batching is turned off" in caplog.text
    assert described["batching"]["max_batch_size"] == 1
    assert described["spec"]["batch_size"] == {"value": 1, "source": "graph"}
    assert described["spec"]["labels"]["source"] == "flag" and described["labels"] == list(LABELS)
    assert answer.status_code == 200, answer.text
    p = described["preprocessing"]
    preprocessing = Preprocessing(**{**p, "mean": tuple(p["mean"]), "std": tuple(p["std"])})
    for name, result in zip(("coffee", "chelsea", "rocket"), answer.json()["results"], strict=True):
        pixels = load_pixels(encode_photo(name, "PNG"), preprocessing, max_pixels=10**8)
        assert result["predictions"][0]["label"] == LABELS[int(expected_logits(pixels[None]).argmax())]


# --- the CLI: serve refusals, inspect, export --from-onnx -------------------------------------------


def test_serve_refuses_an_unservable_file_in_one_line_with_exit_2(tmp_path, labels_txt, capsys):
    model = build_classifier(tmp_path / "out3d.onnx", output_rank=3)
    code = cli_main(["serve", "--model", str(model), "--port", "0", *HF_NORM, "--labels", str(labels_txt)])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert "output logits [N, 5, 1] float32 is not 2-D" in err
    code = cli_main(["serve", "--model", str(model), "--port", "0", "--mean", "red"])
    err = capsys.readouterr().err
    assert code == 2 and "invalid settings" in err and "mean" in err and "Traceback" not in err


def test_inspect_our_export(tiny_onnx, capsys):
    assert cli_main(["inspect", str(tiny_onnx)]) == 0
    text = capsys.readouterr().out
    assert "fused attention nodes: 2 (Attention x2); Softmax nodes: 0" in text
    assert "input  pixel_values [batch, 3, 32, 32] float32" in text and "batch axis: dynamic" in text
    assert "precision: fp32 (from metadata)" in text and "opsets: ai.onnx 23" in text
    assert cli_main(["inspect", str(tiny_onnx), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["fused_attention_total"] == 2 and summary["softmax_nodes"] == 0
    assert summary["vitserve_metadata_missing"] == [] and summary["servable"] is True
    assert summary["spec"]["mean"] == {"value": [0.485, 0.456, 0.406], "source": "metadata"}


def test_inspect_a_foreign_file(tmp_path, labels_txt, capsys):
    model = build_classifier(tmp_path / "b1.onnx", batch=1, props={"producer.note": "from elsewhere"})
    assert cli_main(["inspect", str(model), "--json"]) == 1  # not servable without a description
    summary = json.loads(capsys.readouterr().out)
    assert summary["servable"] is False and summary["missing"] == ["mean", "std", "labels"]
    assert summary["dynamic_batch"] is False and summary["opsets"] == {"ai.onnx": 17}
    assert summary["fused_attention_total"] == 0 and summary["precision"] == "fp32"
    assert summary["precision_from"] == "initializers" and summary["other_metadata"] == {
        "producer.note": "from elsewhere"
    }
    assert "vitserve.architecture" in summary["vitserve_metadata_missing"]
    assert cli_main(["inspect", str(model), *HF_NORM, "--labels", str(labels_txt)]) == 0
    text = capsys.readouterr().out
    assert "batch axis: FIXED" in text and "vitserve metadata: none" in text
    assert "labels         5" in text and "(flag)" in text and "batch_size     1" in text


def test_inspect_without_the_onnx_package_says_what_it_cannot_see(foreign, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "onnx", None)  # `import onnx` now raises ImportError
    assert cli_main(["inspect", str(foreign), "--json"]) == 1
    summary = json.loads(capsys.readouterr().out)
    assert summary["reader"] == "onnxruntime" and "onnx package is not installed" in summary["note"]
    assert "opsets" not in summary and summary["inputs"][0] == {
        "name": "image",
        "shape": ["N", 3, 8, 8],
        "dtype": "float32",
    }
    assert summary["precision"] == "fp32" and summary["precision_from"] == "input type"


def test_export_from_onnx_embeds_the_description_once(tmp_path, labels_txt, capsys):
    source = build_classifier(tmp_path / "nhwc.onnx", layout="nhwc", extra_output=True, props={"producer.note": "kept"})
    out = tmp_path / "ours.onnx"
    code = cli_main(
        [
            "export",
            "--from-onnx",
            str(source),
            "-o",
            str(out),
            *HF_NORM,
            "--labels",
            str(labels_txt),
            "--output-name",
            "logits",
            "--crop",
            "0.8",
            "--interpolation",
            "bicubic",
        ]
    )
    assert code == 0, capsys.readouterr().err
    props = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert props["producer.note"] == "kept" and json.loads(props["vitserve.labels"]) == list(LABELS)
    assert props["vitserve.output_name"] == "logits" and props["vitserve.input_layout"] == "nhwc"
    served = engine(out)  # no flags, no sidecar
    assert served.channels_last and served.output_name == "logits"
    assert served.metadata.preprocessing.resize_size == 10 and served.metadata.preprocessing.interpolation == "bicubic"
    assert set(served.spec.sources[k] for k in ("mean", "std", "labels", "resize", "output_name")) == {"metadata"}
    batch = random_batch(2)
    np.testing.assert_allclose(served.run(batch), expected_logits(batch), rtol=1e-4, atol=1e-4)
    # the same graph: only metadata_props differ
    a, b = onnx.load(str(source)), onnx.load(str(out))
    del a.metadata_props[:], b.metadata_props[:]
    assert a.SerializeToString() == b.SerializeToString()


def test_export_from_onnx_refusals(tmp_path, foreign, capsys):
    out = tmp_path / "ours.onnx"
    assert cli_main(["export", "--from-onnx", str(foreign), "-o", str(out), *HF_NORM]) == 2
    assert "not given: labels" in capsys.readouterr().err and not out.exists()
    assert cli_main(["export", "random:vit_tiny_patch16_224", "--from-onnx", str(foreign), "-o", str(out)]) == 2
    assert "not both" in capsys.readouterr().err
    assert cli_main(["export", "random:vit_tiny_patch16_224", "-o", str(out), "--mean", "imagenet"]) == 2
    assert "--mean only apply with --from-onnx" in capsys.readouterr().err


def test_score_a_folder_with_a_foreign_file_and_flags(tmp_path, labels_txt, encode_photo, capsys):
    model = build_classifier(tmp_path / "nhwc.onnx", layout="nhwc")
    photos = tmp_path / "photos"
    photos.mkdir()
    for name in ("coffee", "rocket"):
        (photos / f"{name}.png").write_bytes(encode_photo(name, "PNG"))
    out = tmp_path / "scores.jsonl"
    args = ["score", str(photos), "-o", str(out), "--model", str(model), "--workers", "0", "--top-k", "1", "--quiet"]
    assert cli_main(args) == 2 and "not given: mean, std, labels" in capsys.readouterr().err
    assert cli_main([*args, *HF_NORM, "--labels", str(labels_txt)]) == 0
    rows = {Path(r["path"]).stem: r for r in map(json.loads, out.read_text().splitlines())}
    served = engine(model, flags(labels_txt))
    for name in ("coffee", "rocket"):
        pixels = load_pixels(encode_photo(name, "PNG"), served.metadata.preprocessing, max_pixels=10**8)
        assert rows[name]["labels"] == [LABELS[int(expected_logits(pixels[None]).argmax())]]


def test_partial_or_malformed_metadata(tmp_path):
    partial = build_classifier(tmp_path / "partial.onnx", props={"vitserve.labels": json.dumps(list(LABELS))})
    spec = spec_of(partial, SpecOptions.parse({"mean": "imagenet", "std": "imagenet"}, where="flags"))
    assert spec.metadata.labels == LABELS and spec.sources["labels"] == "metadata"
    with pytest.raises(ModelSpecError, match="its vitserve metadata is incomplete, and these are not given: mean, std"):
        spec_of(partial)
    broken = build_classifier(tmp_path / "broken.onnx", props={"vitserve.mean": "[0.5, 0.5"})
    with pytest.raises(ModelSpecError, match="vitserve.mean is not JSON"):
        spec_of(broken)
