"""Verify an exported ONNX file: it is ours, attention is fused, and ONNX Runtime matches PyTorch.

An export is verified, not trusted (shared/DESIGN.md). Checks:
- the file parses, passes onnx.checker, carries vitserve metadata, has ``pixel_values`` [batch, 3, H, W]
  in and ``logits`` [batch, K] out; anything else is an ExportFileError with one clear sentence;
- fused attention nodes == depth, and no Softmax anywhere in the graph (each would mean an
  unfused MatMul-Softmax-MatMul attention);
- for a hybrid: one GroupNormalization node per GroupNorm of the PyTorch model, and no
  BatchNormalization (its weight standardisation is folded into the Conv weights at export);
- ONNX Runtime (CPU provider, deterministic) vs the fp32 PyTorch model on two input sets, random
  normal inputs and real photographs (skimage.data, preprocessed exactly as the service does):
  max abs diff of logits within a bound relative to the logit scale, and top-1 agreement.

Top-1 agreement counts only the rows PyTorch decides: its two best logits differ by more than
the precision's resolution (its typical error, far below the diff bound). Closer than that, a
correct fp16 or int8 graph may legitimately pick the other class, and a fresh zero-initialised
head (the paper's fine-tuning start) ties every logit. fp16 random-noise rows are reported
without a top-1 bound: noise inputs give near-tied logits; on photos fp16 must agree.
"""

from __future__ import annotations

import os
import sys
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

from service.core.metadata import MetadataError, ModelMetadata, Preprocessing
from service.core.onnx_facts import CPU_PROVIDER, is_fused_attention

GROUP_NORM_OP = "GroupNormalization"  # opset 21+: what a hybrid's GroupNorm exports to
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket")
NUM_RANDOM = 8


class ExportFileError(ValueError):
    """The file is not a usable vitserve export (missing, corrupt, foreign); the message says which."""


@dataclass(frozen=True)
class Tolerance:
    """Bounds for one precision.

    Args:
        max_abs_diff: bound on max |logits_onnx - logits_torch|, relative to max(1, max |logits_torch|).
        resolution: the precision's typical error, relative like max_abs_diff; top-1 is compared
            only on rows whose reference top-2 margin exceeds it.
        min_top1: per input set, the least fraction of those rows whose top-1 must agree; a set
            missing here is reported but not bounded.
    """

    max_abs_diff: float
    resolution: float
    min_top1: dict[str, float]


TOLERANCES: dict[str, Tolerance] = {
    # fp32: measured ~1e-6 on ViT-Ti; 1e-4 leaves room for deeper and wider models.
    "fp32": Tolerance(1e-4, 1e-6, {"random": 1.0, "photos": 1.0}),
    # fp16: ~1e-3 relative measured (11-bit mantissa through L residual additions).
    "fp16": Tolerance(1e-2, 2e-3, {"photos": 1.0}),
    # int8: weights quantised to 8 bits move logits by a few percent (~4% measured on random weights).
    "int8": Tolerance(0.2, 5e-2, {"random": 0.5, "photos": 0.75}),
}


@dataclass(frozen=True)
class GraphStats:
    """Counts over the graph (subgraphs and local functions included)."""

    node_count: int
    op_counts: dict[str, int]
    fused_attention: int
    softmax: int
    opset: int


@dataclass(frozen=True)
class ExportInfo:
    """What a file is, before running it."""

    path: Path
    metadata: ModelMetadata
    graph: GraphStats
    file_bytes: int
    external_data: tuple[str, ...]


@dataclass(frozen=True)
class Parity:
    """ONNX Runtime vs PyTorch fp32 on one input set."""

    name: str
    rows: int
    max_abs_diff: float
    bound: float
    top1_agree: int
    top1_rows: int  # rows the reference decides (top-2 margin above the precision's resolution)
    min_top1: float | None
    # PyTorch gave every input the same logits (a fresh zero head): the figures then test the head only.
    constant_reference: bool = False

    @property
    def top1_fraction(self) -> float:
        return self.top1_agree / self.top1_rows if self.top1_rows else 1.0

    def failures(self) -> list[str]:
        out = []
        if not np.isfinite(self.max_abs_diff) or self.max_abs_diff > self.bound:
            out.append(f"{self.name}: max abs diff {self.max_abs_diff:.3g} > bound {self.bound:.3g}")
        if self.min_top1 is not None and self.top1_fraction < self.min_top1:
            out.append(
                f"{self.name}: top-1 agreement {self.top1_agree}/{self.top1_rows} < {self.min_top1:.0%} required"
            )
        return out


