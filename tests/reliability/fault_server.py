"""The real vitserve server and real ONNX engine, with faults injected from the environment.

Run as ``python tests/reliability/fault_server.py``; every VITSERVE_* variable configures the
service as usual. The fault knobs live here, in the tests, not in production code:

- ``RELIABILITY_ENGINE_DELAY_S``: extra seconds every batch takes (a slower model, so queues fill);
- ``RELIABILITY_FAIL_BATCHES``: comma list of 1-based batch numbers whose ``run`` raises.

Warm-up runs go to the real engine directly and are not counted as batches. With
``VITSERVE_WORKERS`` above 1 the engine is built (and wrapped) in the engine process, as production
builds it there: an ONNX Runtime session must not cross a fork.
"""

from __future__ import annotations

import os
import sys
import threading
import time

import numpy as np

from service.core.settings import Settings
from service.http.server import serve
from service.serving.lifecycle import build_engine
from service.serving.supervisor import resolve_workers


class FaultInjectingEngine:
    """Wraps an engine: optional delay per batch, and chosen batches raise.

    Args:
        inner: the real engine (its metadata, warm-up and description pass through).
        delay_s: seconds added to every batch.
        fail_batches: 1-based numbers of the batches that raise RuntimeError.
    """

    def __init__(self, inner, *, delay_s: float = 0.0, fail_batches: frozenset[int] = frozenset()) -> None:
        self.inner = inner
        self.metadata = inner.metadata
        self.on_gpu = inner.on_gpu
        self.max_batch_size = inner.max_batch_size
        self.delay_s = delay_s
        self.fail_batches = fail_batches
        self._batches = 0
        self._lock = threading.Lock()

    def run(self, batch: np.ndarray) -> np.ndarray:
        with self._lock:
            self._batches += 1
            number = self._batches
        if self.delay_s:
            time.sleep(self.delay_s)
        if number in self.fail_batches:
            raise RuntimeError(f"injected fault on batch {number}")
        return self.inner.run(batch)

    def warmup(self, batch_sizes):
        return self.inner.warmup(batch_sizes)

    def describe(self) -> dict:
        return self.inner.describe()


def main() -> int:
    settings = Settings()
    fail = frozenset(int(v) for v in os.environ.get("RELIABILITY_FAIL_BATCHES", "").split(",") if v.strip())
    delay_s = float(os.environ.get("RELIABILITY_ENGINE_DELAY_S", "0") or 0)
    import logging

    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    def make_engine() -> FaultInjectingEngine:
        # exactly as production builds it from the same settings
        return FaultInjectingEngine(build_engine(settings), delay_s=delay_s, fail_batches=fail)

    if resolve_workers(settings) > 1:
        return serve(settings, make_engine=make_engine)
    return serve(settings, engine=make_engine())


if __name__ == "__main__":
    sys.exit(main())
