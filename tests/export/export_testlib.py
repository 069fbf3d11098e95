"""Helpers shared by tests/export: a 3-block ViT-Ti/16 at 224, how these tests export it, and a CUDA session
whose profile says where each node ran.

The head is re-drawn with std 0.1 (not the paper's zero head) so that logits are spread a few
units apart and top-1 agreement means something; seeds are fixed, so every figure is reproducible.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from model.config import config_from_name
from model.export import export_model
from model.vit import VisionTransformer
from service.core.metadata import Preprocessing

DEPTH = 3
NUM_CLASSES = 10
LABELS = tuple(f"class_{i}" for i in range(NUM_CLASSES))
SHA = "0123456789abcdef" * 4
SOURCE = "tests:vit_tiny_depth3"


def make_model(seed: int = 0) -> VisionTransformer:
    config = config_from_name("vit_tiny_patch16_224", depth=DEPTH, num_classes=NUM_CLASSES)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = VisionTransformer(config)
        torch.nn.init.normal_(model.head.weight, std=0.1)
    return model.eval()


def export(model: VisionTransformer, path, precision: str, **kwargs):
    return export_model(
        model,
        model.config,
        path,
        labels=LABELS,
        preprocessing=Preprocessing.timm_eval(224),
        source=SOURCE,
        weights_sha256=SHA,
        precision=precision,
        **kwargs,
    )


HEAVY_OPS = frozenset(
    {
        "Attention",
        "MultiHeadAttention",
        "MatMul",
        "Gemm",
        "Conv",
        "LayerNormalization",
        "SkipLayerNormalization",
        "Gelu",
        "BiasGelu",
        "FastGelu",
        "Erf",
        "GroupNormalization",  # a hybrid's backbone
        "MaxPool",
    }
)


def cuda_session(path, profile_dir=None):
    import onnxruntime as ort

    if hasattr(ort, "preload_dlls"):
        ort.preload_dlls()  # the pip CUDA/cuDNN libraries must be loaded before the first session
    options = ort.SessionOptions()
    if profile_dir is not None:
        options.enable_profiling = True
        options.profile_file_prefix = str(profile_dir / "ort")
    return ort.InferenceSession(str(path), options, providers=["CUDAExecutionProvider", "CPUExecutionProvider"])


def providers_by_op(profile_path) -> dict[str, set[str]]:
    """op type -> execution providers that ran it, from an ONNX Runtime profile."""
    placed: dict[str, set[str]] = {}
    for event in json.loads(Path(profile_path).read_text()):
        args = event.get("args", {})
        if event.get("cat") == "Node" and "op_name" in args and "provider" in args:
            placed.setdefault(args["op_name"], set()).add(args["provider"])
    return placed
