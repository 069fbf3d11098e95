"""Resample learned position embeddings to another grid: the paper's recipe for fine-tuning at a new resolution.

"We perform 2D interpolation of the pre-trained position embeddings, according to their location
in the original image" (Dosovitskiy et al., 2021, Sec. 3.2). Done exactly as timm's
``resample_abs_pos_embed``: prefix tokens are split off and kept, the patch part is reshaped to
its 2-D grid and interpolated in fp32 (bicubic, antialiased), then cast back.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def resample_pos_embed(
    pos_embed: torch.Tensor,
    new_grid: tuple[int, int],
    *,
    old_grid: tuple[int, int] | None = None,
    num_prefix_tokens: int = 1,
    interpolation: str = "bicubic",
    antialias: bool = True,
) -> torch.Tensor:
    """(1, prefix + H*W, D) -> (1, prefix + H'*W', D).

    Args:
        pos_embed: the embeddings, prefix ([class]) tokens first.
        new_grid: (H', W') patches of the target resolution.
        old_grid: (H, W) of the source; inferred as a square when None.
        num_prefix_tokens: leading tokens that have no grid position (1 for the [class] token).
        interpolation: torch interpolate mode.
        antialias: antialias when downsampling (timm's default).
    """
    if pos_embed.ndim != 3 or pos_embed.shape[0] != 1:
        raise ValueError(f"pos_embed must be (1, tokens, D), got {tuple(pos_embed.shape)}")
    num_grid_tokens = pos_embed.shape[1] - num_prefix_tokens
    if old_grid is None:
        side = math.isqrt(num_grid_tokens)
        if side * side != num_grid_tokens:
            raise ValueError(f"{num_grid_tokens} position tokens do not form a square grid; pass old_grid")
        old_grid = (side, side)
    if old_grid[0] * old_grid[1] != num_grid_tokens:
        raise ValueError(f"old_grid {old_grid} does not hold {num_grid_tokens} position tokens")
    if tuple(new_grid) == tuple(old_grid):
        return pos_embed

    prefix, grid = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    dim = grid.shape[-1]
    grid = grid.float().reshape(1, old_grid[0], old_grid[1], dim).permute(0, 3, 1, 2)  # (1, D, H, W)
    grid = F.interpolate(grid, size=tuple(new_grid), mode=interpolation, antialias=antialias)  # (1, D, H', W')
    grid = grid.permute(0, 2, 3, 1).reshape(1, -1, dim).to(pos_embed.dtype)  # (1, H'*W', D)
    return torch.cat([prefix, grid], dim=1)
