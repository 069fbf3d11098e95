"""Two of the places a model description comes from: the file's own vitserve metadata and a sidecar JSON.

A sidecar is a JSON object next to the model, ``<model file>.json`` (``other.onnx.json``), with the
same field names as the flags (``image_size``, ``mean``, ``labels`` ...).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from service.core.metadata import PREFIX
from service.core.spec.options import ModelSpecError, SpecOptions

# Extra vitserve.* keys written by `vitserve export --from-onnx` for files whose IO needs naming.
IO_METADATA_KEYS = ("input_name", "output_name", "input_layout")


def sidecar_path(model_path: str | os.PathLike[str]) -> Path:
    """``other.onnx`` -> ``other.onnx.json``."""
    return Path(f"{os.fspath(model_path)}.json")


def load_sidecar(model_path: str | os.PathLike[str]) -> SpecOptions | None:
    path = sidecar_path(model_path)
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelSpecError(f"sidecar {path}: not readable JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ModelSpecError(f"sidecar {path}: expected a JSON object of fields, got {type(data).__name__}")
    return SpecOptions.parse(data, where=f"sidecar {path}", base_dir=path.parent)


def options_from_metadata(props: Mapping[str, str]) -> SpecOptions:
    """The spec fields our ``vitserve.*`` keys give (a partial set is fine: the rest may come from elsewhere)."""
    ours = {k[len(PREFIX) :]: v for k, v in props.items() if k.startswith(PREFIX)}
    raw: dict[str, Any] = {}
    renamed = {"resize_size": "resize"}
    # ``architecture`` is not a name claim: resolve_spec falls back to it after the sidecar.
    for key in (
        "name",
        "image_size",
        "resize_size",
        "resize_mode",
        "interpolation",
        "mean",
        "std",
        "labels",
        *IO_METADATA_KEYS,
    ):
        if key not in ours:
            continue
        value: Any = ours[key]
        if key in ("mean", "std", "labels"):
            try:
                value = json.loads(value)
            except ValueError as exc:
                raise ModelSpecError(f"malformed vitserve metadata: {PREFIX}{key} is not JSON: {exc}") from exc
        raw[renamed.get(key, key)] = value
    return SpecOptions.parse(raw, where="the file's vitserve metadata")
