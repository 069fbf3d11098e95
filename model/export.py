"""PyTorch ViT -> the one ONNX file the service runs: fused attention, metadata inside, fp32/fp16/int8.

The attention path. ``model.vit.Attention`` calls ``F.scaled_dot_product_attention`` and
torch's dynamo exporter at opset >= 23 turns each call into ONE standard ONNX ``Attention``
node (no MatMul-Softmax-MatMul chain left). We ship that node rather than rewriting the graph
into ``com.microsoft.MultiHeadAttention`` because:
- ONNX Runtime's CUDA provider runs the standard op with the same flash / memory-efficient
  kernels in fp16 that back MultiHeadAttention (microsoft/onnxruntime PR 27542), so there is
  no speed to win on the GPU hosts we target;
- it comes straight out of the exporter: MultiHeadAttention would need a pattern-matching
  fusion pass, and ORT's own (``optimize_model(model_type="vit")``) fused nothing on this
  model (see shared/NOTES.md), so every new torch release could silently unfuse us;
- it is an ONNX standard op, so the CPU provider here runs it (the graph is testable on CI)
  and runtimes other than ONNX Runtime can read the file.

Precisions:
- fp32: the exported graph as is.
- fp16 (for GPUs): the PyTorch model is cast to half before export, so every MatMul and the
  Attention node run in fp16 (what selects the flash kernels); LayerNormalization keeps
  ``stash_type=1``, i.e. mean and variance in fp32, so wide residual streams cannot overflow.
  Attention's ``softmax_precision`` attribute is deliberately left unset: ORT's CUDA Attention
  kernel has thrown "softmax_precision is not supported yet" for any other value, and its
  flash / memory-efficient kernels (and the CPU kernel: measured, identical output either way)
  keep the softmax running max and sum in fp32 regardless.
  The graph still takes float32 ``pixel_values`` and returns float32 ``logits``, with one Cast
  at each end: the service feeds the same arrays whatever the precision, and the Cast of a
  3x224x224 image costs nothing next to the network. Metadata ``input_dtype`` says float32.
- int8 (for CPU hosts): the fp32 graph with dynamically quantized weights (model/quantize.py).
"""

from __future__ import annotations

import copy
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import onnx
import torch

from model.checkpoint import import_checkpoint
from model.config import ViTConfig
from model.hybrid import fold_weight_standardization
from model.onnx_io import DEFAULT_EXTERNAL_DATA_THRESHOLD_BYTES, save_onnx
from model.quantize import quantize_int8
from model.verify import VerifyReport, verify_export
from service.core.metadata import ModelMetadata, Preprocessing

Precision = Literal["fp32", "fp16", "int8"]
Target = Literal["gpu", "cpu"]
PRECISIONS: tuple[str, ...] = ("fp32", "fp16", "int8")
TARGETS: tuple[str, ...] = ("gpu", "cpu")
# --target only picks a default precision: fp16 is what the GPU kernels want; on a CPU fp32 is
# exact and int8 is an explicit accuracy trade the user opts into.
TARGET_DEFAULT_PRECISION: dict[str, str] = {"gpu": "fp16", "cpu": "fp32"}

# The first opset with the standard Attention op; lower ones export MatMul/Softmax/MatMul.
MIN_FUSED_OPSET = 23
DEFAULT_OPSET = 23
# The newest opset torch 2.14 + onnxscript 0.7 convert ViT to (26 fails on Gelu and the exporter
# silently falls back to opset 18); ONNX Runtime 1.31 runs 23-25.
MAX_OPSET = 25
INPUT_NAME = "pixel_values"
OUTPUT_NAME = "logits"
ATTENTION_OP = "Attention"  # the standard ONNX op, default domain


class ExportError(RuntimeError):
    """The export cannot be made as asked (bad option, bad labels); the message says why."""


@dataclass(frozen=True)
class ExportResult:
    """What was written.

    Args:
        path: the .onnx file.
        external_data: the weights file next to it, or None when the weights are inside.
        metadata: the vitserve metadata written into the file.
        file_bytes: size on disk of the .onnx plus its external data.
    """

    path: Path
    external_data: Path | None
    metadata: ModelMetadata
    file_bytes: int


