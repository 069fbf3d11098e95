"""What the service will feed a model and how to read its answer, for our exports and any other ONNX classifier.

A file exported by vitserve carries everything in its metadata (service/core/metadata.py). A file from
elsewhere (Hugging Face Optimum, timm, a plain ``torch.onnx.export``, another framework) carries
none of it, so the same fields can come from three more places. Each effective value is taken
from the first of these that gives it:

    1. flag      an explicit setting: a ``vitserve serve`` flag (``--mean``) or its environment
                 variable (``VITSERVE_MEAN``); the flag wins over the variable (service/core/settings.py)
    2. metadata  the ``vitserve.*`` keys inside the ONNX file
    3. sidecar   a JSON object next to the model, ``<model file>.json`` (``other.onnx.json``), with
                 the same field names as the flags (``image_size``, ``mean``, ``labels`` ...)
    4. graph     what the ONNX graph itself says (a fixed H = W gives ``image_size``; a single
                 input or output gives its name; the input's element type gives ``input_dtype``)
    5. default   ``resize`` = ``image_size`` with ``resize_mode`` "squash" (the whole image, no
                 crop) when neither ``resize`` nor ``crop`` is given, "shortest" when one is;
                 ``interpolation`` "bilinear"; ``name`` = the file's stem

So our own metadata wins over a sidecar, and only an explicit flag overrides it. ``image_size``,
``mean``, ``std`` and ``labels`` have no default: guessing them would serve wrong answers quietly,
so a missing one is a start-up error that names it and says how to give it.

``crop`` is timm's ``crop_pct``: ``resize`` = floor(image_size / crop) on the shorter side, then
a centre crop of ``image_size`` (``--crop 0.875`` for a timm model at 224 gives ``resize`` 256).

Pure Python (numpy-free): ``settings``, the engine, ``vitserve inspect`` and the ONNX metadata
embedder all use it; it never imports onnxruntime, onnx or torch.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from service.core.metadata import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    INPUT_DTYPES,
    INTERPOLATIONS,
    PRECISIONS,
    PREFIX,
    RESIZE_MODES,
    MetadataError,
    ModelMetadata,
    Preprocessing,
    one_of,
)

if TYPE_CHECKING:
    import argparse

    import onnx

FLAG, METADATA, SIDECAR, GRAPH, DEFAULT = "flag", "metadata", "sidecar", "graph", "default"
LAYOUTS = ("nchw", "nhwc")
# Named normalisations users know by name (timm's constants).
NAMED_NORMALISATIONS = {
    "imagenet": (IMAGENET_MEAN, IMAGENET_STD),
    "inception": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
}
REQUIRED = ("image_size", "mean", "std", "labels")
# vitserve.* keys that ModelMetadata.from_props understands; anything else lands in ``extra``.
_KNOWN_METADATA_KEYS = frozenset(
    {
        "format_version",
        "architecture",
        "num_classes",
        "labels",
        "image_size",
        "resize_size",
        "resize_mode",
        "interpolation",
        "crop_size",
        "mean",
        "std",
        "precision",
        "input_dtype",
        "source",
        "weights_sha256",
    }
)
# Extra vitserve.* keys written by `vitserve export --from-onnx` for files whose IO needs naming.
IO_METADATA_KEYS = ("input_name", "output_name", "input_layout")


class ModelSpecError(ValueError):
    """The model cannot be served as described; the message names the field or tensor and the fix."""


# --- what the user may give ---------------------------------------------------------------------


@dataclass(frozen=True)
class SpecOptions:
    """Values given by one source (flags, the file's metadata, a sidecar); None = not given there.

    Args:
        name: model name shown by the API (our metadata's ``architecture``).
        image_size: side of the square model input, pixels.
        resize: resize target, pixels (see ``resize_mode``).
        resize_mode: "shortest" (resize the shorter side, then centre-crop) or "squash" (both sides).
        crop: timm's crop_pct in (0, 1]; an alternative to ``resize``.
        interpolation: nearest, bilinear, bicubic or lanczos.
        mean, std: per-channel normalisation after scaling pixels to [0, 1].
        labels: class names, index order.
        labels_origin: where the labels were read from (a file path, or "inline").
        input_name, output_name: which graph input gets the pixels and which output holds the logits.
        input_layout: "nchw" or "nhwc" (channels-last: the engine transposes).
    """

    name: str | None = None
    image_size: int | None = None
    resize: int | None = None
    resize_mode: str | None = None
    crop: float | None = None
    interpolation: str | None = None
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None
    labels: tuple[str, ...] | None = None
    labels_origin: str | None = None
    input_name: str | None = None
    output_name: str | None = None
    input_layout: str | None = None

    @classmethod
    def parse(cls, raw: Mapping[str, Any], *, where: str, base_dir: Path | None = None) -> SpecOptions:
        """Validate raw values (strings from flags/env, JSON values from a sidecar) naming ``where`` on error.

        ``labels`` may be a path (relative paths resolve against ``base_dir``) or a list of names.
        Unknown keys are refused so a typo in a sidecar does not silently do nothing.
        """
        known = {f.name for f in fields(cls)} - {"labels_origin"}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ModelSpecError(f"{where}: unknown field(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        values: dict[str, Any] = {}
        for key, value in raw.items():
            if value is None or (isinstance(value, str) and not value.strip()):
                continue
            try:
                if key == "labels":
                    values["labels"], values["labels_origin"] = _parse_labels(value, base_dir)
                else:
                    values[key] = _PARSERS[key](value)
            except (ValueError, TypeError, OSError) as exc:
                raise ModelSpecError(f"{where}: {key}: {exc}") from exc
        if values.get("resize") is not None and values.get("crop") is not None:
            raise ModelSpecError(
                f"{where}: give either resize or crop, not both (crop sets resize = floor(image_size / crop))"
            )
        return cls(**values)

    def given(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}


def _positive_int(value: Any) -> int:
    if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
        raise ValueError(f"expected a positive integer, got {value!r}")
    number = int(value)
    if number <= 0:
        raise ValueError(f"expected a positive integer, got {value!r}")
    return number


def _crop_fraction(value: Any) -> float:
    number = float(value)
    if not 0 < number <= 1:
        raise ValueError(f"crop is a fraction in (0, 1] (timm's crop_pct, e.g. 0.875), got {value!r}")
    return number


def _choice(options: Sequence[str]) -> Callable[[Any], str]:
    def parse(value: Any) -> str:
        text = str(value).strip().lower()
        if text not in options:
            raise ValueError(f"expected one of {', '.join(options)}, got {value!r}")
        return text

    return parse


def _channels(kind: str) -> Callable[[Any], tuple[float, float, float]]:
    def parse(value: Any) -> tuple[float, float, float]:
        if isinstance(value, str):
            text = value.strip()
            if text.lower() in NAMED_NORMALISATIONS:
                return NAMED_NORMALISATIONS[text.lower()][0 if kind == "mean" else 1]
            items = json.loads(text) if text.startswith("[") else [v for v in text.split(",") if v.strip()]
        else:
            items = list(value)
        numbers = tuple(float(v) for v in items)
        if len(numbers) != 3 or any(not math.isfinite(v) for v in numbers):
            names = ", ".join(NAMED_NORMALISATIONS)
            raise ValueError(f"expected 3 numbers (R,G,B) such as 0.5,0.5,0.5 or a name ({names}), got {value!r}")
        if kind == "std" and min(numbers) <= 0:
            raise ValueError(f"std must be > 0 for every channel, got {numbers}")
        return numbers

    return parse


def _name(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError(f"expected a string, got {value!r}")
    return value.strip()


_PARSERS = {
    "name": _name,
    "image_size": _positive_int,
    "resize": _positive_int,
    "resize_mode": _choice(RESIZE_MODES),
    "crop": _crop_fraction,
    "interpolation": _choice(INTERPOLATIONS),
    "mean": _channels("mean"),
    "std": _channels("std"),
    "input_name": _name,
    "output_name": _name,
    "input_layout": _choice(LAYOUTS),
}


def _parse_labels(value: Any, base_dir: Path | None) -> tuple[tuple[str, ...], str]:
    if isinstance(value, (list, tuple)):
        return _check_labels(value, "the list"), "inline"
    path = Path(os.path.expanduser(str(value)))
    if base_dir is not None and not path.is_absolute():
        path = base_dir / path
    return load_labels(path), str(path)


def load_labels(path: str | os.PathLike[str]) -> tuple[str, ...]:
    """Class names from a file, index order.

    ``.json``: a list of names; an object mapping "0".."K-1" to names; or an object with
    ``id2label`` (a Hugging Face config.json) or ``labels``. Anything else: one name per line
    (trailing blank lines ignored).
    """
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() == ".json":
        data = json.loads(text)
        if isinstance(data, dict) and "id2label" in data:
            data = data["id2label"]
        elif isinstance(data, dict) and "labels" in data:
            data = data["labels"]
        if isinstance(data, dict):
            try:
                by_index = {int(k): v for k, v in data.items()}
            except ValueError as exc:
                raise ValueError(f"{path}: keys must be class indices 0..K-1: {exc}") from None
            if sorted(by_index) != list(range(len(by_index))):
                raise ValueError(f"{path}: class indices must run 0..{len(by_index) - 1} without gaps")
            data = [by_index[i] for i in range(len(by_index))]
        if not isinstance(data, list):
            raise ValueError(f"{path}: expected a list of names, an index -> name object or a config with id2label")
        return _check_labels(data, str(path))
    lines = [line.strip() for line in text.splitlines()]
    while lines and not lines[-1]:
        lines.pop()
    empty = [i + 1 for i, line in enumerate(lines) if not line]
    if empty:
        raise ValueError(f"{path}: empty label on line(s) {empty[:5]}")
    return _check_labels(lines, str(path))


def _check_labels(items: Sequence[Any], where: str) -> tuple[str, ...]:
    if not items:
        raise ValueError(f"{where}: no labels")
    if not all(isinstance(v, (str, int)) for v in items):
        raise ValueError(f"{where}: labels must be strings")
    return tuple(str(v) for v in items)


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
    renamed = {"architecture": "name", "resize_size": "resize"}
    for key in (
        "architecture",
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


# --- what the graph says ---------------------------------------------------------------------------

Dim = int | str | None  # fixed size, symbolic name, or unknown


@dataclass(frozen=True)
class TensorInfo:
    """One graph input or output: name, shape (None = rank unknown), numpy element type name."""

    name: str
    shape: tuple[Dim, ...] | None
    dtype: str

    def shape_text(self) -> str:
        if self.shape is None:
            return "[?]"
        return "[" + ", ".join(str(d) if d is not None else "?" for d in self.shape) + "]"

    def describe(self) -> str:
        return f"{self.name} {self.shape_text()} {self.dtype}"

    def known_shape(self) -> tuple[Dim, ...]:
        """The shape, for a tensor already checked to have one (the image input, once its layout is known)."""
        if self.shape is None:
            raise ModelSpecError(f"{self.describe()}: rank unknown")
        return self.shape


@dataclass(frozen=True)
class GraphIO:
    """The graph's inputs and outputs (initializers excluded) and its metadata_props."""

    inputs: tuple[TensorInfo, ...]
    outputs: tuple[TensorInfo, ...]
    props: Mapping[str, str] = field(default_factory=dict)

    @property
    def has_metadata(self) -> bool:
        return any(k.startswith(PREFIX) for k in self.props)


# onnxruntime's NodeArg.type strings -> numpy names
_ORT_TYPES = {
    "float": "float32",
    "float16": "float16",
    "double": "float64",
    "bfloat16": "bfloat16",
    "uint8": "uint8",
    "int8": "int8",
    "uint16": "uint16",
    "int16": "int16",
    "int32": "int32",
    "int64": "int64",
    "uint32": "uint32",
    "uint64": "uint64",
    "bool": "bool",
    "string": "str",
}


def _ort_dtype(type_text: str) -> str:
    inner = type_text[len("tensor(") : -1] if type_text.startswith("tensor(") else type_text
    return _ORT_TYPES.get(inner, inner)


def _ort_dim(d: Any) -> Dim:
    return d if isinstance(d, (int, str)) else None


def graph_io_from_session(session: Any) -> GraphIO:
    """An onnxruntime.InferenceSession's inputs, outputs and custom metadata."""

    def info(arg: Any) -> TensorInfo:
        shape = arg.shape
        return TensorInfo(
            arg.name, tuple(_ort_dim(d) for d in shape) if shape is not None else None, _ort_dtype(arg.type)
        )

    return GraphIO(
        tuple(info(a) for a in session.get_inputs()),
        tuple(info(a) for a in session.get_outputs()),
        dict(session.get_modelmeta().custom_metadata_map),
    )


def graph_io_from_onnx(model: onnx.ModelProto) -> GraphIO:
    """An onnx.ModelProto's inputs (initializers excluded), outputs and metadata_props."""
    import onnx  # only callers that already hold a ModelProto get here

    def info(value: onnx.ValueInfoProto) -> TensorInfo:
        tensor = value.type.tensor_type
        try:
            dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type).name
        except (KeyError, ValueError, TypeError):
            dtype = onnx.TensorProto.DataType.Name(tensor.elem_type).lower()
        if dtype == "float16" and tensor.elem_type == onnx.TensorProto.BFLOAT16:
            dtype = "bfloat16"
        if not tensor.HasField("shape"):
            return TensorInfo(value.name, None, dtype)
        dims = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tensor.shape.dim)
        return TensorInfo(value.name, dims, dtype)

    graph = model.graph
    initializers = {i.name for i in graph.initializer}
    return GraphIO(
        tuple(info(v) for v in graph.input if v.name not in initializers),
        tuple(info(v) for v in graph.output),
        {p.key: p.value for p in model.metadata_props},
    )


