"""timm checkpoints -> our parameter names (which are timm's), and timm's model arguments -> ViTConfig.

The state dict needs no renames, only unwrapping: training checkpoints nest it under
"state_dict" or "model", DDP prefixes "module.", torch.compile prefixes "_orig_mod.".
What a bare state dict cannot say (heads, pooling) comes from the model name and timm's
``create_model`` keyword arguments, which timm records in a hub config's "model_args".
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from model.config import ViTConfig, config_from_name
from model.convert.raw import (
    CheckpointError,
    RawCheckpoint,
    StateDict,
    read_json,
    read_state_dict_file,
)
from service.core.metadata import IMAGENET_MEAN, IMAGENET_STD, INTERPOLATIONS, Preprocessing

# What `timm:<name>` downloads from the hub repo timm/<name>.
HUB_FILES = {"required": ("config.json",), "weights": ("model.safetensors", "pytorch_model.bin")}

# timm's default when a pretrained_cfg gives no crop_pct (timm.data.DEFAULT_CROP_PCT).
DEFAULT_CROP_PCT = 0.875

# create_model arguments that map one-to-one onto a ViTConfig field.
_FIELD_ARGS = {
    "patch_size": "patch_size",
    "in_chans": "in_chans",
    "num_classes": "num_classes",
    "embed_dim": "embed_dim",
    "depth": "depth",
    "num_heads": "num_heads",
    "qkv_bias": "qkv_bias",
    "class_token": "class_token",
}
# Arguments that do not change the eval-mode forward pass at the checkpoint's own image size.
_IGNORED_ARGS = frozenset(
    {
        "drop_rate",
        "pos_drop_rate",
        "patch_drop_rate",
        "proj_drop_rate",
        "attn_drop_rate",
        "drop_path_rate",
        "weight_init",
        "fix_init",
        "dynamic_img_size",
        "dynamic_img_pad",
        "strict_img_size",
        "output_fmt",
    }
)
# Arguments we accept only at timm's default value, because our model has no such feature.
_DEFAULT_ONLY_ARGS = {
    "no_embed_class": False,
    "reg_tokens": 0,
    "init_values": None,
    "pre_norm": False,
    "qk_norm": False,
    "final_norm": True,
    "proj_bias": True,
    "pos_embed": "learn",
    "act_layer": None,
    "norm_layer": None,
    "embed_norm_layer": None,
    "mlp_layer": None,
    "block_fn": None,
    "embed_layer": None,
    "scale_attn_norm": False,
    "scale_mlp_norm": False,
    "class_token_init": None,
    "use_fc_norm": None,
}


def config_from_timm(model_name: str, model_args: Mapping[str, Any]) -> ViTConfig:
    """ViTConfig of ``timm.create_model(model_name, **model_args)``; CheckpointError for what we cannot build."""
    try:
        config = config_from_name(model_name)
    except KeyError as exc:
        raise CheckpointError(f"unsupported architecture {model_name!r}: {exc.args[0]}") from exc
    fields: dict[str, Any] = {}
    unsupported = []
    for arg, value in model_args.items():
        if arg in _FIELD_ARGS:
            fields[_FIELD_ARGS[arg]] = value
        elif arg == "img_size":
            size = value if isinstance(value, int) else tuple(value)
            if not isinstance(size, int) and (len(size) != 2 or size[0] != size[1]):
                raise CheckpointError(f"{model_name}: only square inputs are supported, got img_size={value}")
            fields["image_size"] = size if isinstance(size, int) else size[0]
        elif arg == "mlp_ratio":
            fields["mlp_ratio"] = value
        elif arg == "global_pool":
            if value not in ("token", "avg"):
                raise CheckpointError(f"{model_name}: global_pool={value!r} is not supported (only 'token' and 'avg')")
            fields["pool"] = value
        elif arg == "fc_norm":
            fields["fc_norm"] = value  # None = timm's default, resolved below
        elif arg in _IGNORED_ARGS:
            continue
        elif arg in _DEFAULT_ONLY_ARGS:
            if value != _DEFAULT_ONLY_ARGS[arg] and not (arg == "act_layer" and value in ("gelu", "GELU")):
                unsupported.append(f"{arg}={value!r}")
        else:
            unsupported.append(f"{arg}={value!r}")
    if unsupported:
        raise CheckpointError(f"{model_name}: unsupported timm model arguments: {', '.join(sorted(unsupported))}")
    embed_dim = fields.get("embed_dim", config.embed_dim)
    mlp_ratio = fields.pop("mlp_ratio", None)
    if mlp_ratio is not None:
        fields["mlp_dim"] = int(embed_dim * mlp_ratio)
    elif "embed_dim" in fields:
        # timm keeps mlp_ratio (4 for every ViT here) when only the width changes.
        fields["mlp_dim"] = int(embed_dim * config.mlp_dim / config.embed_dim)
    pool = fields.get("pool", config.pool)
    if fields.get("fc_norm") is None:
        fields["fc_norm"] = pool == "avg"  # timm: fc_norm=None means "after pooling iff average pooling"
    try:
        return config.replace(**fields)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{model_name} with {dict(model_args)}: {exc}") from exc


def unwrap_state_dict(data: Mapping[str, Any], *, where: str) -> StateDict:
    """The flat name -> tensor dict inside a training checkpoint, with wrapper prefixes removed."""
    for wrapper in ("state_dict", "model"):
        if isinstance(data.get(wrapper), Mapping):
            data = data[wrapper]
            break
    out: StateDict = {}
    for key, value in data.items():
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(f"{where}: entry {key!r} is a {type(value).__name__}, not a tensor")
        for prefix in ("module.", "_orig_mod."):
            if key.startswith(prefix):
                key = key[len(prefix) :]
        out[key] = value
    return out


def infer_from_weights(
    state_dict: Mapping[str, torch.Tensor], config: ViTConfig, model_args: Mapping[str, Any]
) -> ViTConfig:
    """Fill in what the weights state unambiguously and the caller did not: K, [class] token, fc_norm.

    A timm model without a [class] token or with an fc_norm uses average pooling, so a bare state
    dict of one loads with just its model name.
    """
    fields: dict[str, Any] = {}
    if "num_classes" not in model_args:
        head = state_dict.get("head.weight")
        fields["num_classes"] = int(head.shape[0]) if head is not None and head.ndim == 2 else 0
    if "class_token" not in model_args and "cls_token" not in state_dict and "pos_embed" in state_dict:
        fields["class_token"] = False
    has_fc_norm = "fc_norm.weight" in state_dict
    if "fc_norm" not in model_args and "global_pool" not in model_args:
        fields["fc_norm"] = has_fc_norm
    if "global_pool" not in model_args and (has_fc_norm or fields.get("class_token") is False):
        fields["pool"] = "avg"
    try:
        return config.replace(**fields)
    except ValueError as exc:
        raise CheckpointError(f"weights do not fit {config.name}: {exc}") from exc


def read_state_dict(data: Mapping[str, Any], config: ViTConfig, *, where: str, model_args=None) -> RawCheckpoint:
    """A timm state dict (possibly wrapped) plus the config named for it -> RawCheckpoint."""
    state_dict = unwrap_state_dict(data, where=where)
    config = infer_from_weights(state_dict, config, model_args or {})
    return RawCheckpoint(state_dict=state_dict, config=config, origin=where)


def preprocessing_from_pretrained_cfg(pretrained_cfg: Mapping[str, Any], image_size: int) -> Preprocessing:
    """timm's eval transform as its pretrained_cfg states it (crop_pct, interpolation, mean, std, crop_mode)."""
    crop_pct = float(pretrained_cfg.get("crop_pct") or DEFAULT_CROP_PCT)
    interpolation = pretrained_cfg.get("interpolation") or "bicubic"
    if interpolation not in INTERPOLATIONS:
        interpolation = "bicubic"  # timm's "random" etc. are training-time choices
    mean = tuple(pretrained_cfg.get("mean") or IMAGENET_MEAN)
    std = tuple(pretrained_cfg.get("std") or IMAGENET_STD)
    if pretrained_cfg.get("crop_mode") == "squash":
        # Resize both sides to size / crop_pct, then center-crop the square.
        return Preprocessing(image_size, math.floor(image_size / crop_pct), "squash", interpolation, mean, std)
    return Preprocessing.timm_eval(image_size, crop_pct, interpolation, mean, std)


