"""What the serving layer needs from "the batcher": ``BatchQueue``.

In one process it is service/runtime/batcher.py's ``Batcher``. In a front-end worker of a
multi-process server it is service/serving/engine_client.py's ``EngineClient``, which forwards each
image (through shared memory) to the one batcher in the engine process. Routes, the gRPC front end
and the job runner only use these members, so they work unchanged either way.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np


class BatchQueue(Protocol):
    @property
    def accepting(self) -> bool: ...

    @property
    def queue_depth(self) -> int:
        """Images waiting (in the one shared queue)."""
        ...

    def check_room(self) -> None:
        """Raise Overloaded now if the queue is full (before any work is done for an image)."""
        ...

    async def submit(
        self, pixels: np.ndarray, *, deadline: float | None = None, timings: dict[str, float] | None = None
    ) -> np.ndarray: ...

    async def submit_low(self, pixels: np.ndarray) -> np.ndarray: ...

    async def stop(self, drain: bool = True) -> None: ...