def resolve_precision(precision: str | None, target: str | None) -> str:
    """An explicit precision wins; otherwise the target's default; with neither, fp32."""
    if precision is not None:
        if precision not in PRECISIONS:
            raise ExportError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        return precision
    if target is not None:
        if target not in TARGETS:
            raise ExportError(f"target must be one of {TARGETS}, got {target!r}")
        return TARGET_DEFAULT_PRECISION[target]
    return "fp32"


def check_options(precision: str, opset: int) -> None:
    """Fail on a bad precision or opset before any slow work starts."""
    if precision not in PRECISIONS:
        raise ExportError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if opset < MIN_FUSED_OPSET:
        raise ExportError(f"opset {opset} has no fused Attention op; use --opset {MIN_FUSED_OPSET} or higher")
    if opset > MAX_OPSET:
        raise ExportError(f"opset {opset} is newer than this exporter converts to; use {MIN_FUSED_OPSET}-{MAX_OPSET}")


def torch_to_onnx(module: torch.nn.Module, config: ViTConfig, *, opset: int = DEFAULT_OPSET) -> onnx.ModelProto:
    """Export ``module`` (pixels -> logits) with a dynamic batch axis; no metadata, no precision change.

    Public for the benchmark, which also needs the unfused graph (explicit attention).
    """
    # Zeros, not random: tracing only needs shapes, and the caller's RNG stream stays untouched.
    # Example batch 2, not 1: torch.export specialises a size-1 dimension to a constant.
    example = torch.zeros(2, config.in_chans, config.image_size, config.image_size)
    batch = torch.export.Dim("batch", min=1, max=65536)
    module = fold_weight_standardization(module)  # a hybrid's convs as plain Conv with fixed weights
    was_training = module.training
    module.eval()
    try:
        program = torch.onnx.export(
            module,
            (example,),
            None,
            dynamo=True,
            opset_version=opset,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_shapes=({0: batch},),
            verbose=False,
            optimize=True,
        )
    finally:
        module.train(was_training)
    model = program.model_proto
    exported = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    if exported != opset:
        # The exporter falls back to its own default opset when a version conversion fails.
        raise ExportError(f"asked for opset {opset}, the exporter produced opset {exported}")
    _strip_node_debug_info(model)
    return model


class Fp16Graph(torch.nn.Module):
    """A half-precision copy of a model that takes and returns float32 (one Cast at each end).

    Args:
        model: the fp32 model; it is copied, not changed.
    """

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.inner = copy.deepcopy(model).half().eval()

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.inner(pixel_values.to(torch.float16)).float()


def _strip_node_debug_info(model: onnx.ModelProto) -> None:
    """Drop per-node stack traces and FX names: they hold this machine's paths and make two
    exports of the same weights differ byte for byte."""
    for node in model.graph.node:
        del node.metadata_props[:]
        node.doc_string = ""


def build_metadata(
    config: ViTConfig,
    *,
    labels: Sequence[str],
    preprocessing: Preprocessing,
    precision: str,
    source: str,
    weights_sha256: str,
    opset: int,
    name: str = "",
) -> ModelMetadata:
    """The contract's ModelMetadata plus extra keys that describe the graph (depth for the fused
    count, exporter versions to reproduce a file)."""
    import onnxscript

    extra = {
        "depth": str(config.depth),
        "patch_size": str(config.patch_size),
        "embed_dim": str(config.embed_dim),
        "num_heads": str(config.num_heads),
        "opset": str(opset),
        "attention_op": ATTENTION_OP,
        "exporter": f"torch {torch.__version__}, onnxscript {onnxscript.__version__}, onnx {onnx.__version__}",
    }
    if config.is_hybrid:
        # The hybrid's patches come from a CNN: say which, and at what stride (patch_size is on its map).
        extra["backbone"] = config.backbone_name
        extra["backbone_stride"] = str(config.backbone_stride)
    if precision == "int8":
        import onnxruntime

        extra["quantization"] = (
            f"dynamic int8 weights of MatMul/Gemm, per channel (onnxruntime {onnxruntime.__version__})"
        )
    return ModelMetadata(
        architecture=config.name,
        labels=tuple(labels),
        preprocessing=preprocessing,
        precision=precision,
        input_dtype="float32",
        source=source,
        weights_sha256=weights_sha256,
        extra=extra,
        name=name,
    )


