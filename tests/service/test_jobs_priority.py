"""The batcher's low-priority lane (scoring jobs): it uses the idle engine and never delays online requests."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest

from service.core.errors import NotReady
from service.runtime.batcher import Batcher

ONLINE, LOW = 1.0, -1.0


class LaneRecordingEngine:
    """Records, for every batch, which lanes its images came from (pixel [0, 0, 0] marks the lane)."""

    def __init__(self, delay_s: float) -> None:
        self.delay_s = delay_s
        self.batches: list[tuple[float, ...]] = []
        self.started_at: list[float] = []

    def run(self, batch: np.ndarray) -> np.ndarray:
        self.started_at.append(time.monotonic())
        self.batches.append(tuple(float(v) for v in batch[:, 0, 0, 0]))
        time.sleep(self.delay_s)
        return batch[:, 0, 0, :2].astype(np.float32)  # (N, 2): each image's marker and its index


def image(lane: float, index: int) -> np.ndarray:
    pixels = np.zeros((3, 4, 4), dtype=np.float32)
    pixels[0, 0, 0] = lane
    pixels[0, 0, 1] = index
    return pixels


def test_low_priority_items_use_the_idle_engine_and_get_their_own_answers():
    engine = LaneRecordingEngine(delay_s=0.001)

    async def main():
        batcher = Batcher(
            engine, max_batch_size=4, max_queue_delay_ms=2, low_priority_idle_ms=5, low_priority_batch_size=3
        )
        await batcher.start()
        results = await asyncio.gather(*(batcher.submit_low(image(LOW, i)) for i in range(10)))
        await batcher.stop()
        return results

    results = asyncio.run(main())
    assert [int(r[1]) for r in results] == list(range(10))
    assert sorted(len(b) for b in engine.batches) == [1, 3, 3, 3]  # low_priority_batch_size bounds them


def test_online_traffic_starves_the_low_lane():
    """Closed-loop online clients: no job batch may start while they keep the engine busy (so none
    of them ever waits behind one); the job finishes once they stop. Their latency with and without
    a job in the low lane: bench/batcher.py."""

    async def main() -> int:
        # idle 100 ms vs the clients' 2 ms turnaround: wide margin for a loaded CI machine
        batcher = Batcher(engine, max_batch_size=4, max_queue_delay_ms=2, low_priority_idle_ms=100)
        await batcher.start()
        job = [asyncio.create_task(batcher.submit_low(image(LOW, i))) for i in range(40)]
        stop_at = time.monotonic() + 0.6

        async def client(n: int) -> None:
            while time.monotonic() < stop_at:
                await batcher.submit(image(ONLINE, n))
                await asyncio.sleep(0.002)  # the client's own turnaround (network, pre-processing)

        async with asyncio.timeout(30):
            await asyncio.gather(*(client(n) for n in range(4)))
            low_done_during_online = sum(t.done() for t in job)
            await asyncio.gather(*job)  # once online traffic stops, the job finishes
        await batcher.stop()
        return low_done_during_online

    engine = LaneRecordingEngine(delay_s=0.01)
    low_done_during_online = asyncio.run(main())
    assert low_done_during_online == 0, "a job batch ran while online clients kept the engine busy"
    assert all(len(set(b)) == 1 for b in engine.batches), "a batch mixed online and job images"
    last_online = max(i for i, b in enumerate(engine.batches) if ONLINE in b)
    assert not any(LOW in b for b in engine.batches[:last_online]), engine.batches
    assert sum(b.count(LOW) for b in engine.batches) == 40


def test_online_request_waits_at_most_one_low_batch():
    engine = LaneRecordingEngine(delay_s=0.05)

    async def main():
        batcher = Batcher(engine, max_batch_size=4, max_queue_delay_ms=2, low_priority_idle_ms=0)
        await batcher.start()
        job = [asyncio.create_task(batcher.submit_low(image(LOW, i))) for i in range(40)]
        await asyncio.sleep(0.075)  # a job batch is running now
        started_before = len(engine.batches)
        async with asyncio.timeout(30):
            await batcher.submit(image(ONLINE, 0))
            await asyncio.gather(*job)
        await batcher.stop()
        return started_before

    started_before = asyncio.run(main())
    # Right after the job batch that was running (FIFO would put it behind all ten).
    online_at = [i for i, b in enumerate(engine.batches) if ONLINE in b]
    assert online_at == [started_before], engine.batches


def test_stop_fails_waiting_low_items_with_not_ready():
    engine = LaneRecordingEngine(delay_s=0.05)

    async def main():
        batcher = Batcher(engine, max_batch_size=2, low_priority_idle_ms=0)
        await batcher.start()
        job = [asyncio.create_task(batcher.submit_low(image(LOW, i))) for i in range(10)]
        await asyncio.sleep(0.01)
        await batcher.stop(drain=True)  # drains online work only: jobs are durable and resume later
        with pytest.raises(NotReady):
            await batcher.submit_low(image(LOW, 99))
        return await asyncio.gather(*job, return_exceptions=True)

    outcomes = asyncio.run(main())
    assert any(isinstance(o, NotReady) for o in outcomes)
    assert len(engine.batches) <= 2