def missing_fields(model_path: str | os.PathLike[str], graph: GraphIO, options: SpecOptions | None = None) -> list[str]:
    """The REQUIRED fields that no source gives (for `vitserve inspect`; resolve_spec raises on them)."""
    layers = [options or SpecOptions(), options_from_metadata(graph.props), load_sidecar(model_path) or SpecOptions()]
    missing = [name for name in REQUIRED if all(getattr(layer, name) is None for layer in layers)]
    if "image_size" in missing and len(graph.inputs) == 1:
        tensor = graph.inputs[0]
        if tensor.shape is not None and len(tensor.shape) == 4:
            layout = "nhwc" if tensor.shape[3] == 3 and tensor.shape[1] != 3 else "nchw"
            height, width = _spatial_dims(tensor, layout)
            if isinstance(height, int) and height == width:
                missing.remove("image_size")
    return missing


# --- the resolved description ------------------------------------------------------------------------


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
            "name": self.metadata.architecture,
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

    image_input = _pick_tensor(graph.inputs, values["input_name"], "input", model_path)
    sources.setdefault("input_name", GRAPH)
    logits_output = _pick_tensor(graph.outputs, values["output_name"], "output", model_path)
    sources.setdefault("output_name", GRAPH)
    layout, layout_source = _input_layout(image_input, values["input_layout"], model_path)
    sources["input_layout"] = sources.get("input_layout", layout_source)
    height, width = _spatial_dims(image_input, layout)
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
    if values["name"] is None:
        values["name"], sources["name"] = model_path.name.removesuffix(".onnx"), DEFAULT

    _check_image_input(image_input, layout, image_size, model_path)
    num_classes = _check_logits_output(logits_output, len(values["labels"]), model_path)
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
        architecture=values["name"],
        labels=tuple(values["labels"]),
        preprocessing=preprocessing,
        precision=precision,
        input_dtype=dtype,
        source=ours.get("source", ""),
        weights_sha256=ours.get("weights_sha256", ""),
        extra={k: v for k, v in ours.items() if k not in _KNOWN_METADATA_KEYS},
    )


