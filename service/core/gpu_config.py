"""The engine's GPU options as configuration: parsed and validated with the settings at start-up.

Pure (no onnxruntime, no CUDA): ``service.core.settings`` builds them, ``service.runtime.gpu_options``
and ``service.runtime.engine`` apply them; that module's docstring says what each option does.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path


class GpuOptionsError(ValueError):
    """A GPU option is malformed or contradicts another; the message says which."""


def parse_buckets(spec: str | Sequence[int] | None) -> tuple[int, ...]:
    """``"1,4,16,64"`` or a list -> sorted unique positive sizes; None or empty -> () (no bucketing)."""
    if spec is None:
        return ()
    parts = [p.strip() for p in spec.split(",")] if isinstance(spec, str) else list(spec)
    sizes = []
    for part in parts:
        if part == "":
            continue
        try:
            size = int(part)
        except (TypeError, ValueError):
            raise GpuOptionsError(f"batch buckets must be positive integers, got {part!r}") from None
        if size < 1 or str(size) != str(part).strip():
            raise GpuOptionsError(f"batch buckets must be positive integers, got {part!r}")
        sizes.append(size)
    return tuple(sorted(set(sizes)))


@dataclass(frozen=True)
class GpuOptions:
    """What the engine does beyond a plain session; the defaults change nothing.

    Args:
        batch_buckets: batch sizes every run is padded to (sorted, unique); () = each batch runs at
            its own size.
        cuda_graphs: capture one CUDA graph per bucket (needs batch_buckets; CUDA provider only).
        static_shapes: one session per bucket with the batch dimension fixed, without graphs
            (cuda_graphs implies it); lets ORT fold the shape arithmetic on any provider.
        pinned_host_memory: stage uploads in page-locked host buffers (CUDA provider only).
        trt_cache_dir: TensorRT engine and timing cache directory; None = no cache (TensorRT only).
        trt_fp16: let TensorRT choose fp16 kernels (what an fp32 export needs to be fast).
    """

    batch_buckets: tuple[int, ...] = ()
    cuda_graphs: bool = False
    static_shapes: bool = False
    pinned_host_memory: bool = False
    trt_cache_dir: Path | None = None
    trt_fp16: bool = True

    def __post_init__(self) -> None:
        if tuple(parse_buckets(self.batch_buckets)) != tuple(self.batch_buckets):
            raise GpuOptionsError(f"batch_buckets must be sorted unique positive sizes, got {self.batch_buckets}")
        if self.cuda_graphs and not self.batch_buckets:
            raise GpuOptionsError(
                "cuda_graphs needs batch_buckets: a CUDA graph replays one fixed shape, so "
                "every batch must be padded to a captured size"
            )

    @property
    def per_bucket_sessions(self) -> bool:
        return bool(self.batch_buckets) and (self.cuda_graphs or self.static_shapes)
