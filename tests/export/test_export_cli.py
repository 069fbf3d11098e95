"""`vitserve export` and `vitserve verify` end to end, through the real CLI dispatcher."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from export_testlib import export

from service.cli import main
from service.core.metadata import ModelMetadata

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_export_then_verify_a_random_checkpoint(tmp_path, capsys):
    out = tmp_path / "tiny.onnx"
    export = ["export", "random:vit_tiny_patch16_224", "-o", str(out), "--target", "cpu", "--name", "tiny-ft"]
    assert main([*export, "--no-progress"]) == 0
    summary = capsys.readouterr().out
    assert "12 fused node(s) for depth 12, 0 Softmax" in summary and "PASSED" in summary
    assert "same hash as the source" in summary
    meta = ModelMetadata.from_props({p.key: p.value for p in onnx.load(out).metadata_props})
    assert meta.precision == "fp32" and meta.source == "random:vit_tiny_patch16_224" and meta.num_classes == 1000
    # --name: what the service calls it; the architecture stays what verify rebuilds.
    assert (meta.served_name, meta.architecture) == ("tiny-ft", "vit_tiny_patch16_224")

    assert main(["verify", str(out), "--against", "random:vit_tiny_patch16_224", "--no-progress"]) == 0
    assert "PASSED" in capsys.readouterr().out


def _vitserve(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-m", "service.cli", *args], capture_output=True, text=True, timeout=120, cwd=REPO, env=env
    )


def test_verify_on_a_corrupt_file_exits_2_with_a_message_not_a_traceback(tmp_path):
    bad = tmp_path / "model.onnx"
    bad.write_bytes(b"definitely not protobuf" * 10)
    done = _vitserve("verify", str(bad), "--against", "random:vit_tiny_patch16_224", "--no-progress")
    assert done.returncode == 2
    assert "vitserve verify: error:" in done.stderr and "not an ONNX model" in done.stderr
    assert "Traceback" not in done.stderr


def test_export_rejects_an_unfusable_opset_before_importing(tmp_path, capsys):
    code = main(["export", "/nonexistent.safetensors", "-o", str(tmp_path / "x.onnx"), "--opset", "18"])
    assert code == 2
    assert "opset 18 has no fused Attention op" in capsys.readouterr().err
    assert not (tmp_path / "x.onnx").exists()


def test_export_reports_a_bad_source_clearly(tmp_path, capsys):
    code = main(["export", str(tmp_path / "missing.safetensors"), "-o", str(tmp_path / "x.onnx"), "--no-progress"])
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("vitserve export: error:") and "missing.safetensors" in err


def test_from_onnx_writes_the_same_file_modes_as_a_normal_export(tmp_path, tiny_model, capsys):
    """Both export paths save through model/onnx_io.py: external data when asked, readable by the .onnx's readers."""
    old_umask = os.umask(0o022)
    try:
        normal = export(tiny_model, tmp_path / "normal.onnx", "fp32", external_data_threshold_bytes=1024)
        copy = tmp_path / "copy.onnx"
        argv = ["export", "--from-onnx", str(normal.path), "-o", str(copy), "--external-data-threshold-mb", "0.001"]
        assert main(argv) == 0, capsys.readouterr().err
        inside = tmp_path / "inside.onnx"
        assert main(["export", "--from-onnx", str(normal.path), "-o", str(inside)]) == 0, capsys.readouterr().err
    finally:
        os.umask(old_umask)

    def mode(path: Path) -> int:
        return path.stat().st_mode & 0o777

    data = tmp_path / "copy.onnx.data"
    assert normal.external_data is not None and data.is_file()
    assert mode(copy) == mode(normal.path) == 0o644
    assert mode(data) == mode(normal.external_data) == 0o644  # onnx alone would create it 0600
    assert not (tmp_path / "inside.onnx.data").exists()  # under the default threshold the weights stay inside
    pixels = np.random.default_rng(0).standard_normal((2, 3, 224, 224), dtype=np.float32)
    expected = ort.InferenceSession(str(normal.path)).run(None, {"pixel_values": pixels})[0]
    for path in (copy, inside):
        np.testing.assert_array_equal(ort.InferenceSession(str(path)).run(None, {"pixel_values": pixels})[0], expected)