def _pick_tensor(candidates: Sequence[TensorInfo], wanted: str | None, kind: str, model_path: Path) -> TensorInfo:
    listing = ", ".join(t.describe() for t in candidates) or "none"
    if wanted is not None:
        for tensor in candidates:
            if tensor.name == wanted:
                break
        else:
            raise ModelSpecError(f"{model_path}: no {kind} named {wanted!r}; the model's {kind}s: {listing}")
        if kind == "input" and len(candidates) > 1:
            others = ", ".join(t.name for t in candidates if t.name != wanted)
            raise ModelSpecError(
                f"{model_path}: the model needs more inputs than the image ({others}); vitserve "
                f"feeds one image tensor and has nothing to give them (inputs: {listing})"
            )
        return tensor
    if not candidates:
        raise ModelSpecError(f"{model_path}: the graph has no {kind}")
    if len(candidates) > 1:
        raise ModelSpecError(
            f"{model_path}: the model has {len(candidates)} {kind}s ({listing}); pick one with "
            f"--{kind}-name (or {kind}_name in the sidecar JSON)"
        )
    return candidates[0]


def _input_layout(tensor: TensorInfo, given: str | None, model_path: Path) -> tuple[str, str]:
    shape = tensor.shape
    if shape is None or len(shape) != 4:
        raise ModelSpecError(
            f"{model_path}: input {tensor.describe()} is not a 4-D image input; vitserve serves "
            "image classifiers and feeds [N, 3, H, W] (or channels-last [N, H, W, 3]) pixels"
        )
    if given is not None:
        return given, FLAG  # the caller keeps the real source
    if shape[1] == 3:
        return "nchw", GRAPH
    if shape[3] == 3:
        return "nhwc", GRAPH
    if isinstance(shape[1], int) or isinstance(shape[3], int):
        raise ModelSpecError(
            f"{model_path}: input {tensor.describe()} has no 3-channel axis; vitserve feeds RGB "
            "images as [N, 3, H, W] or [N, H, W, 3]"
        )
    return "nchw", DEFAULT


