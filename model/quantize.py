"""int8 dynamic quantization of an exported ViT, for CPU hosts.

Dynamic quantization stores the weights of every MatMul/Gemm as int8 and quantizes the
activations per batch at run time (DynamicQuantizeLinear -> MatMulInteger), so it needs no
calibration images. On this CPU (AVX512-VNNI) ViT-B/16 runs 2.5-2.9x the fused fp32 graph at
batch 1-8 (bench/RESULTS.md).

Two things ONNX Runtime's quantizer gets wrong on an opset-23 torch.export graph, both
measured with onnxruntime 1.31:
- its shape inference fails with "Inferred shape and existing shape differ" on the
  exporter's ``value_info`` entries, so they are cleared first (ORT re-infers them);
- with its default op list it rewrites the standard ``Attention`` node into a
  ``com.microsoft.QAttention`` that ORT itself then rejects ("Unrecognized attribute:
  is_causal"), so only MatMul and Gemm are quantized and the fused Attention stays fp32.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import onnx

# The linear layers: qkv, proj, fc1, fc2 of each block are MatMul; the head is a Gemm.
QUANTIZED_OP_TYPES = ("MatMul", "Gemm")


def quantize_int8(model: onnx.ModelProto, *, per_channel: bool = True) -> onnx.ModelProto:
    """Return an int8 dynamically quantized copy of ``model`` (an fp32 export).

    Args:
        model: the fp32 ONNX model; it is not modified.
        per_channel: one weight scale per output channel rather than per tensor; ViT weights
            have channels with very different ranges, so this keeps more accuracy for no speed cost.
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic

    model = _copy_without_value_info(model)
    with tempfile.TemporaryDirectory(prefix="vitserve-quantize-") as tmp:
        src, dst = Path(tmp) / "fp32.onnx", Path(tmp) / "int8.onnx"
        # Through files with external data: the quantizer's own proto copies would hit the 2 GB
        # protobuf limit on ViT-H in memory, and the files vanish with the directory.
        onnx.save_model(
            model,
            src,
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location="fp32.onnx.data",
            size_threshold=1024,
        )
        quantizer_log = logging.getLogger()
        level = quantizer_log.level
        # The quantizer warns on the root logger that "pre-processing" is advised; that step is
        # the shape inference this module replaces, so the warning is noise for our users.
        quantizer_log.setLevel(logging.ERROR)
        try:
            quantize_dynamic(
                src,
                dst,
                op_types_to_quantize=list(QUANTIZED_OP_TYPES),
                per_channel=per_channel,
                weight_type=QuantType.QInt8,
                use_external_data_format=True,
            )
        finally:
            quantizer_log.setLevel(level)
        quantized = onnx.load(dst, load_external_data=True)
    return quantized


def _copy_without_value_info(model: onnx.ModelProto) -> onnx.ModelProto:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    del copy.graph.value_info[:]
    return copy