def export_model(
    model: torch.nn.Module,
    config: ViTConfig,
    output: str | os.PathLike,
    *,
    labels: Sequence[str],
    preprocessing: Preprocessing,
    source: str = "",
    weights_sha256: str = "",
    precision: str = "fp32",
    opset: int = DEFAULT_OPSET,
    external_data_threshold_bytes: int = DEFAULT_EXTERNAL_DATA_THRESHOLD_BYTES,
    progress: bool = False,
    name: str = "",
) -> ExportResult:
    """Export a loaded ViT to ``output`` with its metadata; the core that export_checkpoint wraps.

    Args:
        model: the PyTorch ViT (fp32 weights); left unchanged.
        config: its config (architecture name, depth, image size).
        output: path of the .onnx file to write; external data goes next to it when needed.
        labels: class names, one per logit.
        preprocessing: how images become pixel_values, written into the metadata.
        source, weights_sha256: where the weights came from and their hash, for the metadata.
        precision: "fp32", "fp16" or "int8" (see the module docstring).
        opset: ONNX opset, >= 23 so that attention exports as one fused node.
        external_data_threshold_bytes: weights above this size are written as external data.
        progress: show a progress bar on stderr.
        name: the name the service serves it under (a fine-tune's own); "" = the architecture.
    """
    from tqdm.auto import tqdm

    check_options(precision, opset)
    if config.num_classes <= 0:
        raise ExportError("the model has no classification head (num_classes=0); export one with --num-classes K")
    if len(labels) != config.num_classes:
        raise ExportError(f"{len(labels)} labels for a head with {config.num_classes} classes")
    metadata = build_metadata(
        config,
        labels=labels,
        preprocessing=preprocessing,
        precision=precision,
        source=source,
        weights_sha256=weights_sha256,
        opset=opset,
        name=name,
    )
    steps = ["export to ONNX"] + (["quantize int8"] if precision == "int8" else []) + ["write"]
    with tqdm(total=len(steps), disable=None if progress else True, file=sys.stderr, unit="step", leave=False) as bar:
        bar.set_description(f"{steps[0]} ({precision}, opset {opset})")
        # Standardise a hybrid's conv weights in fp32, before any cast to half.
        module = fold_weight_standardization(model)
        module = Fp16Graph(module) if precision == "fp16" else module
        graph = torch_to_onnx(module, config, opset=opset)
        bar.update()
        if precision == "int8":
            bar.set_description("quantize int8")
            graph = quantize_int8(graph)
            bar.update()
        bar.set_description("write")
        onnx.helper.set_model_props(graph, metadata.to_props())
        external = save_onnx(graph, output, external_data_threshold_bytes=external_data_threshold_bytes)
        bar.update()
    path = Path(output)
    size = path.stat().st_size + (external.stat().st_size if external else 0)
    return ExportResult(path=path, external_data=external, metadata=metadata, file_bytes=size)


def export_checkpoint(
    source: str,
    output: str | os.PathLike,
    *,
    precision: str | None = None,
    target: str | None = None,
    model_name: str | None = None,
    num_classes: int | None = None,
    image_size: int | None = None,
    opset: int = DEFAULT_OPSET,
    external_data_threshold_bytes: int = DEFAULT_EXTERNAL_DATA_THRESHOLD_BYTES,
    verify: bool = True,
    progress: bool = False,
    name: str = "",
) -> tuple[ExportResult, VerifyReport | None]:
    """Import any checkpoint the importer reads, export it, and verify the file (unless verify=False).

    Raises model.verify.VerificationFailed (carrying the report) when a parity bound is missed.
    """
    from tqdm.auto import tqdm

    precision = resolve_precision(precision, target)
    check_options(precision, opset)
    with tqdm(
        total=1, desc=f"import {source}", disable=None if progress else True, file=sys.stderr, unit="step", leave=False
    ) as bar:
        loaded = import_checkpoint(source, model_name=model_name, num_classes=num_classes, image_size=image_size)
        bar.update()
    result = export_model(
        loaded.model,
        loaded.config,
        output,
        labels=loaded.labels,
        preprocessing=loaded.preprocessing,
        source=loaded.source,
        weights_sha256=loaded.weights_sha256,
        precision=precision,
        opset=opset,
        external_data_threshold_bytes=external_data_threshold_bytes,
        progress=progress,
        name=name,
    )
    report = None
    if verify:
        report = verify_export(result.path, loaded.model, expected_sha256=loaded.weights_sha256, progress=progress)
        report.raise_for_failures()
    return result, report