@dataclass
class VerifyReport:
    info: ExportInfo
    depth: int
    parity: list[Parity] = field(default_factory=list)
    weights_match: bool | None = None  # the source's weights hash vs the file's, when both are known
    group_norms: int = 0  # GroupNorm layers of the PyTorch model (a hybrid's backbone), each one ONNX node

    def failures(self) -> list[str]:
        out = []
        graph = self.info.graph
        if graph.fused_attention != self.depth:
            out.append(f"{graph.fused_attention} fused attention nodes, expected depth {self.depth}")
        if graph.softmax:
            out.append(f"{graph.softmax} Softmax node(s) outside fused attention")
        group_norm_nodes = graph.op_counts.get(GROUP_NORM_OP, 0)
        if group_norm_nodes != self.group_norms:
            out.append(f"{group_norm_nodes} {GROUP_NORM_OP} nodes, expected {self.group_norms} (one per GroupNorm)")
        if batch_norms := graph.op_counts.get("BatchNormalization", 0):
            out.append(f"{batch_norms} BatchNormalization node(s): weight standardisation was not folded at export")
        if self.weights_match is False:
            out.append(
                f"the file was exported from other weights (sha256 {self.info.metadata.weights_sha256[:12]}) "
                "than the source given"
            )
        for parity in self.parity:
            out.extend(parity.failures())
        return out

    @property
    def passed(self) -> bool:
        return not self.failures()

    def raise_for_failures(self) -> None:
        if failures := self.failures():
            raise VerificationFailed(self, failures)


class VerificationFailed(RuntimeError):
    """A bound was missed; carries the report so the caller can print every number."""

    def __init__(self, report: VerifyReport, failures: list[str]) -> None:
        super().__init__("verification failed: " + "; ".join(failures))
        self.report = report
        self.failures = failures


def graph_stats(model: onnx.ModelProto) -> GraphStats:
    counts: Counter[str] = Counter()
    fused = softmax = 0
    for node in _all_nodes(model):
        counts[node.op_type] += 1
        if is_fused_attention(node.domain, node.op_type):
            fused += 1
        elif node.op_type == "Softmax":
            softmax += 1
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    return GraphStats(
        node_count=sum(counts.values()),
        op_counts=dict(counts.most_common()),
        fused_attention=fused,
        softmax=softmax,
        opset=opset,
    )


def _all_nodes(model: onnx.ModelProto) -> Iterable[onnx.NodeProto]:
    pending = [model.graph] + [function for function in model.functions]
    while pending:
        for node in pending.pop().node:
            yield node
            for attribute in node.attribute:
                if attribute.type == onnx.AttributeProto.GRAPH:
                    pending.append(attribute.g)
                pending.extend(attribute.graphs)


def inspect_export(path: str | os.PathLike) -> ExportInfo:
    """Read and check a file without running it; ExportFileError says what is wrong."""
    path = Path(path)
    if not path.is_file():
        raise ExportFileError(f"{path}: no such file")
    try:
        model = onnx.load(path, load_external_data=False)
    except Exception as exc:  # protobuf raises DecodeError, onnx its own errors, both mean "not ONNX"
        raise ExportFileError(f"{path}: not an ONNX model (cannot parse it: {type(exc).__name__}: {exc})") from None
    if not model.graph.node:
        raise ExportFileError(f"{path}: not an ONNX model (no graph nodes; the file is empty or not ONNX)")
    external = sorted(
        {
            entry.value
            for tensor in model.graph.initializer
            if tensor.data_location == onnx.TensorProto.EXTERNAL
            for entry in tensor.external_data
            if entry.key == "location"
        }
    )
    for name in external:
        if not (path.parent / name).is_file():
            raise ExportFileError(f"{path}: its weights live in {name}, which is missing next to it")
    try:
        onnx.checker.check_model(str(path))
    except Exception as exc:
        raise ExportFileError(f"{path}: invalid ONNX model: {exc}") from None
    try:
        metadata = ModelMetadata.from_props({p.key: p.value for p in model.metadata_props})
    except MetadataError as exc:
        raise ExportFileError(f"{path}: not a vitserve export: {exc}") from None
    _check_signature(path, model, metadata)
    size = path.stat().st_size + sum((path.parent / name).stat().st_size for name in external)
    return ExportInfo(
        path=path, metadata=metadata, graph=graph_stats(model), file_bytes=size, external_data=tuple(external)
    )


