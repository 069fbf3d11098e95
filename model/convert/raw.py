"""What every checkpoint format shares: the error, the raw result, the file readers, the strict check.

The bottom of model/'s checkpoint code. Each format converter (model/convert/timm.py, hf.py,
npz.py and model/native.py) imports only this module; the loader on top
(model/checkpoint.py) dispatches to them and assembles their RawCheckpoint into a model.
"""

from __future__ import annotations

import json
import re
import zipfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file

from model.config import ViTConfig
from model.vit import VisionTransformer
from service.core.metadata import MetadataError, Preprocessing

StateDict = dict[str, torch.Tensor]

STATE_DICT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")
# How many key names an error message lists before it says "... and N more".
_MAX_KEYS_IN_MESSAGE = 12
# Where a hybrid's ResNet weights live (model/hybrid.py, timm's names).
BACKBONE_PREFIX = "patch_embed.backbone."
_BACKBONE_BLOCK = re.compile(r"^patch_embed\.backbone\.stages\.(\d+)\.blocks\.(\d+)\.")


class CheckpointError(ValueError):
    """A checkpoint cannot be imported; the message names the file, key or shape at fault."""


@dataclass
class RawCheckpoint:
    """What a format reader hands back: weights already in our names, plus what the source says about them.

    Args:
        state_dict: tensors under our (timm's) parameter names, not yet checked.
        config: the architecture the weights were trained with (image size included).
        labels: class names from the source, or None when it carries none.
        preprocessing: the source's eval transform, or None for the default.
        preprocessing_at: the source's eval transform for any input size, when the source states it
            as a rule (timm's crop_pct) rather than as pixels; preferred over ``preprocessing``.
        origin: where the weights first came from (a native checkpoint records it); empty means "the source".
        extra: free-form provenance recorded by ``save_native`` (empty for other formats).
    """

    state_dict: StateDict
    config: ViTConfig
    labels: tuple[str, ...] | None = None
    preprocessing: Preprocessing | None = None
    preprocessing_at: Callable[[int], Preprocessing] | None = None
    origin: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


def name_list(keys: Sequence[str]) -> str:
    """Names for an error message: the first dozen, then how many more."""
    shown = ", ".join(keys[:_MAX_KEYS_IN_MESSAGE])
    more = len(keys) - _MAX_KEYS_IN_MESSAGE
    return shown + (f", ... and {more} more" if more > 0 else "")


def describe(config: ViTConfig) -> str:
    text = (
        f"D={config.embed_dim}, L={config.depth}, heads={config.num_heads}, mlp={config.mlp_dim}, "
        f"P={config.patch_size}, {config.image_size}px, K={config.num_classes}, pool={config.pool}"
    )
    return text + (f", backbone {config.backbone_name}" if config.is_hybrid else "")


def check_backbone(state_dict: Mapping[str, torch.Tensor], config: ViTConfig, *, where: str) -> None:
    """Name what is wrong with a hybrid's backbone (a plain/hybrid mix-up, a missing stage, a wrong
    stage or block count) before the key-by-key check would list hundreds of keys."""
    has_backbone = any(k.startswith(BACKBONE_PREFIX) for k in state_dict)  # the hybrid's telltale
    if not config.is_hybrid:
        if has_backbone:
            raise CheckpointError(
                f"{where} holds a hybrid's weights ({BACKBONE_PREFIX}*) but {config.name} is a plain ViT; "
                "name the hybrid architecture, e.g. vit_base_r50_s16_224"
            )
        return
    expected = config.backbone_layers or ()
    if not has_backbone:
        raise CheckpointError(
            f"{where} has no {BACKBONE_PREFIX}* weights, but {config.name} is a hybrid with a "
            f"{config.backbone_name} backbone (a plain ViT checkpoint?)"
        )
    blocks: dict[int, set[int]] = {}
    for key in state_dict:
        if match := _BACKBONE_BLOCK.match(key):
            blocks.setdefault(int(match.group(1)), set()).add(int(match.group(2)))
    stages = sorted(blocks)
    absent = [s for s in range(max(stages, default=-1) + 1) if s not in blocks]
    if absent:
        raise CheckpointError(
            f"{where}: backbone stage(s) {', '.join(map(str, absent))} missing "
            f"(found stages {', '.join(map(str, stages))}; {config.name} has {len(expected)}: blocks {expected})"
        )
    if len(stages) != len(expected):
        raise CheckpointError(
            f"{where}: the backbone has {len(stages)} stage(s) with blocks "
            f"{tuple(len(blocks[s]) for s in stages)}, {config.name} has {len(expected)}: blocks {expected}"
        )
    for s in stages:
        if blocks[s] != set(range(expected[s])):
            raise CheckpointError(
                f"{where}: backbone stage {s} has blocks {sorted(blocks[s])}, {config.name} has {expected[s]} "
                f"(0..{expected[s] - 1})"
            )