def _spatial_dims(tensor: TensorInfo, layout: str) -> tuple[Dim, Dim]:
    shape = tensor.known_shape()
    return (shape[2], shape[3]) if layout == "nchw" else (shape[1], shape[2])


def _check_image_input(tensor: TensorInfo, layout: str, image_size: int, model_path: Path) -> None:
    shape = tensor.known_shape()
    channels = shape[1] if layout == "nchw" else shape[3]
    if isinstance(channels, int) and channels != 3:
        raise ModelSpecError(
            f"{model_path}: input {tensor.describe()} has {channels} channels on its "
            f"{layout} channel axis; vitserve feeds 3 (RGB)"
        )
    height, width = _spatial_dims(tensor, layout)
    for dim, axis in ((height, "height"), (width, "width")):
        if isinstance(dim, int) and dim != image_size:
            raise ModelSpecError(
                f"{model_path}: input {tensor.describe()} has a fixed {axis} of {dim} but "
                f"image_size is {image_size}; give --image-size {dim}"
            )
    if tensor.dtype not in INPUT_DTYPES:
        raise ModelSpecError(
            f"{model_path}: input {tensor.describe()} has element type {tensor.dtype}; vitserve "
            "feeds normalised float32 or float16 pixels (a model that takes raw uint8 pixels "
            "and normalises inside the graph is not supported)"
        )


