"""The paper's .npz release layout: written from a random timm model, read by timm's loader and by ours."""

from __future__ import annotations

import numpy as np
import pytest
import timm
import torch
from checkpoint_testlib import PARITY_ATOL, max_abs_diff, photo_batch, randomize, write_paper_npz

from model.checkpoint import CheckpointError, import_checkpoint


@pytest.fixture(scope="module")
def paper_npz(tmp_path_factory):
    ref = randomize(timm.create_model("vit_tiny_patch16_224", depth=2, num_classes=9), seed=3)
    return ref, write_paper_npz(ref, tmp_path_factory.mktemp("npz") / "ViT-Ti_16.npz")


def test_timm_and_we_read_the_same_npz(paper_npz, photo_arrays):
    ref, path = paper_npz
    x = photo_batch(photo_arrays, 224)
    # timm's own npz reader (_load_weights) vouches for the writer...
    by_timm = timm.create_model("vit_tiny_patch16_224", depth=2, num_classes=9).eval()
    timm.models.load_checkpoint(by_timm, str(path))
    ours = import_checkpoint(path, model_name="vit_tiny_patch16_224", model_args={"depth": 2})
    with torch.no_grad():
        expected = ref(x)
        assert max_abs_diff(by_timm(x), expected) <= PARITY_ATOL
        # ...and ours matches both.
        assert max_abs_diff(ours.model(x), expected) <= PARITY_ATOL
        assert max_abs_diff(ours.model(x), by_timm(x)) <= PARITY_ATOL
    assert ours.config.num_classes == 9


def test_old_opt_target_prefix(paper_npz, tmp_path, photo_arrays):
    ref, path = paper_npz
    with np.load(path) as archive:
        np.savez(tmp_path / "old.npz", **{f"opt/target/{k}": archive[k] for k in archive.files})
    ours = import_checkpoint(tmp_path / "old.npz", model_name="Ti/16", model_args={"depth": 2})
    x = photo_batch(photo_arrays, 224)
    with torch.no_grad():
        assert max_abs_diff(ours.model(x), ref(x)) <= PARITY_ATOL


def test_pre_logits_layer_is_named_not_dropped(paper_npz, tmp_path):
    """The 21k releases' representation layer has no place in this model: refuse, naming it."""
    _, path = paper_npz
    with np.load(path) as archive:
        arrays = dict(archive)
    arrays["pre_logits/kernel"] = np.zeros((192, 192), np.float32)
    np.savez(tmp_path / "with_pre_logits.npz", **arrays)
    with pytest.raises(CheckpointError, match="unexpected keys: pre_logits/kernel"):
        import_checkpoint(tmp_path / "with_pre_logits.npz", model_name="vit_tiny_patch16_224", model_args={"depth": 2})
