"""`vitserve serve` with no --model serves the bundled demo model (what `make run` starts)."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest
from live_server import free_port, wait_ready
from PIL import Image

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]


def test_default_settings_serve_the_bundled_digits_model(tmp_path):
    from sklearn.datasets import load_digits

    assert (REPO / "models" / "digits" / "model.onnx").is_file()
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("VITSERVE_")}  # defaults only
    env["VITSERVE_PORT"] = str(port)
    log_path = tmp_path / "serve.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "service.cli", "serve"], cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT
        )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_ready(base, process, log_path)  # within a minute, as `make run` promises
        digits = load_digits()
        correct = 0
        for image, target in zip(digits.images[:20], digits.target[:20], strict=True):
            ink = (255 - image / 16 * 255).astype(np.uint8)  # the model reads dark ink on white
            buf = io.BytesIO()
            Image.fromarray(ink).resize((32, 32), Image.Resampling.BICUBIC).convert("RGB").save(buf, "PNG")
            r = httpx.post(
                f"{base}/v1/classify?top_k=1", content=buf.getvalue(), headers={"Content-Type": "image/png"}, timeout=30
            )
            assert r.status_code == 200, r.text
            correct += r.json()["predictions"][0]["label"] == str(target)
        # A wiring check (some of these digits were in the training set); held-out accuracy
        # through model.onnx is tests/model/test_demo_model.py's job.
        assert correct >= 18, f"{correct}/20 digits right"
        assert f"on http://127.0.0.1:{port}" in log_path.read_text()
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            assert process.wait(timeout=30) == 0
        finally:
            if process.poll() is None:
                process.kill()
