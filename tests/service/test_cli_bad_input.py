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
    (root / "junk.zip").write_bytes(b"not a zip archive")
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
        "junk_zip": root / "junk.zip",
        "missing_onnx": root / "missing.onnx",
        "missing_dir": root / "missing",
        "missing_pt": root / "missing.pt",
        "out_jsonl": root / "out" / "scores.jsonl",
        "out_onnx": root / "out" / "model.onnx",
        "out_dir": root / "out" / "checkpoint",
    }
    return {name: str(path) for name, path in paths.items()}


# (command, its arguments, what the one error line says, the exit code: 2 = bad input; `inspect` answers
# a file it can read but that cannot be served as is with 1, after printing what it found).
CASES = [
    # serve
    ("serve", ["--model", "{text_onnx}", "--port", "0"], "cannot create an ONNX Runtime session", 2),
    ("serve", ["--model", "{sidecar_onnx}", "--port", "0"], "unknown field(s) bogus", 2),
    ("serve", ["--model", "{missing_onnx}", "--port", "0"], "model file not found", 2),
    ("serve", ["--model-repository", "{text_file}", "--port", "0"], "is not a directory", 2),
    ("serve", ["--max-batch-size", "many"], "--max-batch-size / VITSERVE_MAX_BATCH_SIZE: Input should be", 2),
    ("serve", ["--providers", "quantum"], "unknown provider(s) ['quantum']", 2),
    ("serve", ["--no-such-flag"], "unrecognized arguments: --no-such-flag", 2),
    # score
    ("score", ["{images}", "-o", "{out_jsonl}", "--model", "{text_onnx}"], "cannot create an ONNX Runtime session", 2),
    ("score", ["{junk_zip}", "-o", "{out_jsonl}", "--model", "{good_onnx}"], "not a folder, a zip/tar archive", 2),
    ("score", ["{missing_dir}", "-o", "{out_jsonl}", "--model", "{good_onnx}"], "no such file or folder", 2),
    ("score", ["{images}", "-o", "{out_jsonl}", "--model", "{sidecar_onnx}"], "unknown field(s) bogus", 2),
    ("score", ["{images}", "-o", "{out_jsonl}", "--batch-size", "zero"], "invalid int value: 'zero'", 2),
    ("score", ["{images}", "-o", "{out_jsonl}", "--image-size", "-3"], "image_size: expected a positive integer", 2),
    # inspect (a sidecar with unknown fields used to crash it with KeyError: 'missing')
    ("inspect", ["{sidecar_onnx}"], "unknown field(s) bogus", 1),
    ("inspect", ["{text_onnx}"], "cannot read", 2),
    ("inspect", ["{missing_onnx}"], "model file not found", 2),
    ("inspect", ["{good_onnx}", "--mean", "1,2"], "mean: expected 3 numbers", 2),
    # export, verify, finetune (model/commands)
    ("export", ["{text_onnx}", "-o", "{out_onnx}"], "cannot tell the format", 2),
    ("export", ["{missing_pt}", "-o", "{out_onnx}"], "checkpoint not found", 2),
    ("export", ["foo:bar", "-o", "{out_onnx}"], "unknown checkpoint scheme 'foo'", 2),
    ("export", ["random:no_such_vit", "-o", "{out_onnx}"], "unsupported architecture 'no_such_vit'", 2),
    ("export", [TINY, "--precision", "fp8", "-o", "{out_onnx}"], "invalid choice: 'fp8'", 2),
    ("export", ["--from-onnx", "{text_onnx}", "-o", "{out_onnx}"], "not an ONNX model", 2),
    ("export", ["--from-onnx", "{sidecar_onnx}", "-o", "{out_onnx}"], "unknown field(s) bogus", 2),
    ("verify", ["{text_onnx}", "--against", TINY], "not an ONNX model", 2),
    ("verify", ["{missing_onnx}", "--against", TINY], "no such file", 2),
    ("verify", ["{good_onnx}", "--against", "foo:bar"], "unknown checkpoint scheme 'foo'", 2),
    ("finetune", [TINY, "{text_file}", "-o", "{out_dir}"], "expected 'path,label'", 2),
    ("finetune", [TINY, "{missing_dir}", "-o", "{out_dir}"], "no such dataset", 2),
    ("finetune", [TINY, "{dataset}", "-o", "{text_file}", "--epochs", "1"], "is a file", 2),
    ("finetune", [TINY, "{dataset}", "-o", "{out_dir}", "--epochs", "many"], "invalid int value: 'many'", 2),
]


def visible_lines(stderr: str) -> list[str]:
    """The lines a terminal would show: a progress bar redrawn with \\r and then cleared leaves nothing."""
    lines = (line.rsplit("\r", 1)[-1] for line in stderr.split("\n"))
    return [line for line in lines if line.strip()]


def error_lines(stderr: str) -> list[str]:
    """The visible lines less argparse's usage block (``usage: ...`` and its indented continuation),
    which a flag error prints above its one error line."""
    lines = visible_lines(stderr)
    if lines and lines[0].startswith("usage: "):
        lines = lines[1:]
        while lines and lines[0].startswith(" "):
            lines = lines[1:]
    return lines


@pytest.mark.parametrize(("command", "args", "expected", "code"), CASES, ids=[f"{c[0]}-{c[2][:24]}" for c in CASES])
def test_bad_input_is_one_line_and_a_nonzero_exit(files, command, args, expected, code):
    argv = [arg.format(**files) for arg in args]
    # No API key (an empty one is refused); serving on loopback needs none.
    env = {k: v for k, v in os.environ.items() if k != "VITSERVE_API_KEY"} | {"PYTHONPATH": str(REPO)}
    result = subprocess.run(
        [sys.executable, "-m", "service.cli", command, *argv],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    lines = error_lines(result.stderr)
    assert result.returncode == code, result.stdout + result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"vitserve {command}") and expected in lines[0], lines[0]
