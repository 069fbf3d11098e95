"""What an ONNX graph says about its inputs and outputs, and whether vitserve can feed it and read it.

Readers for an onnxruntime session and for an ``onnx.ModelProto`` give the same ``GraphIO``; the
checks below pick the image input and the logits output and explain, naming the tensor, why a
graph cannot be served.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from service.core.metadata import INPUT_DTYPES, PREFIX
from service.core.spec.options import DEFAULT, FLAG, GRAPH, ModelSpecError

if TYPE_CHECKING:
    import onnx

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


def pick_tensor(candidates: Sequence[TensorInfo], wanted: str | None, kind: str, model_path: Path) -> TensorInfo:
    """The tensor named ``wanted``, or the only candidate; ``kind`` is "input" or "output"."""
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


def image_input_layout(tensor: TensorInfo, given: str | None, model_path: Path) -> tuple[str, str]:
    """(layout, source): ``given`` when set, else the axis of size 3, else nchw by default."""
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


def spatial_dims(tensor: TensorInfo, layout: str) -> tuple[Dim, Dim]:
    """(height, width) of a 4-D image input."""
    shape = tensor.known_shape()
    return (shape[2], shape[3]) if layout == "nchw" else (shape[1], shape[2])


def check_image_input(tensor: TensorInfo, layout: str, image_size: int, model_path: Path) -> None:
    """Refuse an input vitserve cannot feed: not 3 channels, a fixed size other than image_size, not float."""
    shape = tensor.known_shape()
    channels = shape[1] if layout == "nchw" else shape[3]
    if isinstance(channels, int) and channels != 3:
        raise ModelSpecError(
            f"{model_path}: input {tensor.describe()} has {channels} channels on its "
            f"{layout} channel axis; vitserve feeds 3 (RGB)"
        )
    height, width = spatial_dims(tensor, layout)
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


def check_logits_output(tensor: TensorInfo, num_labels: int, model_path: Path) -> int | None:
    """Refuse an output that is not [N, classes] floats; return its fixed class count (None = symbolic)."""
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
    """One label per class, or an error naming both counts."""
    if num_classes != num_labels:
        raise ModelSpecError(
            f"{model_path}: {num_labels} labels but output {output_name} has {num_classes} classes; "
            "give a labels file with one name per class"
        )
