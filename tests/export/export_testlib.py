"""Helpers shared by tests/export: a 3-block ViT-Ti/16 at 224 and how these tests export it.

The head is re-drawn with std 0.1 (not the paper's zero head) so that logits are spread a few
units apart and top-1 agreement means something; seeds are fixed, so every figure is reproducible.
"""

from __future__ import annotations

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