def _check_signature(path: Path, model: onnx.ModelProto, metadata: ModelMetadata) -> None:
    # metadata.precision is one of PRECISIONS (ModelMetadata.from_props refuses others), each with a tolerance.
    initializers = {t.name for t in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in initializers]
    outputs = list(model.graph.output)
    if [i.name for i in inputs] != ["pixel_values"] or not outputs or outputs[0].name != "logits":
        raise ExportFileError(
            f"{path}: expected input 'pixel_values' and output 'logits', found inputs "
            f"{[i.name for i in inputs]} and outputs {[o.name for o in outputs]}"
        )
    want = onnx.helper.np_dtype_to_tensor_dtype(np.dtype(metadata.input_dtype))
    tensor = inputs[0].type.tensor_type
    if tensor.elem_type != want:
        raise ExportFileError(
            f"{path}: pixel_values is {onnx.TensorProto.DataType.Name(tensor.elem_type)} but "
            f"metadata input_dtype says {metadata.input_dtype}"
        )
    dims = [d.dim_value if d.HasField("dim_value") else None for d in tensor.shape.dim]
    size = metadata.preprocessing.image_size
    if len(dims) != 4 or dims[1:] != [3, size, size]:
        raise ExportFileError(f"{path}: pixel_values has shape {dims}, expected [batch, 3, {size}, {size}]")
    out_dims = [d.dim_value if d.HasField("dim_value") else None for d in outputs[0].type.tensor_type.shape.dim]
    if len(out_dims) != 2 or out_dims[1] not in (None, metadata.num_classes):
        raise ExportFileError(f"{path}: logits has shape {out_dims}, expected [batch, {metadata.num_classes}]")


def random_inputs(image_size: int, count: int = NUM_RANDOM, seed: int = 0) -> np.ndarray:
    """(count, 3, S, S) float32 standard normal: the scale of normalised pixels, fixed by the seed."""
    return np.random.default_rng(seed).standard_normal((count, 3, image_size, image_size), dtype=np.float32)


def photo_inputs(preprocessing: Preprocessing, names: Iterable[str] = PHOTOS) -> np.ndarray:
    """(len(names), 3, S, S) float32: skimage.data photographs through the service's own preprocessing."""
    import skimage.data
    from PIL import Image

    from service.runtime.preprocess import preprocess

    return np.stack([preprocess(Image.fromarray(getattr(skimage.data, name)()), preprocessing) for name in names])


