"""Helpers for tests/gpu: is a usable CUDA device here, and the models the GPU tests run.

A GPU test needs three things at once: an NVIDIA driver (libcuda), onnxruntime's CUDA provider,
and torch's CUDA (the tests read device memory and kernel names through torch). The driver is
looked for first with ctypes, so that on a machine without one nothing heavy is imported and
`pytest tests/gpu` collects and skips in a moment.
"""

from __future__ import annotations

import ctypes
import functools
import os
from pathlib import Path

import numpy as np

# bench/gpu.sh exports these once and points VITSERVE_GPU_MODELS at their folder.
MODELS_ENV = "VITSERVE_GPU_MODELS"
REPORT_ENV = "VITSERVE_GPU_REPORT_DIR"  # where tests leave what they saw (kernel names) for bench/gpu.sh
GPU_MODEL = "vit_base_patch16_224"
PHOTO_NAMES = ("astronaut", "coffee", "chelsea", "rocket", "camera", "cat")


def _driver_loads() -> bool:
    for name in ("libcuda.so.1", "libcuda.so"):
        try:
            ctypes.CDLL(name)
            return True
        except OSError:
            continue
    return False


@functools.cache
def cuda_unavailable_reason() -> str | None:
    """None when CUDA works for both onnxruntime and torch, else why not (the skip reason)."""
    if not _driver_loads():
        return "no NVIDIA driver (libcuda) on this machine"
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return f"onnxruntime {ort.__version__} has no CUDA provider (install onnxruntime-gpu)"
    import torch

    if not torch.cuda.is_available():
        return "torch sees no CUDA device"
    return None


def model_path(precision: str, tmp_dir: Path) -> Path:
    """ViT-B/16 random weights exported at ``precision``: bench/gpu.sh's file, else exported now."""
    folder = os.environ.get(MODELS_ENV)
    if folder:
        path = Path(folder) / f"vit_b16_{precision}.onnx"
        if path.is_file():
            return path
    from model.checkpoint import import_checkpoint
    from model.export import export_model

    loaded = import_checkpoint(f"random:{GPU_MODEL}")
    path = tmp_dir / f"vit_b16_{precision}.onnx"
    export_model(
        loaded.model,
        loaded.config,
        path,
        labels=loaded.labels,
        preprocessing=loaded.preprocessing,
        source=loaded.source,
        weights_sha256=loaded.weights_sha256,
        precision=precision,
    )
    return path


def photo_batch(preprocessing) -> np.ndarray:
    """(6, 3, S, S) float32: skimage.data photographs through the service's own pre-processing."""
    import skimage.data
    from PIL import Image

    from service.runtime.preprocess import preprocess

    def rgb(name: str) -> Image.Image:
        return Image.fromarray(getattr(skimage.data, name)()).convert("RGB")

    return np.stack([preprocess(rgb(name), preprocessing) for name in PHOTO_NAMES])


def report(topic: str, text: str) -> None:
    """Append ``text`` under ``topic`` to tests-report.txt in the report folder, when bench/gpu.sh gave one
    (one file: a device call brings back at most 8)."""
    folder = os.environ.get(REPORT_ENV)
    if folder:
        with open(Path(folder) / "tests-report.txt", "a") as f:
            f.write(f"## {topic}\n{text.rstrip()}\n\n")
