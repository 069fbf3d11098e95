"""Helpers for the hybrid (R+ViT) tests: timm models with every weight random, their weights written in
the paper's .npz layout and in Hugging Face's ViTHybrid layout, by code independent of model/convert/.

transformers 5 no longer ships ViTHybrid, so its layout is written here from the rename table of
transformers' own converter (models/vit_hybrid/convert_vit_hybrid_timm_to_pytorch.py, 4.x).
"""

from __future__ import annotations

import json
import re
from functools import cache
from pathlib import Path

import numpy as np
import timm
import torch
from checkpoint_testlib import randomize, write_paper_npz
from safetensors.torch import save_file

# name -> create_model kwargs: two transformer blocks where the transformer is not the point.
SMALL = {
    "vit_tiny_r_s16_p8_224": dict(depth=2, num_classes=7),
    "vit_small_r26_s32_224": dict(depth=2, num_classes=5),
    "vit_base_r50_s16_224": dict(depth=1, num_classes=6),
}
HF_PREFIX = "vit.embeddings.patch_embeddings.backbone."


@cache
def timm_hybrid(name: str, **kwargs) -> torch.nn.Module:
    """A timm hybrid with random weights everywhere, GroupNorm scales and shifts included (not 1 and 0)."""
    model = randomize(timm.create_model(name, pretrained=False, **kwargs), seed=len(name))
    norms = [m for m in model.modules() if isinstance(m, torch.nn.GroupNorm)]
    assert norms and all(not torch.all(m.weight == 1) and not torch.all(m.bias == 0) for m in norms)
    return model


def write_hybrid_npz(model: torch.nn.Module, path: Path) -> Path:
    """The paper's hybrid release layout: the ViT paths plus conv_root, gn_root, block{s}/unit{b} (1-based)."""
    write_paper_npz(model, path)
    with np.load(path) as archive:
        out = dict(archive)
    sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    backbone = "patch_embed.backbone."
    stem = backbone + ("stem." if any(k.startswith(backbone + "stem.") for k in sd) else "")

    def hwio(w: np.ndarray) -> np.ndarray:
        return w.transpose(2, 3, 1, 0)  # OIHW -> HWIO

    out["conv_root/kernel"] = hwio(sd[stem + "conv.weight"])
    out["gn_root/scale"] = sd[stem + "norm.weight"].reshape(1, 1, 1, -1)  # as some releases store them
    out["gn_root/bias"] = sd[stem + "norm.bias"].reshape(1, 1, 1, -1)
    for key in sd:
        match = re.match(r"patch_embed\.backbone\.stages\.(\d+)\.blocks\.(\d+)\.(.+)\.(weight|bias)$", key)
        if match is None:
            continue
        s, b, module, kind = int(match.group(1)), int(match.group(2)), match.group(3), match.group(4)
        unit = f"block{s + 1}/unit{b + 1}/"
        name = {"downsample.conv": "conv_proj", "downsample.norm": "gn_proj"}.get(module, module.replace("norm", "gn"))
        if name.startswith("conv"):
            out[f"{unit}{name}/kernel"] = hwio(sd[key])
        else:
            out[f"{unit}{name}/{'scale' if kind == 'weight' else 'bias'}"] = sd[key]
    np.savez(path, **{k: np.ascontiguousarray(v, dtype=np.float32) for k, v in out.items()})
    return path


def timm_to_hf_name(key: str) -> str | None:
    """One timm hybrid key -> its ViTHybridForImageClassification name; None for the q/k/v split (done apart)."""
    top = {
        "cls_token": "vit.embeddings.cls_token",
        "pos_embed": "vit.embeddings.position_embeddings",
        "patch_embed.proj.weight": "vit.embeddings.patch_embeddings.projection.weight",
        "patch_embed.proj.bias": "vit.embeddings.patch_embeddings.projection.bias",
        "patch_embed.backbone.stem.conv.weight": HF_PREFIX + "bit.embedder.convolution.weight",
        "patch_embed.backbone.stem.norm.weight": HF_PREFIX + "bit.embedder.norm.weight",
        "patch_embed.backbone.stem.norm.bias": HF_PREFIX + "bit.embedder.norm.bias",
        "norm.weight": "vit.layernorm.weight",
        "norm.bias": "vit.layernorm.bias",
        "head.weight": "classifier.weight",
        "head.bias": "classifier.bias",
    }
    if key in top:
        return top[key]
    if match := re.match(r"patch_embed\.backbone\.stages\.(\d+)\.blocks\.(\d+)\.(.+)$", key):
        return f"{HF_PREFIX}bit.encoder.stages.{match.group(1)}.layers.{match.group(2)}.{match.group(3)}"
    match = re.match(r"blocks\.(\d+)\.(.+)\.(weight|bias)$", key)
    assert match, key
    block = {
        "norm1": "layernorm_before",
        "attn.proj": "attention.output.dense",
        "norm2": "layernorm_after",
        "mlp.fc1": "intermediate.dense",
        "mlp.fc2": "output.dense",
    }
    if match.group(2) == "attn.qkv":
        return None
    return f"vit.encoder.layer.{match.group(1)}.{block[match.group(2)]}.{match.group(3)}"


def to_hf_layout(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state_dict.items():
        name = timm_to_hf_name(key)
        if name is not None:
            out[name] = value.clone()
            continue
        block, kind = re.match(r"blocks\.(\d+)\.attn\.qkv\.(weight|bias)$", key).groups()
        for part, chunk in zip(("query", "key", "value"), value.chunk(3), strict=True):
            out[f"vit.encoder.layer.{block}.attention.attention.{part}.{kind}"] = chunk.clone()
    return out


def write_hf_hybrid_dir(model: torch.nn.Module, directory: Path, *, layer_norm_eps: float | None = None) -> Path:
    """A save_pretrained-style ViTHybridForImageClassification directory of a timm R50 hybrid's weights."""
    from transformers import BitConfig

    directory.mkdir(parents=True, exist_ok=True)
    layers = tuple(len(stage.blocks) for stage in model.patch_embed.backbone.stages)
    backbone = BitConfig(
        global_padding="same",
        layer_type="bottleneck",
        depths=layers,
        out_features=[f"stage{len(layers)}"],
        embedding_dynamic_padding=True,
    ).to_dict()
    num_classes = model.head.weight.shape[0]
    config = {
        "model_type": "vit-hybrid",
        "architectures": ["ViTHybridForImageClassification"],
        "backbone_config": backbone,
        "hidden_size": model.embed_dim,
        "num_hidden_layers": len(model.blocks),
        "num_attention_heads": model.blocks[0].attn.num_heads,
        "intermediate_size": model.blocks[0].mlp.fc1.out_features,
        "hidden_act": "gelu",
        "image_size": model.patch_embed.img_size[0],
        "patch_size": 1,
        "num_channels": 3,
        "qkv_bias": True,
        "id2label": {str(i): f"thing {i}" for i in range(num_classes)},
        "label2id": {f"thing {i}": i for i in range(num_classes)},
    }
    if layer_norm_eps is not None:
        config["layer_norm_eps"] = layer_norm_eps
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    save_file(to_hf_layout(model.state_dict()), str(directory / "model.safetensors"))
    return directory
