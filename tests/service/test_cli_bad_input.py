"""Every `vitserve` command answers input that is not what it expects with one line on stderr and a
non-zero exit code, never a traceback: a text file named .onnx, a sidecar with unknown fields, a
missing file, a file where a folder belongs, a malformed flag.

Each case runs the real command line (``python -m service.cli``) in a subprocess, as a user would.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

pytestmark = pytest.mark.slow  # a subprocess per case; the model-side ones import torch

REPO = Path(__file__).resolve().parents[2]
DEMO_MODEL = REPO / "models" / "digits" / "model.onnx"
TINY = "random:vit_tiny_patch16_224"


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, str]:
    """name -> path of each kind of bad (and one good) input the cases combine."""
    root = tmp_path_factory.mktemp("bad-input")
    (root / "text.onnx").write_text("this is not an ONNX model\n")
    (root / "notes.txt").write_text("hello\n")
    shutil.copy(DEMO_MODEL, root / "with-sidecar.onnx")
    (root / "with-sidecar.onnx.json").write_text('{"image_size": 32, "bogus": 1}')
    images = root / "images"
    images.mkdir()
    Image.new("RGB", (40, 40), (200, 30, 30)).save(images / "red.png")
    for label in ("a", "b"):
        (root / "dataset" / label).mkdir(parents=True)
        Image.new("RGB", (40, 40), (10, 200, 10)).save(root / "dataset" / label / "0.png")
    paths = {
        "text_onnx": root / "text.onnx",
        "text_file": root / "notes.txt",
        "sidecar_onnx": root / "with-sidecar.onnx",
        "good_onnx": DEMO_MODEL,
        "images": images,
        "dataset": root / "dataset",
        "missing_onnx": root / "missing.onnx",
        "missing_pt": root / "missing.pt",
        "out_jsonl": root / "out" / "scores.jsonl",
        "out_onnx": root / "out" / "model.onnx",
        "out_dir": root / "out" / "checkpoint",
    }
    return {name: str(path) for name, path in paths.items()}


CASES = [
    # serve
    ("serve", ["--model", "{text_onnx}", "--port", "0"], "cannot create an ONNX Runtime session"),
    ("serve", ["--model", "{sidecar_onnx}", "--port", "0"], "unknown field(s) bogus"),
    ("serve", ["--model", "{missing_onnx}", "--port", "0"], "model file not found"),
    ("serve", ["--model-repository", "{text_file}", "--port", "0"], "is not a directory"),
    ("serve", ["--max-batch-size", "many"], "invalid int value: 'many'"),
    # score
    ("score", ["{images}", "-o", "{out_jsonl}", "--model", "{text_onnx}"], "cannot create an ONNX Runtime session"),
    ("score", ["{text_file}", "-o", "{out_jsonl}", "--model", "{good_onnx}"], "not a folder, a zip/tar archive"),
    ("score", ["{images}", "-o", "{out_jsonl}", "--model", "{sidecar_onnx}"], "unknown field(s) bogus"),
    # inspect (a sidecar with unknown fields used to crash it with KeyError: 'missing')
    ("inspect", ["{sidecar_onnx}"], "unknown field(s) bogus"),
    ("inspect", ["{text_onnx}"], "cannot read"),
    ("inspect", ["{missing_onnx}"], "model file not found"),
    # export, verify, finetune (model/commands)
    ("export", ["{text_onnx}", "-o", "{out_onnx}"], "cannot tell the format"),
    ("export", ["{missing_pt}", "-o", "{out_onnx}"], "checkpoint not found"),
    ("export", ["--from-onnx", "{text_onnx}", "-o", "{out_onnx}"], "not an ONNX model"),
    ("export", ["--from-onnx", "{sidecar_onnx}", "-o", "{out_onnx}"], "unknown field(s) bogus"),
    ("verify", ["{text_onnx}", "--against", TINY], "not an ONNX model"),
    ("finetune", [TINY, "{text_file}", "-o", "{out_dir}"], "expected 'path,label'"),
    ("finetune", [TINY, "{dataset}", "-o", "{text_file}", "--epochs", "1"], "is a file"),
]


def visible_lines(stderr: str) -> list[str]:
    """The lines a terminal would show: a progress bar redrawn with \\r and then cleared leaves nothing."""
    lines = (line.rsplit("\r", 1)[-1] for line in stderr.split("\n"))
    return [line for line in lines if line.strip()]


@pytest.mark.parametrize(("command", "args", "expected"), CASES, ids=[f"{c[0]}-{c[2][:24]}" for c in CASES])
def test_bad_input_is_one_line_and_a_nonzero_exit(files, command, args, expected):
    argv = [arg.format(**files) for arg in args]
    env = {**os.environ, "PYTHONPATH": str(REPO), "VITSERVE_API_KEY": ""}
    result = subprocess.run(
        [sys.executable, "-m", "service.cli", command, *argv],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    lines = visible_lines(result.stderr)
    assert result.returncode != 0, result.stdout + result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"vitserve {command}") and expected in lines[0], lines[0]
