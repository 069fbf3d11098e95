"""Helpers for the checkpoint tests: non-trivial random weights, real-photo inputs, the paper's .npz layout."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

PARITY_ATOL = 1e-4  # max abs logits difference the issue allows, fp32


@torch.no_grad()
def randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give every parameter random values, so parity tests something.

    timm zero-inits the head and biases and Hugging Face sets LayerNorm to 1/0: with those
    left alone, a swapped bias or scale would go unnoticed. Weights keep a 1/sqrt(fan_in) scale
    so activations stay O(1) through the blocks.
    """
    gen = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        noise = torch.randn(param.shape, generator=gen)
        if "norm" in name and name.endswith("weight"):
            param.copy_(1.0 + 0.2 * noise)  # LayerNorm scale around 1
        elif param.ndim == 1:
            param.copy_(0.2 * noise)  # biases
        elif any(tag in name for tag in ("cls_token", "pos_embed", "position_embeddings")):
            param.copy_(0.5 * noise)
        else:
            param.copy_(noise / param[0].numel() ** 0.5)
    return model.eval()


def photo_batch(
    photo_arrays: dict[str, np.ndarray], size: int, names=("astronaut", "coffee", "chelsea")
) -> torch.Tensor:
    """(B, 3, size, size) float32: real photos squashed to size and normalised with mean = std = 0.5."""
    batch = []
    for name in names:
        image = torch.from_numpy(photo_arrays[name]).permute(2, 0, 1).float().unsqueeze(0) / 255.0  # (1, 3, H, W)
        image = F.interpolate(image, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        batch.append((image - 0.5) / 0.5)
    return torch.cat(batch)


def max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.detach().float() - b.detach().float()).abs().max().item()


def write_paper_npz(timm_model: torch.nn.Module, path: Path) -> Path:
    """Write a timm ViT's weights as the paper's released .npz (google-research/vision_transformer Flax paths).

    Written independently of model/convert/npz.py: timm's own npz reader checks this writer.
    """
    sd = {k: v.detach().numpy() for k, v in timm_model.state_dict().items()}
    D = sd["cls_token"].shape[-1]
    heads = timm_model.blocks[0].attn.num_heads
    hd = D // heads
    out = {
        "embedding/kernel": sd["patch_embed.proj.weight"].transpose(2, 3, 1, 0),  # (D, C, P, P) -> (P, P, C, D)
        "embedding/bias": sd["patch_embed.proj.bias"],
        "cls": sd["cls_token"],
        "Transformer/posembed_input/pos_embedding": sd["pos_embed"],
        "Transformer/encoder_norm/scale": sd["norm.weight"],
        "Transformer/encoder_norm/bias": sd["norm.bias"],
        "head/kernel": sd["head.weight"].T,  # (K, D) -> (D, K)
        "head/bias": sd["head.bias"],
    }
    for i in range(len(timm_model.blocks)):
        b, p = f"blocks.{i}.", f"Transformer/encoderblock_{i}/"
        mha = p + "MultiHeadDotProductAttention_1/"
        out[p + "LayerNorm_0/scale"], out[p + "LayerNorm_0/bias"] = sd[b + "norm1.weight"], sd[b + "norm1.bias"]
        out[p + "LayerNorm_2/scale"], out[p + "LayerNorm_2/bias"] = sd[b + "norm2.weight"], sd[b + "norm2.bias"]
        for j, n in enumerate(("query", "key", "value")):
            w = sd[b + "attn.qkv.weight"][j * D : (j + 1) * D]  # (D_out, D_in)
            out[f"{mha}{n}/kernel"] = w.T.reshape(D, heads, hd)  # Flax DenseGeneral (in, heads, head_dim)
            out[f"{mha}{n}/bias"] = sd[b + "attn.qkv.bias"][j * D : (j + 1) * D].reshape(heads, hd)
        out[mha + "out/kernel"] = sd[b + "attn.proj.weight"].T.reshape(heads, hd, D)
        out[mha + "out/bias"] = sd[b + "attn.proj.bias"]
        for r in range(2):
            out[f"{p}MlpBlock_3/Dense_{r}/kernel"] = sd[f"{b}mlp.fc{r + 1}.weight"].T
            out[f"{p}MlpBlock_3/Dense_{r}/bias"] = sd[f"{b}mlp.fc{r + 1}.bias"]
    np.savez(path, **{k: np.ascontiguousarray(v, dtype=np.float32) for k, v in out.items()})
    return path