def _check_logits_output(tensor: TensorInfo, num_labels: int, model_path: Path) -> int | None:
    if tensor.shape is not None and len(tensor.shape) != 2:
        raise ModelSpecError(
            f"{model_path}: output {tensor.describe()} is not 2-D; vitserve reads logits of shape "
            "[N, num_classes] (pick another output with --output-name)"
        )
    if not tensor.dtype.startswith("float") and tensor.dtype != "bfloat16":
        raise ModelSpecError(f"{model_path}: output {tensor.describe()} is not a float tensor of logits")
    classes = tensor.shape[1] if tensor.shape is not None else None
    if isinstance(classes, int):
        check_label_count(classes, num_labels, model_path, tensor.name)
        return classes
    return None


def check_label_count(num_classes: int, num_labels: int, model_path: str | os.PathLike[str], output_name: str) -> None:
    if num_classes != num_labels:
        raise ModelSpecError(
            f"{model_path}: {num_labels} labels but output {output_name} has {num_classes} classes; "
            "give a labels file with one name per class"
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


# --- the command-line side (shared by `serve`, `inspect` and `export --from-onnx`) -----------------

# flag -> (field, help). Values stay strings here: SpecOptions.parse validates them all in one place.
SPEC_FLAGS = (
    ("--image-size", "image_size", "side of the square model input, pixels (foreign files)"),
    ("--resize", "resize", "resize target in pixels before the centre crop (see --resize-mode)"),
    ("--resize-mode", "resize_mode", "shortest (resize the short side, centre-crop) or squash (both sides)"),
    (
        "--crop",
        "crop",
        "centre-crop fraction, timm's crop_pct (resize = floor(image_size / crop)); instead of --resize",
    ),
    ("--interpolation", "interpolation", "nearest, bilinear, bicubic or lanczos"),
    ("--mean", "mean", "per-channel mean, e.g. 0.5,0.5,0.5 or imagenet"),
    ("--std", "std", "per-channel std, e.g. 0.5,0.5,0.5 or imagenet"),
    (
        "--labels",
        "labels",
        "class names: labels.txt (one per line) or labels.json (list, index->name, or a config.json with id2label)",
    ),
    ("--input-name", "input_name", "the graph input that gets the pixels, when there are several"),
    ("--output-name", "output_name", "the graph output holding the logits, when there are several"),
    ("--input-layout", "input_layout", "nchw or nhwc (channels-last), when the graph does not tell"),
)


def add_spec_arguments(parser: argparse.ArgumentParser, *, skip: Sequence[str] = ()) -> None:
    """Add the SPEC_FLAGS to an argparse parser (``skip``: flags the parser already has)."""
    group = parser.add_argument_group(
        "model description (for ONNX files without vitserve metadata; a flag overrides the file's metadata "
        "and the <model>.json sidecar)"
    )
    for flag, dest, help_text in SPEC_FLAGS:
        if flag not in skip:
            group.add_argument(flag, dest=dest, default=None, help=help_text)


def options_from_args(args: argparse.Namespace, *, where: str = "flags") -> SpecOptions:
    raw = {dest: getattr(args, dest, None) for _, dest, _ in SPEC_FLAGS}
    return SpecOptions.parse({k: v for k, v in raw.items() if v is not None}, where=where, base_dir=None)
