"""The adaptive dynamic batcher: many concurrent requests, one engine, one inference at a time.

One bounded ``asyncio.Queue`` and one consumer task. Each image is one queue item with its own
future. The consumer:

- blocks for the first item; if the engine was idle and nothing else is waiting, that item is
  dispatched at once (no added latency at low load), unless it heads a closed-loop burst (the
  previous batch held several requests and has just been answered: see ``_in_burst``);
- otherwise (requests piled up while the previous batch ran) takes everything waiting, up to
  ``max_batch_size``, and waits for more at most until the oldest item has been queued
  ``max_queue_delay_ms``: the delay is anchored at the oldest request, so no request waits
  longer than that for company;
- drops items whose future is already done (the client went away: its request task cancelled
  the future) and answers items past their deadline with DeadlineExceeded, without running them;
- runs the batch in a single worker thread (``engine.run``), and resolves every future on the
  event loop. An exception fails exactly that batch's futures and is logged.

Back-pressure: ``submit`` uses ``put_nowait``; a full queue raises Overloaded at once.

A second, low-priority lane (``submit_low``, used by batch-scoring jobs) shares the engine
without costing online requests their latency: a low-priority batch is formed only when no
online item is waiting AND no online item has been submitted or answered for
``low_priority_idle_ms`` (closed-loop clients send their next request right after an answer,
so "queue empty" alone would slip a job batch into every gap). Batches never mix lanes, so an
online request waits behind at most one low-priority batch that had already started.
asyncio + numpy only: no HTTP here.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from service.core.errors import DeadlineExceeded, InferenceFailed, NotReady, Overloaded

log = logging.getLogger("vitserve.batcher")


class BatchEngine(Protocol):
    def run(self, batch: np.ndarray) -> np.ndarray:  # (N, 3, H, W) -> (N, K)
        ...


@dataclass(eq=False)
class _Item:
    pixels: np.ndarray  # (3, H, W)
    future: asyncio.Future[np.ndarray]  # the logits (K,)
    enqueued_at: float  # time.monotonic()
    deadline: float | None  # time.monotonic() by which an answer is due
    timings: dict[str, float] | None = field(default=None)


BatchObserver = Callable[[int, float], None]  # (batch size, inference seconds)


class Batcher:
    """Groups concurrent ``submit`` calls into batches for one engine.

    Args:
        engine: anything with ``run(batch (N, 3, H, W)) -> logits (N, K)``; called from one
            worker thread, never concurrently.
        max_batch_size: most images in one ``engine.run`` call.
        max_queue_delay_ms: longest a queued request waits for a batch to fill once the engine
            is busy; 0 means never wait, take what is there.
        max_queue_size: images waiting beyond which ``submit`` answers Overloaded at once.
        on_batch: optional callback (batch size, inference seconds) after every batch, for metrics.
        low_priority_idle_ms: how long the online lane must have been quiet (nothing submitted or
            answered) before a ``submit_low`` batch may run.
        low_priority_batch_size: most images in one low-priority batch (default max_batch_size);
            smaller bounds how long an online request can wait behind a job batch already running.
    """

    def __init__(
        self,
        engine: BatchEngine,
        *,
        max_batch_size: int = 8,
        max_queue_delay_ms: float = 5.0,
        max_queue_size: int = 256,
        on_batch: BatchObserver | None = None,
        low_priority_idle_ms: float = 20.0,
        low_priority_batch_size: int | None = None,
    ) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        if max_queue_delay_ms < 0:
            raise ValueError(f"max_queue_delay_ms must be >= 0, got {max_queue_delay_ms}")
        if max_queue_size < 1:
            raise ValueError(f"max_queue_size must be >= 1, got {max_queue_size}")
        if low_priority_idle_ms < 0:
            raise ValueError(f"low_priority_idle_ms must be >= 0, got {low_priority_idle_ms}")
        self.engine = engine
        self.max_batch_size = max_batch_size
        self.max_queue_delay_s = max_queue_delay_ms / 1000.0
        self.max_queue_size = max_queue_size
        self.on_batch = on_batch
        self._queue: asyncio.Queue[_Item] | None = None
        self._consumer: asyncio.Task[None] | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._accepting = False
        self._in_flight = 0  # images taken off the queue whose batch has not finished
        self._last_batch_s = 0.0  # duration of the last engine.run, for Retry-After hints
        self._last_online_end_s = float("-inf")  # when the last online batch finished (monotonic)
        self._last_online_batch = 0  # its size
        self.low_priority_idle_s = low_priority_idle_ms / 1000.0
        self.low_priority_batch_size = min(low_priority_batch_size or max_batch_size, max_batch_size)
        self._low_queue: asyncio.Queue[_Item] | None = None
        self._wake: asyncio.Event | None = None  # set on every submit, either lane
        self._last_online_s = float("-inf")  # monotonic time of the last online submit or answer

    # -- lifecycle ---------------------------------------------------------------------------
    async def start(self) -> None:
        if self._consumer is not None:
            return
        self._queue = asyncio.Queue(maxsize=self.max_queue_size)
        self._low_queue = asyncio.Queue(maxsize=self.max_queue_size)
        self._wake = asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vitserve-infer")
        self._accepting = True
        self._consumer = asyncio.create_task(self._consume(), name="vitserve-batcher")

    async def stop(self, drain: bool = True) -> None:
        """Stop accepting; with ``drain`` finish everything already accepted, else fail it with NotReady."""
        self._accepting = False
        if self._consumer is None:
            return
        assert self._queue is not None
        if drain:
            await self._queue.join()  # every accepted item answered (run, skipped or failed)
        self._consumer.cancel()
        try:
            await self._consumer
        except asyncio.CancelledError:
            pass
        self._consumer = None
        for queue in (self._queue, self._low_queue):
            while queue is not None and not queue.empty():
                item = queue.get_nowait()
                if not item.future.done():
                    item.future.set_exception(NotReady("server is shutting down"))
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None

    @property
    def accepting(self) -> bool:
        return self._accepting

    @property
    def queue_depth(self) -> int:
        """Images waiting in the queue (not counting the batch running now)."""
        return self._queue.qsize() if self._queue is not None else 0

    @property
    def low_queue_depth(self) -> int:
        """Low-priority (job) images waiting."""
        return self._low_queue.qsize() if self._low_queue is not None else 0

    @property
    def in_flight(self) -> int:
        return self._in_flight

    @property
    def last_batch_s(self) -> float:
        """How long the last engine run took (what Retry-After hints are computed from)."""
        return self._last_batch_s

    # -- requests ----------------------------------------------------------------------------
    async def submit(
        self, pixels: np.ndarray, *, deadline: float | None = None, timings: dict[str, float] | None = None
    ) -> np.ndarray:
        """Queue one image (3, H, W) and wait for its logits (K,) float32.

        Args:
            pixels: the pre-processed image.
            deadline: ``time.monotonic()`` by which the answer is due; later -> DeadlineExceeded.
            timings: if given, filled with ``queue_ms``, ``inference_ms`` and ``batch_size``.

        Raises Overloaded (queue full), NotReady (not started or shutting down),
        DeadlineExceeded, InferenceFailed (the batch raised).
        """
        future = self.enqueue(pixels, deadline=deadline, timings=timings)
        enqueued_at = time.monotonic()
        try:
            if deadline is None:
                return await future
            async with asyncio.timeout(max(deadline - enqueued_at, 0.0)):
                return await future
        except TimeoutError:
            assert deadline is not None  # only the deadline's timeout raises it
            raise DeadlineExceeded(
                f"no answer within the request deadline ({(deadline - enqueued_at) * 1000:.0f} ms in the queue "
                "and engine)"
            ) from None
        finally:
            # Client gone (task cancelled) or timed out: mark the item so the consumer skips it.
            if not future.done():
                future.cancel()

    def enqueue(
        self, pixels: np.ndarray, *, deadline: float | None = None, timings: dict[str, float] | None = None
    ) -> asyncio.Future[np.ndarray]:
        """Queue one image and return the future of its logits, without waiting: ``submit`` for a
        caller that answers from a callback (the engine process: no task per image).

        Cancelling the future withdraws the image (the consumer skips it). Nothing times out here:
        an image still queued at its deadline is answered DeadlineExceeded when a batch is formed.
        Raises Overloaded, NotReady and DeadlineExceeded (deadline already passed) at once.
        """
        if not self._accepting or self._queue is None:
            raise NotReady("server is not accepting requests (starting up or shutting down)", retry_after_s=1)
        now = time.monotonic()
        if deadline is not None and deadline <= now:
            # Decoding (or a tiny client timeout) used the whole budget: queueing it would be wasted work.
            raise DeadlineExceeded(
                f"the request deadline passed {(now - deadline) * 1000:.0f} ms before the image reached the queue "
                "(decoding took longer than the time left); not run"
            )
        item = _Item(pixels, asyncio.get_running_loop().create_future(), now, deadline, timings)
        try:
            self._queue.put_nowait(item)
        except asyncio.QueueFull:
            raise self._overloaded() from None
        self._last_online_s = now
        assert self._wake is not None
        self._wake.set()
        return item.future

    def check_room(self) -> None:
        """Raise Overloaded now if the online queue is full (a later ``submit`` may still find it full).

        Lets a caller refuse before doing work for an image that could not be queued anyway.
        """
        if self._queue is not None and self._queue.full():
            raise self._overloaded()

    def _overloaded(self) -> Overloaded:
        return overloaded(self.max_queue_size, self.max_batch_size, self._last_batch_s)

    async def submit_low(self, pixels: np.ndarray) -> np.ndarray:
        """Queue one image (3, H, W) in the low-priority lane and wait for its logits (K,) float32.

        Runs only while the online lane is quiet (see the module docstring); no deadline.
        Raises Overloaded (low lane full), NotReady (not started or shutting down), InferenceFailed.
        """
        future = self.enqueue_low(pixels)
        try:
            return await future
        finally:
            if not future.done():
                future.cancel()

    def enqueue_low(self, pixels: np.ndarray) -> asyncio.Future[np.ndarray]:
        """``submit_low`` without waiting: the future of the logits (cancel it to withdraw the image)."""
        if not self._accepting or self._low_queue is None or self._wake is None:
            raise NotReady("server is not accepting work (starting up or shutting down)", retry_after_s=1)
        item = _Item(pixels, asyncio.get_running_loop().create_future(), time.monotonic(), None)
        try:
            self._low_queue.put_nowait(item)
        except asyncio.QueueFull:
            raise Overloaded(f"low-priority queue full ({self.max_queue_size} images waiting)") from None
        self._wake.set()
        return item.future

    # -- the consumer ------------------------------------------------------------------------
    def _take(
        self, batch: list[_Item], now: float, queue: asyncio.Queue[_Item] | None = None, limit: int | None = None
    ) -> None:
        """Move waiting items into ``batch`` (up to the limit), answering dead ones on the spot."""
        queue = queue or self._queue
        assert queue is not None
        while len(batch) < (limit or self.max_batch_size):
            try:
                item = queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            self._admit(item, batch, now, queue)

    def _admit(self, item: _Item, batch: list[_Item], now: float, queue: asyncio.Queue[_Item] | None = None) -> None:
        queue = queue or self._queue
        assert queue is not None
        if item.future.done():  # the client went away (or its deadline fired in submit)
            queue.task_done()
        elif item.deadline is not None and now >= item.deadline:
            item.future.set_exception(DeadlineExceeded("request deadline passed while queued; not run"))
            queue.task_done()
        else:
            batch.append(item)

    def _low_wait_s(self) -> float | None:
        """None: no low-priority work may run; 0: it may run now; > 0: the online lane was busy that recently."""
        if not self._accepting or self._low_queue is None or self._low_queue.empty():
            return None
        return max(0.0, self._last_online_s + self.low_priority_idle_s - time.monotonic())

    async def _serve_low_until_online(self) -> bool:
        """While no online item waits, run low-priority batches when allowed, else sleep until woken.

        Returns True when a low-priority batch ran (the engine was busy, as far as online items know).
        """
        assert self._queue is not None and self._low_queue is not None and self._wake is not None
        ran = False
        while self._queue.empty():
            wait_s = self._low_wait_s()
            if wait_s == 0.0:
                batch: list[_Item] = []
                self._take(batch, time.monotonic(), self._low_queue, self.low_priority_batch_size)
                if batch:
                    await self._run(batch, self._low_queue)
                    ran = True
                continue
            self._wake.clear()
            try:
                async with asyncio.timeout(wait_s):
                    await self._wake.wait()
            except TimeoutError:
                pass
        return ran

    async def _consume(self) -> None:
        assert self._queue is not None
        while True:
            batch: list[_Item] = []
            was_idle = self._queue.empty()
            if was_idle:
                was_idle = not await self._serve_low_until_online()
            first = self._queue.get_nowait()
            if was_idle and self._in_burst(first.enqueued_at):
                was_idle = False
            self._admit(first, batch, time.monotonic())
            self._take(batch, time.monotonic())
            # Busy engine (items had piled up): fill the batch until the oldest item's delay is spent.
            if not was_idle and self.max_queue_delay_s > 0:
                while batch and len(batch) < self.max_batch_size:
                    wait_s = batch[0].enqueued_at + self.max_queue_delay_s - time.monotonic()
                    if wait_s <= 0:
                        break
                    try:
                        async with asyncio.timeout(wait_s):
                            item = await self._queue.get()
                    except TimeoutError:
                        break
                    self._admit(item, batch, time.monotonic())
                    self._take(batch, time.monotonic())
            if batch:
                await self._run(batch)

    def _in_burst(self, arrived_at: float) -> bool:
        """Whether an arrival to an empty queue is the head of a closed-loop burst.

        The previous online batch held several requests and ended less than its own duration ago:
        its clients are sending their next requests right now, and the first to arrive is only a
        few milliseconds ahead of the rest. Waiting (at most max_queue_delay_ms) lets them share
        one batch instead of splitting into a batch of one plus the others. A lone client (batches
        of one) never waits.
        """
        return self._last_online_batch > 1 and arrived_at - self._last_online_end_s < max(
            self._last_batch_s, self.max_queue_delay_s
        )

    async def _run(self, batch: list[_Item], queue: asyncio.Queue[_Item] | None = None) -> None:
        queue = queue or self._queue
        assert queue is not None and self._executor is not None
        loop = asyncio.get_running_loop()
        self._in_flight = len(batch)
        started = time.monotonic()
        try:
            logits = await loop.run_in_executor(
                self._executor, _stack_and_run, self.engine, [item.pixels for item in batch]
            )
        except asyncio.CancelledError:
            # stop(drain=False) cancelled us mid-batch: nobody will resolve these otherwise.
            for item in batch:
                if not item.future.done():
                    item.future.set_exception(NotReady("server is shutting down"))
            raise
        except Exception as exc:  # noqa: BLE001 - any engine failure fails this batch only
            log.exception("inference failed for a batch of %d images", len(batch))
            error = InferenceFailed(f"inference failed for this batch of {len(batch)}: {type(exc).__name__}: {exc}")
            for item in batch:
                if not item.future.done():
                    item.future.set_exception(error)
        else:
            elapsed = time.monotonic() - started
            self._last_batch_s = elapsed
            for row, item in enumerate(batch):
                if item.timings is not None:
                    item.timings["queue_ms"] = (started - item.enqueued_at) * 1000.0
                    item.timings["inference_ms"] = elapsed * 1000.0
                    item.timings["batch_size"] = len(batch)
                if not item.future.done():
                    item.future.set_result(logits[row])
            if self.on_batch is not None:
                try:
                    self.on_batch(len(batch), elapsed)
                except Exception:  # noqa: BLE001 - metrics must never break serving
                    log.exception("batch observer failed")
        finally:
            self._in_flight = 0
            if queue is self._queue:
                self._last_online_s = time.monotonic()  # clients answered now send their next request soon
                self._last_online_end_s = self._last_online_s
                self._last_online_batch = len(batch)
            for _ in batch:
                queue.task_done()


def overloaded(max_queue_size: int, max_batch_size: int, last_batch_s: float) -> Overloaded:
    """The answer to an image that finds the queue full: retry once the queue has had time to drain."""
    return Overloaded(
        f"queue full ({max_queue_size} images waiting); retry later",
        retry_after_s=max(1.0, last_batch_s * max_queue_size / max(1, max_batch_size)),
    )


def _stack_and_run(engine: BatchEngine, images: list[np.ndarray]) -> np.ndarray:
    batch = np.stack(images)  # (N, 3, H, W)
    logits = np.asarray(engine.run(batch), dtype=np.float32)  # (N, K)
    if logits.ndim != 2 or logits.shape[0] != len(images):
        raise ValueError(f"engine returned shape {logits.shape} for a batch of {len(images)}")
    return logits