def read_hub_dir(directory: Path, source: str, *, model_args: Mapping[str, Any] | None = None) -> RawCheckpoint:
    """A timm hub-style directory: config.json ("architecture", "model_args", ...) + model.safetensors."""
    config_json = read_json(directory / "config.json")
    architecture = config_json.get("architecture")
    if not isinstance(architecture, str):
        raise CheckpointError(f"{directory / 'config.json'} lacks 'architecture'")
    args = dict(config_json.get("model_args") or {})
    if "global_pool" in config_json and "global_pool" not in args:
        args["global_pool"] = config_json["global_pool"]
    if "num_classes" in config_json and "num_classes" not in args:
        args["num_classes"] = config_json["num_classes"]
    args.update(model_args or {})
    config = config_from_timm(architecture, args)

    weights = next((directory / n for n in HUB_FILES["weights"] if (directory / n).is_file()), None)
    if weights is None:
        raise CheckpointError(f"{directory} has none of {', '.join(HUB_FILES['weights'])}")
    raw = read_state_dict(read_state_dict_file(weights), config, where=str(weights), model_args=args)

    pretrained_cfg = config_json.get("pretrained_cfg") or {}
    label_names = config_json.get("label_names", pretrained_cfg.get("label_names"))
    if isinstance(label_names, Mapping):  # {index: name}, timm allows gaps
        label_names = [label_names[k] for k in sorted(label_names, key=int)]
    raw.labels = tuple(str(n) for n in label_names) if label_names else None
    raw.preprocessing_at = lambda image_size: preprocessing_from_pretrained_cfg(pretrained_cfg, image_size)
    raw.origin = source
    return raw
