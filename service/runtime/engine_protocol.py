"""What the batcher and the front ends need from an engine: ``InferenceEngine``.

service/runtime/engine.py's ``Engine`` (an ONNX Runtime session) is the one that ships; tests and
benchmarks bring their own (a fake with deterministic logits, a fault injector). ``HostEngine``
gives the members a CPU-only engine has no use for, so such an engine writes ``run`` and
``metadata`` and nothing else.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Protocol

import numpy as np

from service.core.metadata import ModelMetadata


class ModelFacts(Protocol):
    """What the front end knows of the engine: enough to describe the model, nothing to run it.

    ``metadata`` describes the model (labels, pre-processing); ``on_gpu`` says whether batches run
    on a GPU (bigger default batches); ``max_batch_size`` is the graph's fixed batch axis, or None
    when the batch is dynamic. A front-end worker of a multi-process server holds only these
    (service/serving/engine_client.py): the engine itself is in the engine process.
    """

    metadata: ModelMetadata
    on_gpu: bool
    max_batch_size: int | None

    def describe(self) -> dict[str, Any]:
        """A JSON-friendly view of the engine for /v1/models and logs."""
        ...


class InferenceEngine(ModelFacts, Protocol):
    """An image classifier that runs one batch at a time."""

    def run(self, batch: np.ndarray) -> np.ndarray:
        """(N, 3, H, W) float32 -> logits (N, K) float32; called from one thread at a time."""
        ...

    def warmup(self, batch_sizes: Iterable[int]) -> dict[int, float]:
        """Run once at each batch size; returns seconds per size."""
        ...


class HostEngine:
    """Defaults for an engine on the host CPU with a dynamic batch axis: nothing to warm or describe."""

    metadata: ModelMetadata
    on_gpu: bool = False
    max_batch_size: int | None = None

    def warmup(self, batch_sizes: Iterable[int]) -> dict[int, float]:
        return {}

    def describe(self) -> dict[str, Any]:
        return {}