def check_state_dict(state_dict: Mapping[str, torch.Tensor], config: ViTConfig, *, where: str) -> None:
    """Raise CheckpointError unless ``state_dict`` has exactly the keys and shapes ``config`` needs.

    The expected shapes come from a model built on the meta device, so the check is instant.
    """
    not_tensors = [k for k, v in state_dict.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise CheckpointError(f"{where}: entries that are not tensors: {name_list(not_tensors)}")
    check_backbone(state_dict, config, where=where)
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in VisionTransformer(config).state_dict().items()}
    # Listed in the model's own order (embeddings, blocks, head), which reads like the architecture.
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    mismatched = [
        f"{k} (expected {expected[k]}, got {tuple(state_dict[k].shape)})"
        for k in expected
        if k in state_dict and tuple(state_dict[k].shape) != expected[k]
    ]
    problems = []
    if missing:
        problems.append(f"missing keys: {name_list(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {name_list(unexpected)}")
    if mismatched:
        problems.append(f"shape mismatch: {name_list(mismatched)}")
    if problems:
        raise CheckpointError(f"{where} does not fit {config.name} ({describe(config)}): " + "; ".join(problems))


def read_state_dict_file(path: Path) -> StateDict:
    """Read a .safetensors or torch pickle (.pth/.pt/.bin) file into a flat dict of tensors."""
    if not path.is_file():
        raise CheckpointError(f"checkpoint file not found: {path}")
    try:
        if path.suffix == ".safetensors":
            data = load_file(str(path), device="cpu")
        else:
            # weights_only: a checkpoint is data, never code to run.
            data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # each reader fails its own way on a truncated file; all mean "unreadable"
        raise CheckpointError(f"cannot read checkpoint file {path} (truncated or not a checkpoint?): {exc}") from exc
    if not isinstance(data, Mapping):
        raise CheckpointError(f"{path} holds a {type(data).__name__}, not a state dict")
    return dict(data)


def read_npz_file(path: Path) -> dict[str, np.ndarray]:
    """Read every array of an .npz eagerly, so a truncated member fails here and not half-way through loading."""
    if not path.is_file():
        raise CheckpointError(f"checkpoint file not found: {path}")
    try:
        with np.load(path, allow_pickle=False) as archive:
            return {name: archive[name] for name in archive.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise CheckpointError(f"cannot read .npz checkpoint {path} (truncated or not an .npz?): {exc}") from exc


def read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise CheckpointError(f"file not found: {path}") from exc
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"cannot parse {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} must hold a JSON object")
    return data


def preprocessing_from_dict(data: Mapping[str, Any], *, where: str) -> Preprocessing:
    try:
        return Preprocessing(**{**data, "mean": tuple(data["mean"]), "std": tuple(data["std"])})
    except (KeyError, TypeError, MetadataError) as exc:
        raise CheckpointError(f"bad preprocessing in {where}: {exc}") from exc