def ort_session(path: str | os.PathLike):
    """A CPU session: deterministic kernels, and the provider every host has."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3  # warnings about unused initializers etc. are not the user's business
    try:
        return ort.InferenceSession(str(path), options, providers=[CPU_PROVIDER])
    except Exception as exc:  # ORT raises its own exception types for every load failure
        raise ExportFileError(f"{path}: ONNX Runtime cannot load it: {exc}") from None


def compare(name: str, reference: np.ndarray, candidate: np.ndarray, tolerance: Tolerance) -> Parity:
    reference = reference.astype(np.float64)
    candidate = candidate.astype(np.float64)
    scale = max(1.0, float(np.abs(reference).max()))
    top2 = np.sort(reference, axis=1)[:, -2:] if reference.shape[1] > 1 else np.zeros((len(reference), 2))
    decided = (top2[:, 1] - top2[:, 0]) > tolerance.resolution * scale
    agree = reference.argmax(1) == candidate.argmax(1)
    return Parity(
        name=name,
        rows=len(reference),
        max_abs_diff=float(np.abs(reference - candidate).max()),
        bound=tolerance.max_abs_diff * scale,
        top1_agree=int((agree & decided).sum()),
        top1_rows=int(decided.sum()),
        min_top1=tolerance.min_top1.get(name),
        constant_reference=bool(np.ptp(reference, axis=0).max() == 0),
    )


def verify_export(
    path: str | os.PathLike,
    torch_model,
    *,
    expected_sha256: str | None = None,
    num_random: int = NUM_RANDOM,
    progress: bool = False,
) -> VerifyReport:
    """Check ``path`` against ``torch_model`` (the fp32 PyTorch ViT it was exported from).

    Args:
        path: the .onnx file.
        torch_model: a model.vit.VisionTransformer in fp32 (its config gives the expected depth).
        expected_sha256: the weights hash of the source; compared with the file's metadata when both exist.
        num_random: rows of random input.
        progress: show a progress bar on stderr.
    """
    import torch
    from tqdm.auto import tqdm

    info = inspect_export(path)
    meta = info.metadata
    tolerance = TOLERANCES[meta.precision]
    group_norms = sum(isinstance(m, torch.nn.GroupNorm) for m in torch_model.modules())
    report = VerifyReport(info=info, depth=torch_model.config.depth, group_norms=group_norms)
    if expected_sha256 and meta.weights_sha256:
        report.weights_match = expected_sha256 == meta.weights_sha256
    input_sets = {
        "random": lambda: random_inputs(meta.preprocessing.image_size, num_random),
        "photos": lambda: photo_inputs(meta.preprocessing),
    }
    with tqdm(
        total=1 + 2 * len(input_sets), disable=None if progress else True, file=sys.stderr, unit="step", leave=False
    ) as bar:
        bar.set_description(f"verify: load {info.path.name}")
        session = ort_session(info.path)
        bar.update()
        was_training = torch_model.training
        torch_model.eval()
        try:
            for name, make in input_sets.items():
                pixels = make()
                bar.set_description(f"verify {name}: PyTorch fp32")
                with torch.no_grad():
                    reference = torch_model(torch.from_numpy(pixels)).numpy()
                bar.update()
                bar.set_description(f"verify {name}: ONNX Runtime {meta.precision}")
                (candidate,) = session.run(["logits"], {"pixel_values": pixels.astype(meta.input_dtype)})
                bar.update()
                report.parity.append(compare(name, reference, candidate, tolerance))
        finally:
            torch_model.train(was_training)
    return report


def verify_against_source(
    path: str | os.PathLike,
    source: str,
    *,
    model_name: str | None = None,
    num_classes: int | None = None,
    image_size: int | None = None,
    progress: bool = False,
) -> VerifyReport:
    """``vitserve verify``: check a file against the checkpoint it claims to come from.

    The file is inspected first, so a corrupt or foreign file fails before any checkpoint loads.
    Options not given default to what the file says (architecture, class count, image size), so the
    checkpoint is imported the way the export imported it and the weights hashes can be compared.
    """
    from model.checkpoint import import_checkpoint

    info = inspect_export(path)
    meta = info.metadata
    loaded = import_checkpoint(
        source,
        model_name=model_name or meta.architecture,
        num_classes=num_classes or meta.num_classes,
        image_size=image_size or meta.preprocessing.image_size,
    )
    return verify_export(info.path, loaded.model, expected_sha256=loaded.weights_sha256, progress=progress)


def format_summary(info: ExportInfo, report: VerifyReport | None = None) -> str:
    """One screen: what the file is, its graph, its size, and the parity figures when verified."""
    meta = info.metadata
    graph = info.graph
    depth = int(meta.extra.get("depth", report.depth if report else 0))
    files = f"{_mb(info.path.stat().st_size)}"
    if info.external_data:
        files += f" + external data {', '.join(info.external_data)} ({_mb(info.file_bytes - info.path.stat().st_size)})"
    top_ops = ", ".join(f"{op} {n}" for op, n in list(graph.op_counts.items())[:6])
    lines = [
        f"file          {info.path}  {files}",
        f"model         {meta.architecture}  depth {depth}  image {meta.preprocessing.image_size}  "
        f"classes {meta.num_classes}",
        f"precision     {meta.precision}  (feed pixel_values as {meta.input_dtype})",
        f"source        {meta.source or '-'}  sha256 {meta.weights_sha256[:16] or '-'}",
        f"graph         opset {graph.opset}, {graph.node_count} nodes ({top_ops})",
        f"attention     {graph.fused_attention} fused node(s) for depth {depth}, {graph.softmax} Softmax outside them",
    ]
    if "backbone" in meta.extra:
        lines.append(
            f"backbone      {meta.extra['backbone']}, stride {meta.extra.get('backbone_stride', '?')}: "
            f"{graph.op_counts.get(GROUP_NORM_OP, 0)} {GROUP_NORM_OP}, "
            f"{graph.op_counts.get('BatchNormalization', 0)} BatchNormalization"
        )
    if report is None:
        lines.append("verification  skipped")
        return "\n".join(lines)
    lines.append("parity        ONNX Runtime CPU vs PyTorch fp32")
    for p in report.parity:
        top1 = f"top-1 {p.top1_agree}/{p.top1_rows} decided"
        if p.min_top1 is not None:
            top1 += f" (>= {p.min_top1:.0%})"
        lines.append(f"  {p.name:<11} {p.rows:>3} rows  max|diff| {p.max_abs_diff:.2e} (<= {p.bound:.1e})  {top1}")
    if any(p.constant_reference for p in report.parity):
        lines.append(
            "note          PyTorch gives every input the same logits (zero-initialised head?): the parity "
            "figures cannot see the transformer body"
        )
    if report.weights_match is not None:
        same = "same hash as the source" if report.weights_match else "DIFFERENT from the source"
        lines.append(f"weights       {same}")
    failures = report.failures()
    lines.append("result        " + ("PASSED" if not failures else "FAILED: " + "; ".join(failures)))
    return "\n".join(lines)


def _mb(size: int) -> str:
    return f"{size / 1e6:.1f} MB"
