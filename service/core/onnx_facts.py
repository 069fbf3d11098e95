"""Facts about ONNX graphs that the exporter, the verifier and the engine must agree on.

One home for them: model/verify.py counts fused attention nodes with the same set that
service/core/onnx_summary.py reports and service/runtime/engine.py looks for in node placement.
"""

from __future__ import annotations

# (domain, op_type) of every node that runs a whole attention block in one kernel. "" and "ai.onnx"
# are the same standard domain (opset 23+ `Attention`); the com.microsoft ops are ONNX Runtime's.
FUSED_ATTENTION_OPS: frozenset[tuple[str, str]] = frozenset(
    {
        ("", "Attention"),
        ("ai.onnx", "Attention"),
        ("com.microsoft", "Attention"),
        ("com.microsoft", "MultiHeadAttention"),
        ("com.microsoft", "GroupQueryAttention"),
    }
)

# A profile's node records name the op type only, not its domain.
FUSED_ATTENTION_OP_TYPES: frozenset[str] = frozenset(op for _, op in FUSED_ATTENTION_OPS)

# ONNX Runtime's provider names (the strings its API takes and returns).
TENSORRT_PROVIDER = "TensorrtExecutionProvider"
CUDA_PROVIDER = "CUDAExecutionProvider"
CPU_PROVIDER = "CPUExecutionProvider"


def is_fused_attention(domain: str, op_type: str) -> bool:
    """True when a node (domain, op_type) is one fused attention kernel."""
    return (domain, op_type) in FUSED_ATTENTION_OPS
