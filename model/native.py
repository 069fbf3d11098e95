"""vitserve's own checkpoint format: a directory with ``vitserve.json`` and ``model.safetensors``.

It is what fine-tuning writes and what the exporter can read back without guessing anything:
the config, the label names and the preprocessing travel with the weights.

    vitserve.json = {"format": "vitserve-checkpoint", "version": 1, "config": ViTConfig.to_dict(),
                     "labels": [...], "preprocessing": asdict(Preprocessing), "source": "...", "extra": {...}}
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from model.config import ViTConfig
from model.convert.raw import (
    CheckpointError,
    RawCheckpoint,
    check_state_dict,
    preprocessing_from_dict,
    read_json,
    read_state_dict_file,
)
from model.labels import check_labels
from service.core.metadata import Preprocessing

FORMAT = "vitserve-checkpoint"
VERSION = 1
CONFIG_NAME = "vitserve.json"
WEIGHTS_NAME = "model.safetensors"


def save_native(
    directory: str | os.PathLike,
    model: torch.nn.Module,
    config: ViTConfig,
    labels: Sequence[str],
    preprocessing: Preprocessing,
    *,
    source: str = "",
    extra: dict | None = None,
) -> Path:
    """Write ``model`` as a native checkpoint into ``directory`` (created if needed); return the directory.

    Args:
        directory: where vitserve.json and model.safetensors go (existing files are replaced).
        model: a VisionTransformer whose state dict fits ``config``.
        config: its configuration.
        labels: one name per class.
        preprocessing: the eval transform the weights expect.
        source: where the weights came from (e.g. the checkpoint that was fine-tuned).
        extra: JSON-serialisable provenance (training recipe, dataset, metrics...).
    """
    labels = check_labels(labels, config.num_classes)
    # Weights saved as fp32: the format is the reference copy, precision is chosen at export.
    state_dict = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in model.state_dict().items()}
    check_state_dict(state_dict, config, where=f"model given to save_native({directory})")
    document = {
        "format": FORMAT,
        "version": VERSION,
        "config": config.to_dict(),
        "labels": list(labels),
        "preprocessing": asdict(preprocessing),
        "source": source,
        "extra": dict(extra or {}),
    }
    text = json.dumps(document, indent=2)  # before writing anything: an unserialisable extra fails cleanly
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file(state_dict, str(directory / WEIGHTS_NAME), metadata={"format": "pt"})
    (directory / CONFIG_NAME).write_text(text + "\n", encoding="utf-8")
    return directory


def read_native(directory: str | os.PathLike) -> RawCheckpoint:
    """Read a native checkpoint's weights and description, unchecked (model.checkpoint.load_native checks and loads)."""
    directory = Path(directory)
    config_path = directory / CONFIG_NAME
    document = read_json(config_path)
    if document.get("format") != FORMAT:
        raise CheckpointError(f"{config_path}: 'format' is {document.get('format')!r}, expected {FORMAT!r}")
    if document.get("version") != VERSION:
        raise CheckpointError(f"{config_path}: unsupported version {document.get('version')!r} (this reads {VERSION})")
    missing = [k for k in ("config", "labels", "preprocessing") if k not in document]
    if missing:
        raise CheckpointError(f"{config_path} lacks {', '.join(missing)}")
    try:
        config = ViTConfig.from_dict(document["config"])
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"bad config in {config_path}: {exc}") from exc
    labels: Any = document["labels"]
    if not isinstance(labels, list) or len(labels) != config.num_classes:
        raise CheckpointError(f"{config_path}: 'labels' must list {config.num_classes} names")
    return RawCheckpoint(
        state_dict=read_state_dict_file(directory / WEIGHTS_NAME),
        config=config,
        labels=tuple(str(label) for label in labels),
        preprocessing=preprocessing_from_dict(document["preprocessing"], where=str(config_path)),
        origin=str(document.get("source", "")),
        extra=dict(document.get("extra") or {}),
    )
