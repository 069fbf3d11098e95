"""What an ONNX file holds, as `vitserve inspect` reports it: IO, opsets, fused attention, precision, metadata.

Reads the file with the ``onnx`` package when it is installed (opsets, node counts, initializer
dtypes); the runtime image has no ``onnx``, so without it the summary falls back to what an
onnxruntime session tells (inputs, outputs, metadata) and says what it could not see.
"""

from __future__ import annotations

import importlib.util
import os
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from service.core.metadata import PREFIX, REQUIRED_KEYS
from service.core.onnx_facts import CPU_PROVIDER, is_fused_attention
from service.core.spec import (
    GraphIO,
    ModelSpecError,
    SpecOptions,
    TensorInfo,
    graph_io_from_onnx,
    graph_io_from_session,
    missing_fields,
    resolve_spec,
    sidecar_path,
)

if TYPE_CHECKING:
    import onnx

_ITEMSIZE = {
    "float32": 4,
    "float16": 2,
    "bfloat16": 2,
    "float64": 8,
    "int8": 1,
    "uint8": 1,
    "int32": 4,
    "int64": 8,
    "int16": 2,
    "uint16": 2,
    "bool": 1,
}


def summarize(path: str | os.PathLike[str], options: SpecOptions | None = None) -> dict[str, Any]:
    """A JSON-friendly summary of the ONNX file at ``path``; ``options`` as `vitserve serve` flags would give."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"model file not found: {path}")
    out: dict[str, Any] = {"file": str(path), "size_bytes": path.stat().st_size}
    weights_precision: str | None = None
    if importlib.util.find_spec("onnx") is not None:
        import onnx

        model = onnx.load(str(path), load_external_data=False)  # structure and dtypes only: quick for any size
        graph = graph_io_from_onnx(model)
        out["reader"] = "onnx"
        out["ir_version"] = model.ir_version
        out["producer"] = " ".join(filter(None, (model.producer_name, model.producer_version)))
        out["opsets"] = {(o.domain or "ai.onnx"): o.version for o in model.opset_import}
        ops = _op_counts(model)
        out["fused_attention_nodes"] = {
            f"{d}.{op}" if d else op: n for (d, op), n in sorted(ops.items()) if is_fused_attention(d, op)
        }
        out["fused_attention_total"] = sum(out["fused_attention_nodes"].values())
        out["softmax_nodes"] = ops.get(("", "Softmax"), 0) + ops.get(("ai.onnx", "Softmax"), 0)
        out["node_count"] = sum(ops.values())
        elements = initializer_elements(model)
        out["initializer_elements"] = dict(elements.most_common())
        weights_precision = precision_from_elements(elements)
    else:
        graph = _graph_io_from_ort(path)
        out["reader"] = "onnxruntime"
        out["note"] = (
            "the onnx package is not installed (the runtime image has none): opsets, attention node "
            "counts and initializer precision are not shown; pip install onnx to see them"
        )
    out["inputs"] = [_tensor(t) for t in graph.inputs]
    out["outputs"] = [_tensor(t) for t in graph.outputs]
    out["dynamic_batch"] = _dynamic_batch(graph)
    out["precision"], out["precision_from"] = _precision(graph, weights_precision)
    out.update(_metadata_view(graph))
    out.update(_service_view(path, graph, options))
    return out


def _graph_io_from_ort(path: Path) -> GraphIO:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # reading only: no optimisation
    opts.log_severity_level = 3
    return graph_io_from_session(ort.InferenceSession(str(path), sess_options=opts, providers=[CPU_PROVIDER]))


def _op_counts(model: onnx.ModelProto) -> Counter[tuple[str, str]]:
    """(domain, op_type) -> count over the main graph, nested subgraphs and model-local functions."""
    counts: Counter[tuple[str, str]] = Counter()

    def walk(nodes: Iterable[onnx.NodeProto]) -> None:
        for node in nodes:
            counts[(node.domain, node.op_type)] += 1
            for attr in node.attribute:
                if attr.HasField("g"):
                    walk(attr.g.node)
                for sub in attr.graphs:
                    walk(sub.node)

    walk(model.graph.node)
    for function in model.functions:
        walk(function.node)
    return counts


def initializer_elements(model: onnx.ModelProto) -> Counter[str]:
    """numpy dtype name -> number of initializer elements (read from dims: external data stays unread)."""
    import onnx

    counts: Counter[str] = Counter()
    for tensor in model.graph.initializer:
        try:
            dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).name
        except (KeyError, ValueError, TypeError):
            dtype = onnx.TensorProto.DataType.Name(tensor.data_type).lower()
        if tensor.data_type == onnx.TensorProto.BFLOAT16:
            dtype = "bfloat16"
        size = 1
        for d in tensor.dims:
            size *= d
        counts[dtype] += size
    return counts


def precision_from_elements(elements: Counter[str]) -> str | None:
    """The dtype holding most weight elements: int8/uint8 -> int8, float16 -> fp16, float32 -> fp32."""
    names = {
        "float32": "fp32",
        "float16": "fp16",
        "bfloat16": "bf16",
        "int8": "int8",
        "uint8": "int8",
        "float64": "fp64",
    }
    by_precision: Counter[str] = Counter()
    for dtype, n in elements.items():
        if dtype in names:
            by_precision[names[dtype]] += n
    return by_precision.most_common(1)[0][0] if by_precision else None


def _precision(graph: GraphIO, weights_precision: str | None) -> tuple[str, str]:
    declared = graph.props.get(PREFIX + "precision")
    if declared:
        return declared, "metadata"
    if weights_precision:
        return weights_precision, "initializers"
    image = graph.inputs[0] if len(graph.inputs) == 1 else None
    return ("fp16" if image is not None and image.dtype == "float16" else "fp32"), "input type"


def _tensor(t: TensorInfo) -> dict[str, Any]:
    return {"name": t.name, "shape": list(t.shape) if t.shape is not None else None, "dtype": t.dtype}


def _dynamic_batch(graph: GraphIO) -> bool | None:
    if not graph.inputs or graph.inputs[0].shape is None or not graph.inputs[0].shape:
        return None
    return all(not isinstance(t.shape[0], int) for t in graph.inputs if t.shape)


def _metadata_view(graph: GraphIO) -> dict[str, Any]:
    ours = {k[len(PREFIX) :]: v for k, v in graph.props.items() if k.startswith(PREFIX)}
    shown = {k: (v if len(v) <= 200 else v[:200] + "...") for k, v in sorted(ours.items())}
    return {
        "vitserve_metadata": shown,
        "vitserve_metadata_missing": [PREFIX + k for k in REQUIRED_KEYS if k not in ours],
        "other_metadata": {
            k: (v if len(v) <= 200 else v[:200] + "...")
            for k, v in sorted(graph.props.items())
            if not k.startswith(PREFIX)
        },
    }


def _service_view(path: Path, graph: GraphIO, options: SpecOptions | None) -> dict[str, Any]:
    """What `vitserve serve` would use, or why it would refuse the file."""
    sidecar = sidecar_path(path)
    # "missing" stays empty when the sidecar itself is unreadable: the problem then says why.
    view: dict[str, Any] = {"sidecar": str(sidecar) if sidecar.is_file() else None, "missing": []}
    try:
        view["missing"] = missing_fields(path, graph, options)
        spec = resolve_spec(path, graph, options)
    except ModelSpecError as exc:
        view.update(servable=False, problem=str(exc), spec=None)
        return view
    view.update(
        servable=True,
        problem=None,
        spec=spec.effective(),
        classes=spec.num_classes if spec.num_classes is not None else "symbolic (checked at start-up)",
    )
    return view


def format_text(summary: dict[str, Any]) -> str:
    """The summary as readable text."""
    lines = [f"{summary['file']} ({summary['size_bytes'] / 1e6:.1f} MB, read with {summary['reader']})"]
    if summary.get("note"):
        lines.append(f"  note: {summary['note']}")
    if "opsets" in summary:
        lines.append(
            "  opsets: "
            + ", ".join(f"{d} {v}" for d, v in summary["opsets"].items())
            + f"; ir_version {summary['ir_version']}; producer {summary['producer'] or '?'}"
        )
    for kind in ("inputs", "outputs"):
        for t in summary[kind]:
            dims = t["shape"]
            shape = "[?]" if dims is None else "[" + ", ".join("?" if d is None else str(d) for d in dims) + "]"
            lines.append(f"  {kind[:-1]:6} {t['name']} {shape} {t['dtype']}")
    dynamic = summary["dynamic_batch"]
    lines.append("  batch axis: " + ("dynamic" if dynamic else "unknown" if dynamic is None else "FIXED"))
    if "fused_attention_total" in summary:
        fused = ", ".join(f"{op} x{n}" for op, n in summary["fused_attention_nodes"].items()) or "none"
        unfused = summary["softmax_nodes"] and not summary["fused_attention_total"]
        lines.append(
            f"  fused attention nodes: {summary['fused_attention_total']} ({fused}); Softmax nodes: "
            f"{summary['softmax_nodes']} ({'attention not fused' if unfused else 'ok'}); "
            f"{summary['node_count']} nodes in all"
        )
    lines.append(f"  precision: {summary['precision']} (from {summary['precision_from']})")
    if summary["vitserve_metadata"]:
        lines.append("  vitserve metadata: " + ", ".join(sorted(summary["vitserve_metadata"])))
    else:
        lines.append("  vitserve metadata: none (not one of our exports)")
    if summary["vitserve_metadata"] and summary["vitserve_metadata_missing"]:
        lines.append("  vitserve metadata missing: " + ", ".join(summary["vitserve_metadata_missing"]))
    if summary["other_metadata"]:
        lines.append("  other metadata: " + ", ".join(summary["other_metadata"]))
    lines.append(f"  sidecar: {summary['sidecar'] or 'none'}")
    if summary["servable"]:
        lines.append(f"  the service would use ({summary['classes']} classes):")
        for name, item in summary["spec"].items():
            value = item["value"]
            text = ",".join(f"{v:g}" for v in value) if isinstance(value, list) else str(value)
            lines.append(f"    {name:14} {text:24} ({item['source']})")
    else:
        if summary["missing"]:
            lines.append("  missing for serving: " + ", ".join(summary["missing"]))
        lines.append(f"  NOT servable as is: {summary['problem']}")
    return "\n".join(lines)
