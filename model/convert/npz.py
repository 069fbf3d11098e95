"""The paper's released ``.npz`` checkpoints (Flax parameter paths) -> our parameter names.

The layout is the one timm's ``_load_weights`` reads (google-research/vision_transformer):

    embedding/kernel (P, P, C, D), embedding/bias     -> patch_embed.proj  (Conv2d weight (D, C, P, P))
    cls (1, 1, D)                                     -> cls_token
    Transformer/posembed_input/pos_embedding          -> pos_embed (1, N+1, D)
    Transformer/encoderblock_{i}/LayerNorm_0          -> blocks.i.norm1
        .../MultiHeadDotProductAttention_1/{query,key,value}/kernel (D, heads, head_dim) -> blocks.i.attn.qkv
        .../MultiHeadDotProductAttention_1/out/kernel (heads, head_dim, D)               -> blocks.i.attn.proj
        .../LayerNorm_2                               -> blocks.i.norm2
        .../MlpBlock_3/Dense_{0,1}                    -> blocks.i.mlp.fc{1,2}
    Transformer/encoder_norm                          -> norm
    head/kernel (D, K), head/bias                     -> head

Flax Dense kernels are (in, out); torch Linear weights are (out, in), hence the transposes.
LayerNorm "scale" is torch's "weight". Old releases nest everything under "opt/target/".
A released pre_logits layer (the 21k models' representation layer) has no place in this model.

The hybrids (R50+ViT-B/16, R26+ViT-S/32, R+Ti/16 releases) add their ResNetV2 backbone, told by
its one telltale path ``conv_root/kernel`` (model/hybrid.py has the architecture):

    conv_root/kernel (7, 7, 3, 64), gn_root/{scale,bias}  -> patch_embed.backbone.stem.{conv,norm}
                                                             (patch_embed.backbone.{conv,norm} with no stages)
    block{s+1}/unit{b+1}/conv{k}/kernel, gn{k}/...        -> ...stages.s.blocks.b.conv{k}, norm{k}   (1-based)
    block{s+1}/unit1/conv_proj/kernel, gn_proj/...        -> ...stages.s.blocks.0.downsample.{conv,norm}

GroupNorm scale and bias may be stored as (1, 1, 1, C); the patch projection ``embedding`` is then a
(P, P, C_feature, D) kernel over the feature map.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
import torch

from model.config import ViTConfig
from model.convert.raw import CheckpointError, RawCheckpoint, StateDict, read_npz_file

_PREFIXES = ("opt/target/", "params/")
_UNIT = re.compile(r"^block(\d+)/unit(\d+)/")
BACKBONE_TELLTALE = "conv_root/kernel"


def _tensor(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))


def convert(weights: Mapping[str, np.ndarray]) -> StateDict:
    """Pure conversion: Flax paths -> our names. Paths it does not know are kept as they are, so the
    strict key check names them."""
    for prefix in _PREFIXES:
        if f"{prefix}embedding/kernel" in weights:
            weights = {k[len(prefix) :]: v for k, v in weights.items() if k.startswith(prefix)}
            break
    w = dict(weights)
    out: StateDict = {}

    def take(path: str) -> np.ndarray | None:
        return w.pop(path, None)

    def put(name: str, array: np.ndarray | None, transform: Callable[[np.ndarray], np.ndarray] = lambda a: a) -> None:
        if array is not None:
            out[name] = _tensor(transform(array))

    if BACKBONE_TELLTALE in w:
        _convert_backbone(take, put, w)

    put("patch_embed.proj.weight", take("embedding/kernel"), lambda a: a.transpose(3, 2, 0, 1))  # HWIO -> OIHW
    put("patch_embed.proj.bias", take("embedding/bias"))
    put("cls_token", take("cls"))
    put("pos_embed", take("Transformer/posembed_input/pos_embedding"))
    put("norm.weight", take("Transformer/encoder_norm/scale"))
    put("norm.bias", take("Transformer/encoder_norm/bias"))
    put("head.weight", take("head/kernel"), lambda a: a.T)  # (D, K) -> (K, D)
    put("head.bias", take("head/bias"))

    i = 0
    while f"Transformer/encoderblock_{i}/LayerNorm_0/scale" in w:
        src, dst = f"Transformer/encoderblock_{i}/", f"blocks.{i}."
        mha = src + "MultiHeadDotProductAttention_1/"
        put(dst + "norm1.weight", take(src + "LayerNorm_0/scale"))
        put(dst + "norm1.bias", take(src + "LayerNorm_0/bias"))
        qkv = [take(f"{mha}{n}/kernel") for n in ("query", "key", "value")]
        qkv_bias = [take(f"{mha}{n}/bias") for n in ("query", "key", "value")]
        if all(k is not None for k in qkv):
            # each (D, heads, head_dim) -> (D, D) -> transposed to (out, in); stacked q, k, v -> (3D, D)
            out[dst + "attn.qkv.weight"] = torch.cat([_tensor(k.reshape(k.shape[0], -1).T) for k in qkv])
        if all(b is not None for b in qkv_bias):
            out[dst + "attn.qkv.bias"] = torch.cat([_tensor(b.reshape(-1)) for b in qkv_bias])  # (3D,)
        put(
            dst + "attn.proj.weight", take(mha + "out/kernel"), lambda a: a.reshape(-1, a.shape[-1]).T
        )  # (heads*hd, D) -> (D, D)
        put(dst + "attn.proj.bias", take(mha + "out/bias"))
        put(dst + "norm2.weight", take(src + "LayerNorm_2/scale"))
        put(dst + "norm2.bias", take(src + "LayerNorm_2/bias"))
        for r in range(2):
            put(f"{dst}mlp.fc{r + 1}.weight", take(f"{src}MlpBlock_3/Dense_{r}/kernel"), lambda a: a.T)
            put(f"{dst}mlp.fc{r + 1}.bias", take(f"{src}MlpBlock_3/Dense_{r}/bias"))
        i += 1

    for path, array in w.items():  # leftovers: unknown to this layout, reported by the strict check
        out[path] = _tensor(array)
    return out


def _hwio_to_oihw(kernel: np.ndarray) -> np.ndarray:
    return kernel.transpose(3, 2, 0, 1)


def _convert_backbone(
    take: Callable[[str], np.ndarray | None],
    put: Callable[..., None],
    weights: Mapping[str, np.ndarray],
) -> None:
    """The hybrid's ResNetV2: stem, then every block{s}/unit{b} present (a missing one is named by the check)."""
    units = sorted({(int(m.group(1)), int(m.group(2))) for k in weights if (m := _UNIT.match(k))})
    stem = "patch_embed.backbone." if not units else "patch_embed.backbone.stem."

    def flat(a: np.ndarray) -> np.ndarray:
        return a.reshape(-1)  # GroupNorm scale/bias, (1, 1, 1, C) in some releases

    put(stem + "conv.weight", take("conv_root/kernel"), _hwio_to_oihw)
    put(stem + "norm.weight", take("gn_root/scale"), flat)
    put(stem + "norm.bias", take("gn_root/bias"), flat)
    for s, b in units:
        src, dst = f"block{s}/unit{b}/", f"patch_embed.backbone.stages.{s - 1}.blocks.{b - 1}."
        for k in (1, 2, 3):
            put(f"{dst}conv{k}.weight", take(f"{src}conv{k}/kernel"), _hwio_to_oihw)
            put(f"{dst}norm{k}.weight", take(f"{src}gn{k}/scale"), flat)
            put(f"{dst}norm{k}.bias", take(f"{src}gn{k}/bias"), flat)
        put(dst + "downsample.conv.weight", take(src + "conv_proj/kernel"), _hwio_to_oihw)
        put(dst + "downsample.norm.weight", take(src + "gn_proj/scale"), flat)
        put(dst + "downsample.norm.bias", take(src + "gn_proj/bias"), flat)


def read_file(path: Path, config: ViTConfig) -> RawCheckpoint:
    """Read the paper-layout .npz at ``path`` for the architecture ``config`` (K taken from the head)."""
    weights = read_npz_file(path)
    if not any(f"{p}embedding/kernel" in weights for p in ("", *_PREFIXES)):
        raise CheckpointError(f"{path} is not a ViT .npz in the paper's layout: it has no 'embedding/kernel'")
    state_dict = convert(weights)
    head = state_dict.get("head.weight")
    config = config.replace(num_classes=int(head.shape[0]) if head is not None else 0)
    return RawCheckpoint(state_dict=state_dict, config=config, origin=str(path))
