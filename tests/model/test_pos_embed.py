"""Position-embedding resampling against timm's resample_abs_pos_embed (the reference)."""

from __future__ import annotations

import pytest
import torch
from timm.layers import resample_abs_pos_embed

from model.pos_embed import resample_pos_embed


@pytest.mark.parametrize(
    ("old", "new", "prefix"),
    [(14, 24, 1), (14, 10, 1), (24, 14, 1), (7, 12, 0), (14, 14, 1)],
    ids=["224to384", "224to160-antialias", "384to224", "gap-no-prefix", "same"],
)
def test_matches_timm(old, new, prefix):
    pos_embed = torch.randn(1, prefix + old * old, 32, generator=torch.Generator().manual_seed(old * new))
    ours = resample_pos_embed(pos_embed, (new, new), num_prefix_tokens=prefix)
    theirs = resample_abs_pos_embed(pos_embed, [new, new], num_prefix_tokens=prefix)
    assert ours.shape == (1, prefix + new * new, 32)
    torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=0)
    torch.testing.assert_close(ours[:, :prefix], pos_embed[:, :prefix], atol=0, rtol=0)  # [class] untouched


def test_keeps_dtype_and_interpolates_in_fp32():
    pos_embed = torch.randn(1, 1 + 14 * 14, 16).to(torch.bfloat16)
    ours = resample_pos_embed(pos_embed, (20, 20))
    theirs = resample_abs_pos_embed(pos_embed, [20, 20])
    assert ours.dtype == torch.bfloat16
    torch.testing.assert_close(ours, theirs, atol=0, rtol=0)


def test_non_square_grid_needs_old_grid():
    pos_embed = torch.randn(1, 1 + 10 * 12, 8)
    with pytest.raises(ValueError, match="square"):
        resample_pos_embed(pos_embed, (14, 14))
    ours = resample_pos_embed(pos_embed, (14, 14), old_grid=(10, 12))
    torch.testing.assert_close(ours, resample_abs_pos_embed(pos_embed, [14, 14], old_size=[10, 12]))
