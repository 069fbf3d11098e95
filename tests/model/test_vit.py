"""The model itself: the paper's Table 1 sizes and the fused attention against the explicit softmax oracle."""

from __future__ import annotations

import pytest
import torch
from checkpoint_testlib import photo_batch, randomize

from model.config import config_from_name
from model.vit import VisionTransformer


@pytest.mark.parametrize(("name", "millions"), [("B/16", 86), ("L/16", 307), ("H/14", 632)])
def test_table1_parameter_counts(name, millions):
    """Dosovitskiy et al. (2021) Table 1, at 224 px with a 1000-class head; built on meta, so instant."""
    with torch.device("meta"):
        model = VisionTransformer(config_from_name(name))
    count = sum(p.numel() for p in model.parameters())
    assert abs(count - millions * 1e6) <= 0.02 * millions * 1e6, f"{name}: {count / 1e6:.1f}M"


@pytest.mark.parametrize("name", ["Ti/16", "S/32@384"])
def test_fused_attention_matches_explicit_softmax(name, photo_arrays):
    config = config_from_name(name, depth=2, num_classes=10)
    model = randomize(VisionTransformer(config), seed=1)
    x = photo_batch(photo_arrays, config.image_size)
    with torch.no_grad():
        fused = model(x)
        model.set_explicit_attention(True)
        explicit = model(x)
        model.set_explicit_attention(False)
    torch.testing.assert_close(fused, explicit, atol=1e-4, rtol=1e-4)
    assert fused.abs().max() > 1e-2  # non-trivial logits, so the comparison means something
