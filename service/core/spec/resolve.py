"""Combining every source into the one description the engine serves: ``resolve_spec`` -> ``ModelSpec``.

Precedence (flag > metadata > sidecar > graph > default) and the defaults are explained in
service/core/spec/__init__.py; a missing required field is an error that says how to give it.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from service.core.metadata import (
    INPUT_DTYPES,
    KNOWN_KEYS,
    PRECISIONS,
    PREFIX,
    MetadataError,
    ModelMetadata,
    Preprocessing,
    one_of,
)
from service.core.spec.graph import (
    GraphIO,
    check_image_input,
    check_logits_output,
    image_input_layout,
    pick_tensor,
    spatial_dims,
)
from service.core.spec.options import DEFAULT, FLAG, GRAPH, METADATA, SIDECAR, ModelSpecError, SpecOptions
from service.core.spec.sources import load_sidecar, options_from_metadata, sidecar_path

# No default for these: guessing them would serve wrong answers quietly.
REQUIRED = ("image_size", "mean", "std", "labels")


def missing_fields(model_path: str | os.PathLike[str], graph: GraphIO, options: SpecOptions | None = None) -> list[str]:
    """The REQUIRED fields that no source gives (for `vitserve inspect`; resolve_spec raises on them)."""
    layers = [options or SpecOptions(), options_from_metadata(graph.props), load_sidecar(model_path) or SpecOptions()]
    missing = [name for name in REQUIRED if all(getattr(layer, name) is None for layer in layers)]
    if "image_size" in missing and len(graph.inputs) == 1:
        tensor = graph.inputs[0]
        if tensor.shape is not None and len(tensor.shape) == 4:
            layout = "nhwc" if tensor.shape[3] == 3 and tensor.shape[1] != 3 else "nchw"
            height, width = spatial_dims(tensor, layout)
            if isinstance(height, int) and height == width:
                missing.remove("image_size")
    return missing


@dataclass(frozen=True)
class ModelSpec:
    """Everything the engine and the routes need, with the origin of each value.

    ``metadata`` is what the rest of the service reads (labels, pre-processing, name), whatever
    the file carried; ``sources`` maps each field to flag / metadata / sidecar / graph / default.
    """

    metadata: ModelMetadata
    input_name: str
    output_name: str
    input_layout: str
    input_dtype: str
    batch_size: int | None  # the graph's fixed batch; None = dynamic
    num_classes: int | None  # the output's fixed class count; None = symbolic (checked by a probe run)
    sources: Mapping[str, str]
    has_metadata: bool
    labels_origin: str | None = None

    def effective(self) -> dict[str, dict[str, Any]]:
        """field -> {"value", "source"}: for GET /v1/models, `vitserve inspect` and the start-up log."""
        p = self.metadata.preprocessing
        values = {
            "name": self.metadata.served_name,
            "image_size": p.image_size,
            "resize": p.resize_size,
            "resize_mode": p.resize_mode,
            "interpolation": p.interpolation,
            "mean": list(p.mean),
            "std": list(p.std),
            "labels": len(self.metadata.labels),
            "input_name": self.input_name,
            "output_name": self.output_name,
            "input_layout": self.input_layout,
            "input_dtype": self.input_dtype,
            "batch_size": self.batch_size if self.batch_size is not None else "dynamic",
        }
        out = {k: {"value": v, "source": self.sources[k]} for k, v in values.items()}
        if self.labels_origin and self.sources["labels"] != METADATA:
            out["labels"]["file"] = self.labels_origin
        return out

    def log_text(self) -> str:
        return "; ".join(f"{k}={_short(v['value'])} ({v['source']})" for k, v in self.effective().items())


def _short(value: Any) -> str:
    if isinstance(value, list):
        return ",".join(f"{v:g}" if isinstance(v, float) else str(v) for v in value)
    return str(value)


def resolve_spec(
    model_path: str | os.PathLike[str],
    graph: GraphIO,
    options: SpecOptions | None = None,
    *,
    sidecar: SpecOptions | None | bool = True,
) -> ModelSpec:
    """Combine flags, the file's metadata, the sidecar and the graph (see the module docstring).

    Args:
        model_path: the .onnx file (names the sidecar and the default model name).
        graph: the file's inputs, outputs and metadata_props.
        options: explicit settings (flags / environment); None = none.
        sidecar: True reads ``<model>.json`` when present; False ignores it; SpecOptions uses those.
    Raises ModelSpecError naming every missing field, or the tensor that cannot be served.
    """
    model_path = Path(model_path)
    if sidecar is True:
        sidecar = load_sidecar(model_path)
    elif sidecar is False:
        sidecar = None
    try:
        from_metadata = options_from_metadata(graph.props)
    except ModelSpecError as exc:
        raise ModelSpecError(f"{model_path}: {exc}") from exc
    layers = [(FLAG, options or SpecOptions()), (METADATA, from_metadata), (SIDECAR, sidecar or SpecOptions())]

    def pick(name: str) -> tuple[Any, str | None]:
        for source, layer in layers:
            value = getattr(layer, name)
            if value is not None:
                return value, source
        return None, None

    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for name in (
        "name",
        "image_size",
        "resize_mode",
        "interpolation",
        "mean",
        "std",
        "labels",
        "input_name",
        "output_name",
        "input_layout",
    ):
        values[name], source = pick(name)
        if source:
            sources[name] = source

    image_input = pick_tensor(graph.inputs, values["input_name"], "input", model_path)
    sources.setdefault("input_name", GRAPH)
    logits_output = pick_tensor(graph.outputs, values["output_name"], "output", model_path)
    sources.setdefault("output_name", GRAPH)
    layout, layout_source = image_input_layout(image_input, values["input_layout"], model_path)
    sources["input_layout"] = sources.get("input_layout", layout_source)
    height, width = spatial_dims(image_input, layout)
    if values["image_size"] is None and isinstance(height, int) and height == width:
        values["image_size"], sources["image_size"] = height, GRAPH

    missing = [name for name in REQUIRED if values[name] is None]
    if missing:
        raise ModelSpecError(_missing_message(model_path, graph, missing))
    image_size = values["image_size"]

    # resize and crop are one decision: the highest source that gives either of them makes it.
    resize_size, resize_source = image_size, DEFAULT
    for source, layer in layers:
        if layer.resize is not None or layer.crop is not None:
            resize_size = layer.resize if layer.resize is not None else math.floor(image_size / layer.crop)
            resize_source = source
            break
    sources["resize"] = resize_source
    if values["resize_mode"] is None:
        values["resize_mode"] = "squash" if resize_source == DEFAULT else "shortest"
        sources["resize_mode"] = DEFAULT
    if values["interpolation"] is None:
        values["interpolation"], sources["interpolation"] = "bilinear", DEFAULT
    # A name given anywhere beats the architecture our exports record (a fine-tune is not its base).
    architecture = graph.props.get(PREFIX + "architecture")
    if values["name"] is None and architecture:
        values["name"], sources["name"] = architecture.strip(), METADATA
    if values["name"] is None:
        values["name"], sources["name"] = model_path.name.removesuffix(".onnx"), DEFAULT

    check_image_input(image_input, layout, image_size, model_path)
    num_classes = check_logits_output(logits_output, len(values["labels"]), model_path)
    batch = image_input.known_shape()[0]
    batch_size = batch if isinstance(batch, int) and batch > 0 else None
    sources["input_dtype"] = sources["batch_size"] = GRAPH

    try:
        preprocessing = Preprocessing(
            image_size=image_size,
            resize_size=resize_size,
            resize_mode=values["resize_mode"],
            interpolation=values["interpolation"],
            mean=values["mean"],
            std=values["std"],
        )
    except MetadataError as exc:
        where = ", ".join(f"{k} from {sources[k]}" for k in ("image_size", "resize", "resize_mode"))
        raise ModelSpecError(f"{model_path}: inconsistent pre-processing ({where}): {exc}") from exc
    metadata = _metadata(graph.props, values, preprocessing, image_input.dtype)
    labels_origin = next((layer.labels_origin for source, layer in layers if source == sources["labels"]), None)
    return ModelSpec(
        metadata=metadata,
        input_name=image_input.name,
        output_name=logits_output.name,
        input_layout=layout,
        input_dtype=image_input.dtype,
        batch_size=batch_size,
        num_classes=num_classes,
        sources=sources,
        has_metadata=graph.has_metadata,
        labels_origin=labels_origin,
    )


def _metadata(
    props: Mapping[str, str], values: dict[str, Any], preprocessing: Preprocessing, input_dtype: str
) -> ModelMetadata:
    """The ModelMetadata the routes read: our keys kept verbatim, effective values where they differ."""
    ours = {k[len(PREFIX) :]: v for k, v in props.items() if k.startswith(PREFIX)}
    architecture = ours.get("architecture") or values["name"]
    try:
        precision = one_of(
            ours.get("precision") or ("fp16" if input_dtype == "float16" else "fp32"), PRECISIONS, PREFIX + "precision"
        )
        dtype = one_of(input_dtype, INPUT_DTYPES, "the image input's element type")
    except MetadataError as exc:
        raise ModelSpecError(f"malformed vitserve metadata: {exc}") from None
    if (
        "num_classes" in ours
        and "labels" in ours
        and ours["num_classes"].strip() != str(len(json.loads(ours["labels"])))
    ):
        raise ModelSpecError(
            f"malformed vitserve metadata: {PREFIX}num_classes={ours['num_classes']} but "
            f"{PREFIX}labels has {len(json.loads(ours['labels']))} names"
        )
    return ModelMetadata(
        architecture=architecture,
        name=values["name"] if values["name"] != architecture else "",  # "" = served as its architecture
        labels=tuple(values["labels"]),
        preprocessing=preprocessing,
        precision=precision,
        input_dtype=dtype,
        source=ours.get("source", ""),
        weights_sha256=ours.get("weights_sha256", ""),
        extra={k: v for k, v in ours.items() if k not in KNOWN_KEYS},
    )


def _missing_message(model_path: Path, graph: GraphIO, missing: list[str]) -> str:
    flags = {
        "image_size": "--image-size 224",
        "mean": "--mean 0.5,0.5,0.5",
        "std": "--std 0.5,0.5,0.5",
        "labels": "--labels labels.txt",
    }
    envs = ", ".join(f"VITSERVE_{name.upper()}" for name in missing)
    example = {"image_size": 224, "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "labels": "labels.txt"}
    if graph.has_metadata:
        carried = "its vitserve metadata is incomplete"
    else:
        carried = (
            f"it carries no vitserve metadata ({PREFIX}architecture, {PREFIX}labels, {PREFIX}mean, ...: "
            "not one of our exports)"
        )
    return (
        f"{model_path}: cannot serve this file: {carried}, and these are not given: {', '.join(missing)}. "
        f"Give them as flags ({' '.join(flags[m] for m in missing)}), environment variables ({envs}), or in "
        f"a sidecar {sidecar_path(model_path)} such as {json.dumps({m: example[m] for m in missing})}; "
        "`vitserve export --from-onnx` embeds them into a copy so they are needed only once"
    )
