"""Bounds on decoding work: per request, and for the whole process.

A decode costs CPU and memory in proportion to the pixels it touches (known before it starts:
service/runtime/decode_guards.py). Two bounds use that figure:

- ``PixelGate``, one per process: the pixels being decoded at once, in every thread (online and
  job decoding). A decode that would cross it waits (in its thread, until its deadline), so
  peak memory stays bounded however many large images arrive together.
- ``RequestDecodes``, one per request: a pixel budget for all of the request's images (a batch of
  24 large images is refused past the budget instead of taking a minute of every core), at most
  ``max_concurrent`` of its images in the pre-processing pool at once (one request never holds
  every thread: other clients' images pass between its decodes), and a stop check before each
  decode starts (deadline passed, client gone): work nobody will read is not done.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Executor
from contextlib import contextmanager
from typing import TYPE_CHECKING, TypeVar

from service.core.errors import DeadlineExceeded, PayloadTooLarge, ServiceError

if TYPE_CHECKING:
    from service.runtime.preprocess import Admit

T = TypeVar("T")
_POLL_S = 0.05  # how often a decode waiting at the gate looks at its deadline and its client


class PixelGate:
    """Pixels being decoded at once in this process, across threads.

    Args:
        capacity: most pixels decoded at once; a single decode over it waits for an idle gate
            (callers check images against a smaller per-image limit first).
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._in_use = 0
        self._cond = threading.Condition()

    @property
    def in_use(self) -> int:
        return self._in_use

    @contextmanager
    def hold(
        self, pixels: int, *, deadline: float | None = None, check: Callable[[], None] | None = None
    ) -> Iterator[None]:
        """Hold ``pixels`` of the gate while the block runs; wait for room first.

        ``check`` is called while waiting (it raises to give up, e.g. the client left);
        past ``deadline`` (time.monotonic) the wait ends with DeadlineExceeded.
        """
        with self._cond:
            while self._in_use and self._in_use + pixels > self.capacity:
                if check is not None:
                    check()
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise DeadlineExceeded(
                        "deadline passed while the image waited for decoding room (other large images were decoding)"
                    )
                self._cond.wait(_POLL_S if remaining is None else min(_POLL_S, remaining))
            self._in_use += pixels
        try:
            yield
        finally:
            with self._cond:
                self._in_use -= pixels
                self._cond.notify_all()


class RequestDecodes:
    """One request's share of decoding: pixel budget, concurrent decodes, stop checks.

    Args:
        pixel_budget: most pixels all of the request's images may decode together.
        max_concurrent: most of its images in the pre-processing pool at once.
        deadline: time.monotonic() after which nothing more is decoded (DeadlineExceeded).
        gate: the process-wide PixelGate, or None.
    """

    def __init__(self, *, pixel_budget: int, max_concurrent: int, deadline: float, gate: PixelGate | None) -> None:
        self.pixel_budget = pixel_budget
        self.deadline = deadline
        self.gate = gate
        self._slots = asyncio.Semaphore(max(1, max_concurrent))
        self._lock = threading.Lock()
        self._spent = 0
        self._stopped: ServiceError | None = None

    @property
    def spent(self) -> int:
        return self._spent

    def stop(self, error: ServiceError) -> None:
        """Nothing more is decoded for this request: later decodes raise ``error`` (e.g. ClientClosedRequest)."""
        self._stopped = error

    def check(self) -> None:
        """Raise if this request's decoding should not go on (called before each decode, and while waiting)."""
        if self._stopped is not None:
            raise self._stopped
        if time.monotonic() >= self.deadline:
            raise DeadlineExceeded("deadline passed before the image was decoded")

    async def run(self, pool: Executor, work: Callable[[Admit], T]) -> T:
        """Run ``work(admit)`` in ``pool`` once one of this request's decode slots is free."""
        async with self._slots:
            self.check()
            return await asyncio.get_running_loop().run_in_executor(pool, work, self.admit)

    @contextmanager
    def admit(self, pixels: int) -> Iterator[None]:
        """Entered (in the decoding thread) with a checked image's pixels, before any is decoded."""
        self.check()
        with self._lock:
            if self._spent + pixels > self.pixel_budget:
                raise PayloadTooLarge(
                    f"this request's images decode to more than {self.pixel_budget} pixels together "
                    f"(max_request_pixels); this one ({pixels} pixels) was not decoded"
                )
            self._spent += pixels
        if self.gate is None:
            yield
            return
        with self.gate.hold(pixels, deadline=self.deadline, check=self.check):
            yield
