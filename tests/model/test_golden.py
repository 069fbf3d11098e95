"""`vitserve export --golden`: golden images in the metadata, and the server's check against them."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from PIL import Image

from model.golden import GoldenError, add_golden_images
from service.core.metadata import PREFIX
from service.runtime.engine import Engine
from service.runtime.preprocess import load_pixels
from service.serving.golden import GoldenCheckFailed, check_golden

REPO = Path(__file__).resolve().parents[2]
DIGITS = REPO / "models" / "digits" / "model.onnx"


@pytest.fixture
def photo_files(tmp_path, photo_arrays) -> list[Path]:
    paths = []
    for name in ("coffee", "rocket"):
        path = tmp_path / f"{name}.png"
        Image.fromarray(photo_arrays[name]).save(path)
        paths.append(path)
    return paths


def test_golden_images_are_stored_with_the_files_own_top1_and_pass_the_servers_check(tmp_path, photo_files):
    model_path = tmp_path / "model.onnx"
    shutil.copy(DIGITS, model_path)
    entries = add_golden_images(model_path, photo_files)
    props = {p.key: p.value for p in onnx.load(str(model_path)).metadata_props}
    assert json.loads(props[PREFIX + "golden"]) == entries and [e["name"] for e in entries] == [
        "coffee.png",
        "rocket.png",
    ]

    engine = Engine(model_path, providers=["cpu"])
    assert "golden" in engine.metadata.extra

    def classify(data: bytes):
        pixels = load_pixels(data, engine.metadata.preprocessing, max_pixels=10**8)
        return asyncio.sleep(0, engine.run(pixels[None])[0])

    report = asyncio.run(check_golden(engine.metadata, classify))
    assert len(report) == 2

    def wrong(data: bytes):  # a model that answers another class than the one recorded
        logits = np.zeros(engine.metadata.num_classes, np.float32)
        logits[(entries[0]["top1"] + 1) % engine.metadata.num_classes] = 1.0
        return asyncio.sleep(0, logits)

    with pytest.raises(GoldenCheckFailed, match="golden image coffee.png: top-1 is class"):
        asyncio.run(check_golden(engine.metadata, wrong))


def test_golden_errors_and_the_cli_flag(tmp_path, photo_files):
    model_path = tmp_path / "model.onnx"
    shutil.copy(DIGITS, model_path)
    not_an_image = tmp_path / "notes.png"
    not_an_image.write_text("hello")
    with pytest.raises(GoldenError, match="cannot be read as an image"):
        add_golden_images(model_path, [not_an_image])
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "service.cli",
            "export",
            "--from-onnx",
            str(DIGITS),
            "-o",
            str(tmp_path / "out.onnx"),
            "--golden",
            *map(str, photo_files),
            "--no-progress",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
    )
    assert done.returncode == 0, done.stderr
    assert "golden images: coffee.png -> class" in done.stdout
    props = {p.key for p in onnx.load(str(tmp_path / "out.onnx")).metadata_props}
    assert PREFIX + "golden" in props
