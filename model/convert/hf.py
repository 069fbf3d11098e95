"""Hugging Face ViT checkpoints (ViTForImageClassification / ViTModel) -> our parameter names and config.

Two generations of Hugging Face parameter names exist, both handled:

    transformers < 5 (and most hub files)        transformers >= 5                    ours
    vit.embeddings.cls_token                     (same)                               cls_token
    vit.embeddings.position_embeddings           (same)                               pos_embed
    vit.embeddings.patch_embeddings.projection   (same)                               patch_embed.proj
    vit.encoder.layer.{i}.layernorm_before       vit.layers.{i}.layernorm_before      blocks.i.norm1
    ...attention.attention.{query,key,value}     ...attention.{q,k,v}_proj            blocks.i.attn.qkv (stacked)
    ...attention.output.dense                    ...attention.o_proj                  blocks.i.attn.proj
    ...layernorm_after                           (same)                               blocks.i.norm2
    ...intermediate.dense / ...output.dense      ...mlp.fc1 / ...mlp.fc2              blocks.i.mlp.fc1 / fc2
    vit.layernorm                                (same)                               norm
    classifier                                   (same)                               head

The pooler (ViTModel's tanh layer) and the masked-image-modelling mask token are not used by
classification (Hugging Face's own ViTForImageClassification ignores them too) and are dropped.

ViTHybrid (``model_type: vit-hybrid``, transformers < 5; the paper's R50+ViT-B/16 as
google/vit-hybrid-base-bit-384) adds a BiT backbone under vit.embeddings.patch_embeddings.backbone.bit.:

    embedder.convolution / embedder.norm                 patch_embed.backbone.stem.conv / stem.norm
    encoder.stages.{s}.layers.{b}.{conv,norm}{k}         patch_embed.backbone.stages.s.blocks.b.{conv,norm}{k}
    encoder.stages.{s}.layers.0.downsample.{conv,norm}   patch_embed.backbone.stages.s.blocks.0.downsample...

Its config's ``layer_norm_eps`` (1e-12 by default, as for ViT) is kept as the checkpoint states it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from model.config import BACKBONE_STEM_WIDTH, BACKBONE_WIDTHS, HYBRIDS, SIZES, ViTConfig
from model.convert.raw import (
    CheckpointError,
    RawCheckpoint,
    StateDict,
    read_json,
    read_state_dict_file,
)
from service.core.metadata import INTERPOLATIONS, MetadataError, Preprocessing

# What `hf:<repo>` downloads.
HUB_FILES = {
    "required": ("config.json",),
    "optional": ("preprocessor_config.json",),
    "weights": ("model.safetensors", "pytorch_model.bin"),
}

# PIL.Image.Resampling values as ViTImageProcessor stores them in "resample".
_PIL_RESAMPLE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic"}
_EXACT_GELU = ("gelu", "gelu_python")
_DROPPED = re.compile(r"^(vit\.)?(pooler\.dense\.(weight|bias)|embeddings\.mask_token)$")

# Per-block renames (suffix after the block prefix), both generations.
_BLOCK_RENAMES = {
    "layernorm_before": "norm1",
    "layernorm_after": "norm2",
    "attention.output.dense": "attn.proj",
    "attention.o_proj": "attn.proj",
    "intermediate.dense": "mlp.fc1",
    "output.dense": "mlp.fc2",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
}
_QKV_NAMES = (
    ("attention.attention.query", "attention.attention.key", "attention.attention.value"),
    ("attention.q_proj", "attention.k_proj", "attention.v_proj"),
)
_TOP_RENAMES = {
    "embeddings.cls_token": "cls_token",
    "embeddings.position_embeddings": "pos_embed",
    "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
    "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
    "layernorm.weight": "norm.weight",
    "layernorm.bias": "norm.bias",
}
_BLOCK_KEY = re.compile(r"^(?:encoder\.layer|layers)\.(\d+)\.(.+)\.(weight|bias)$")

HYBRID_MODEL_TYPE = "vit-hybrid"
_CLASSIFIERS = ("ViTForImageClassification", "ViTHybridForImageClassification")
_HF_BACKBONE = "embeddings.patch_embeddings.backbone.bit."
_HF_BACKBONE_LAYER = re.compile(r"^encoder\.stages\.(\d+)\.layers\.(\d+)\.(.+)$")
# ViTHybridConfig's backbone when config.json names none, and BitConfig's defaults for what a
# backbone_config leaves out (transformers 4.x configuration_vit_hybrid.py / configuration_bit.py).
_DEFAULT_HYBRID_BACKBONE = {
    "global_padding": "same",
    "layer_type": "bottleneck",
    "depths": [3, 4, 9],
    "out_features": ["stage3"],
    "embedding_dynamic_padding": True,
}
_BIT_DEFAULTS = {
    "num_channels": 3,
    "embedding_size": 64,
    "hidden_sizes": [256, 512, 1024, 2048],
    "depths": [3, 4, 6, 3],
    "layer_type": "preactivation",
    "hidden_act": "relu",
    "global_padding": None,
    "num_groups": 32,
    "embedding_dynamic_padding": False,
    "output_stride": 32,
    "width_factor": 1,
}
# ViTHybridImageProcessor's defaults (BiT's): shortest side to the size, centre crop, bicubic, CLIP's mean/std.
_HYBRID_PROCESSOR_DEFAULTS = {
    "do_center_crop": True,
    "resample": 3,
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711],
}


def convert(hf_state_dict: Mapping[str, torch.Tensor]) -> StateDict:
    """Pure conversion of either generation's names to ours. Keys it does not know are kept
    unchanged, so the strict key check names them."""
    out: StateDict = {}
    pending_qkv: dict[tuple[int, str], dict[str, torch.Tensor]] = {}  # (block, weight|bias) -> {q|k|v: tensor}
    # A hybrid with no stages (the stem alone) takes timm's short names: patch_embed.backbone.{conv,norm}.
    stem = "stem." if any(_HF_BACKBONE + "encoder.stages." in key for key in hf_state_dict) else ""
    for key, value in hf_state_dict.items():
        if _DROPPED.match(key):
            continue
        if key.startswith("classifier."):
            out["head." + key[len("classifier.") :]] = value
            continue
        inner = key[len("vit.") :] if key.startswith("vit.") else key
        if inner.startswith(_HF_BACKBONE):
            out[_backbone_key(inner[len(_HF_BACKBONE) :], stem) or key] = value
            continue
        if inner in _TOP_RENAMES:
            out[_TOP_RENAMES[inner]] = value
            continue
        match = _BLOCK_KEY.match(inner)
        if match is None:
            out[key] = value
            continue
        block, module, kind = int(match.group(1)), match.group(2), match.group(3)
        qkv_part = next((names.index(module) for names in _QKV_NAMES if module in names), None)
        if qkv_part is not None:
            pending_qkv.setdefault((block, kind), {})["qkv"[qkv_part]] = value
        elif module in _BLOCK_RENAMES:
            out[f"blocks.{block}.{_BLOCK_RENAMES[module]}.{kind}"] = value
        else:
            out[key] = value
    for (block, kind), parts in pending_qkv.items():
        if set(parts) != {"q", "k", "v"}:
            absent = sorted(set("qkv") - set(parts))
            raise CheckpointError(f"block {block}: attention {kind} lacks the {', '.join(absent)} projection(s)")
        # q, k, v each (D, D) or (D,) -> stacked as timm's fused qkv (3D, D) or (3D,)
        out[f"blocks.{block}.attn.qkv.{kind}"] = torch.cat([parts["q"], parts["k"], parts["v"]])
    return out


def _backbone_key(name: str, stem: str) -> str | None:
    """A BiT backbone name (after ...backbone.bit.) -> ours; None for one this layout does not have."""
    if name.startswith("embedder.convolution."):
        return f"patch_embed.backbone.{stem}conv.{name.rsplit('.', 1)[1]}"
    if name.startswith("embedder.norm."):
        return f"patch_embed.backbone.{stem}norm.{name.rsplit('.', 1)[1]}"
    if match := _HF_BACKBONE_LAYER.match(name):
        return f"patch_embed.backbone.stages.{match.group(1)}.blocks.{match.group(2)}.{match.group(3)}"
    return None


def variant_name(
    width: int,
    depth: int,
    heads: int,
    mlp: int,
    patch: int,
    image_size: int,
    backbone_layers: tuple[int, ...] | None = None,
) -> str:
    """timm's name for a Table 1 size (google/vit-base-patch16-224 -> vit_base_patch16_224) or hybrid, else a
    descriptive one."""
    size = next((name for name, dims in SIZES.items() if dims == (width, depth, heads, mlp)), None)
    if backbone_layers is not None:
        hybrid = next((n for n, row in HYBRIDS.items() if row == (size, backbone_layers, patch)), None)
        if hybrid is not None:
            return f"{hybrid}_{image_size}"
        layers = "_".join(map(str, backbone_layers)) or "stem"
        return f"vit_d{width}_l{depth}_h{heads}_r{layers}_p{patch}_{image_size}"
    if size is not None:
        return f"vit_{size}_patch{patch}_{image_size}"
    return f"vit_d{width}_l{depth}_h{heads}_patch{patch}_{image_size}"


def backbone_layers_from_hf(config_json: Mapping[str, Any], *, where: str) -> tuple[int, ...]:
    """The BiT backbone_config of a ViTHybrid config as our backbone_layers; CheckpointError for one we do not build."""
    given = config_json.get("backbone_config")
    backbone = {**_BIT_DEFAULTS, **(given if isinstance(given, Mapping) else _DEFAULT_HYBRID_BACKBONE)}
    depths = tuple(int(d) for d in backbone["depths"])
    expected = {
        "layer_type": "bottleneck",
        "global_padding": "SAME",
        "embedding_dynamic_padding": True,
        "embedding_size": BACKBONE_STEM_WIDTH,
        "hidden_sizes": list(BACKBONE_WIDTHS[: len(depths)]),
        "num_groups": 32,
        "hidden_act": "relu",
        "output_stride": 32,
        "width_factor": 1,
        "out_features": [f"stage{len(depths)}"],
    }
    found = {
        **backbone,
        "global_padding": str(backbone["global_padding"]).upper(),
        "hidden_sizes": list(backbone["hidden_sizes"])[: len(depths)],
        "out_features": list(backbone.get("out_features") or [f"stage{len(depths)}"]),
    }
    wrong = [f"{k}={backbone.get(k)!r} (need {v!r})" for k, v in expected.items() if found.get(k) != v]
    if wrong:
        raise CheckpointError(
            f"{where}: a BiT backbone this importer does not build (the paper's hybrid is a ResNetV2 of "
            f"bottlenecks with SAME padding whose last stage feeds the patches): {', '.join(wrong)}"
        )
    return depths


def config_from_hf(config_json: Mapping[str, Any], *, where: str) -> ViTConfig:
    """ViTConfig of a Hugging Face ViT or ViTHybrid config.json (defaults are transformers' config defaults)."""
    model_type = config_json.get("model_type")
    if model_type not in ("vit", HYBRID_MODEL_TYPE):
        raise CheckpointError(
            f"{where}: model_type {model_type!r} is not supported (only 'vit', the paper's ViT, "
            f"and {HYBRID_MODEL_TYPE!r}, its hybrid)"
        )
    backbone_layers = backbone_layers_from_hf(config_json, where=where) if model_type == HYBRID_MODEL_TYPE else None
    default_patch = 16 if backbone_layers is None else 1
    act = config_json.get("hidden_act", "gelu")
    if act not in _EXACT_GELU:
        raise CheckpointError(f"{where}: hidden_act {act!r} is not supported (the ViT MLP uses exact GELU)")
    id2label = config_json.get("id2label") or {}
    num_classes = int(config_json.get("num_labels", len(id2label) if id2label else 2))
    architectures = config_json.get("architectures") or []
    if architectures and not set(_CLASSIFIERS) & set(architectures):
        num_classes = 0  # a bare ViTModel backbone has no classifier
    hidden = int(config_json.get("hidden_size", 768))
    patch = int(config_json.get("patch_size", default_patch))
    try:
        return ViTConfig(
            image_size=int(config_json.get("image_size", 224)),
            patch_size=patch,
            embed_dim=hidden,
            depth=int(config_json.get("num_hidden_layers", 12)),
            num_heads=int(config_json.get("num_attention_heads", 12)),
            mlp_dim=int(config_json.get("intermediate_size", 3072)),
            num_classes=num_classes,
            norm_eps=float(config_json.get("layer_norm_eps", 1e-12)),
            qkv_bias=bool(config_json.get("qkv_bias", True)),
            in_chans=int(config_json.get("num_channels", 3)),
            name=variant_name(
                hidden,
                int(config_json.get("num_hidden_layers", 12)),
                int(config_json.get("num_attention_heads", 12)),
                int(config_json.get("intermediate_size", 3072)),
                patch,
                int(config_json.get("image_size", 224)),
                backbone_layers,
            ),
            backbone_layers=backbone_layers,
        )
    except ValueError as exc:
        raise CheckpointError(f"{where}: {exc}") from exc


def labels_from_hf(config_json: Mapping[str, Any], num_classes: int) -> tuple[str, ...] | None:
    """id2label as a tuple, or None when it is missing or only transformers' generic LABEL_i names."""
    id2label = config_json.get("id2label") or {}
    if len(id2label) != num_classes or num_classes == 0:
        return None
    names = tuple(str(id2label[k]) for k in sorted(id2label, key=int))
    if all(name == f"LABEL_{i}" for i, name in enumerate(names)):
        return None
    return names


def preprocessing_from_hf(
    processor: Mapping[str, Any] | None, image_size: int, *, hybrid: bool = False, where: str = ""
) -> Preprocessing:
    """ViTImageProcessor's settings (resize both sides, no crop), or ViTHybridImageProcessor's (shortest side,
    centre crop); the processor's defaults when there is no file."""
    if hybrid:
        size_defaults = {"size": {"shortest_edge": image_size}, "crop_size": {"height": image_size}}
        processor = {**_HYBRID_PROCESSOR_DEFAULTS, **size_defaults, **(processor or {})}
    if not processor:
        return Preprocessing.hf_vit(image_size)
    interpolation = _PIL_RESAMPLE.get(processor.get("resample", 2), "bilinear")
    assert interpolation in INTERPOLATIONS
    mean = tuple(processor.get("image_mean") or (0.5, 0.5, 0.5)) if processor.get("do_normalize", True) else (0.0,) * 3
    std = tuple(processor.get("image_std") or (0.5, 0.5, 0.5)) if processor.get("do_normalize", True) else (1.0,) * 3
    size = processor.get("size") or {}
    if processor.get("do_center_crop") and isinstance(size, Mapping) and "shortest_edge" in size:
        crop = processor.get("crop_size") or {}
        try:
            return Preprocessing(
                int(crop.get("height", image_size)), int(size["shortest_edge"]), "shortest", interpolation, mean, std
            )
        except (TypeError, ValueError, MetadataError) as exc:
            raise CheckpointError(f"{where}: bad size/crop_size in the image processor: {exc}") from exc
    return Preprocessing.hf_vit(image_size, interpolation, mean, std)


def read_dir(directory: Path, source: str) -> RawCheckpoint:
    """A save_pretrained directory: config.json, model.safetensors or pytorch_model.bin, and an optional
    preprocessor_config.json."""
    config_path = directory / "config.json"
    config_json = read_json(config_path)
    config = config_from_hf(config_json, where=str(config_path))
    weights = next((directory / n for n in HUB_FILES["weights"] if (directory / n).is_file()), None)
    if weights is None:
        raise CheckpointError(f"{directory} has none of {', '.join(HUB_FILES['weights'])}")
    processor_path = directory / "preprocessor_config.json"
    processor = read_json(processor_path) if processor_path.is_file() else None
    return RawCheckpoint(
        state_dict=convert(read_state_dict_file(weights)),
        config=config,
        labels=labels_from_hf(config_json, config.num_classes),
        preprocessing=preprocessing_from_hf(
            processor, config.image_size, hybrid=config.is_hybrid, where=str(processor_path)
        ),
        origin=source,
    )
