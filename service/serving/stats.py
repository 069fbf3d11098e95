"""Per model version counters in Triton's statistics shape (GET /v2/models/{name}/stats).

Triton counts per *request* (here: per image, the unit the batcher queues) and per *execution*
(one engine run of a batch). ``ModelStats`` is updated from the batcher's callback (executions)
and from the serving path (each image's queue wait, pre-processing and total time); updates come
from the event loop and the batcher's thread alike, hence the lock.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field


@dataclass
class _Duration:
    count: int = 0
    ns: int = 0

    def add(self, seconds: float) -> None:
        self.count += 1
        self.ns += max(0, int(seconds * 1e9))

    def as_dict(self) -> dict[str, int]:
        return {"count": self.count, "ns": self.ns}


@dataclass
class ModelStats:
    """What one model version did since it was loaded."""

    inference_count: int = 0  # images run (a batch of 8 counts 8)
    execution_count: int = 0  # engine runs
    last_inference_ms: int = 0  # epoch milliseconds of the last run; 0 = never
    success: _Duration = field(default_factory=_Duration)  # per image: received to answered
    fail: _Duration = field(default_factory=_Duration)
    queue: _Duration = field(default_factory=_Duration)
    compute_input: _Duration = field(default_factory=_Duration)  # decode + pre-processing
    compute_infer: _Duration = field(default_factory=_Duration)  # the run of the batch it was in
    batches: dict[int, _Duration] = field(default_factory=dict)  # batch size -> its runs
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def observe_execution(self, batch_size: int, seconds: float) -> None:
        with self._lock:
            self.execution_count += 1
            self.inference_count += batch_size
            self.last_inference_ms = int(time.time() * 1000)
            self.batches.setdefault(batch_size, _Duration()).add(seconds)

    def observe_success(self, total_s: float, *, queue_s: float, preprocess_s: float | None, infer_s: float) -> None:
        with self._lock:
            self.success.add(total_s)
            self.queue.add(queue_s)
            if preprocess_s is not None:  # pixels sent already pre-processed had none
                self.compute_input.add(preprocess_s)
            self.compute_infer.add(infer_s)

    def observe_failure(self, total_s: float) -> None:
        with self._lock:
            self.fail.add(total_s)

    def as_triton(self, name: str, version: str) -> dict:
        """One entry of Triton's ``model_stats`` list."""
        with self._lock:
            return {
                "name": name,
                "version": version,
                "last_inference": self.last_inference_ms,
                "inference_count": self.inference_count,
                "execution_count": self.execution_count,
                "inference_stats": {
                    "success": self.success.as_dict(),
                    "fail": self.fail.as_dict(),
                    "queue": self.queue.as_dict(),
                    "compute_input": self.compute_input.as_dict(),
                    "compute_infer": self.compute_infer.as_dict(),
                },
                "batch_stats": [
                    {"batch_size": size, "compute_infer": self.batches[size].as_dict()} for size in sorted(self.batches)
                ],
            }
