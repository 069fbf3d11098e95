"""The dynamic batcher with a fake engine that records batch sizes (LitServe-style behaviour tests)."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest

from service.core.errors import DeadlineExceeded, InferenceFailed, NotReady, Overloaded
from service.runtime.batcher import Batcher

# Only hangs fail on time: a request that waited for company it was promised not to wait for, or
# for an engine that never answers, runs into this; how long things take is bench/batcher.py's job.
HANG_S = 30
HOUR_MS = 3_600_000


def image(marker: float, size: int = 4) -> np.ndarray:
    pixels = np.zeros((3, size, size), dtype=np.float32)
    pixels[0, 0, 0] = marker  # the fake engine adds this to every logit, so each answer is traceable
    return pixels


def expected_logits(marker: float, size: int = 4, k: int = 10) -> np.ndarray:
    mean = marker / (3 * size * size)
    return (mean + np.arange(k) * 0.1 + marker).astype(np.float32)


def test_concurrent_requests_run_as_batches_and_each_gets_its_own_answer(make_fake_engine):
    engine = make_fake_engine(delay_s=0.05)

    async def main():
        batcher = Batcher(engine, max_batch_size=4, max_queue_delay_ms=20, max_queue_size=64)
        await batcher.start()
        results = await asyncio.gather(*(batcher.submit(image(float(i))) for i in range(10)))
        await batcher.stop()
        return results

    results = asyncio.run(main())
    for i, logits in enumerate(results):
        np.testing.assert_allclose(logits, expected_logits(float(i)), rtol=1e-6)
    # All ten are queued before the consumer wakes: full batches of 4, then the rest.
    assert engine.batch_sizes == [4, 4, 2]


def test_idle_request_is_dispatched_at_once(make_fake_engine):
    engine = make_fake_engine()

    async def main():
        # A queue delay far past the test's patience: a request that waited for company would time out.
        batcher = Batcher(engine, max_batch_size=32, max_queue_delay_ms=HOUR_MS, max_queue_size=64)
        await batcher.start()
        # Let the consumer reach its wait, as a server's batcher has long before traffic: an image
        # queued before the consumer's first look counts as piled up and waits for company.
        await asyncio.sleep(0)
        async with asyncio.timeout(HANG_S):
            await batcher.submit(image(1.0))
            await batcher.submit(image(2.0))
        await batcher.stop()

    asyncio.run(main())
    assert engine.batch_sizes == [1, 1]


def test_busy_engine_waits_for_more_but_at_most_the_queue_delay(make_fake_engine):
    engine = make_fake_engine(delay_s=0.05)

    async def main():
        batcher = Batcher(engine, max_batch_size=8, max_queue_delay_ms=500, max_queue_size=64)
        await batcher.start()
        first = asyncio.create_task(batcher.submit(image(0.0)))
        await asyncio.sleep(0.01)  # the engine is now busy with the first request
        second = asyncio.create_task(batcher.submit(image(1.0)))
        await asyncio.sleep(0.06)  # first batch done; the 2nd waits for company
        third = asyncio.create_task(batcher.submit(image(2.0)))
        # The batch of two never fills to 8: it runs once the 2nd's delay is spent, not never.
        async with asyncio.timeout(HANG_S):
            await asyncio.gather(first, second, third)
        await batcher.stop()

    asyncio.run(main())
    assert engine.batch_sizes == [1, 2]  # the 2nd and 3rd shared a batch


def test_failing_batch_fails_only_its_own_requests(make_fake_engine):
    # A batch that contains the poisoned image (marker 13) raises; others succeed.
    engine = make_fake_engine(delay_s=0.02, fail_when=lambda batch: bool((batch[:, 0, 0, 0] == 13).any()))

    async def main():
        batcher = Batcher(engine, max_batch_size=2, max_queue_delay_ms=50, max_queue_size=64)
        await batcher.start()
        tasks = [asyncio.create_task(batcher.submit(image(float(m)))) for m in (0, 13, 1, 2, 3, 4)]
        results = await asyncio.gather(*tasks, return_exceptions=True)
        after = await batcher.submit(image(7.0))  # the batcher still works after a failure
        await batcher.stop()
        return results, after

    results, after = asyncio.run(main())
    failed = [i for i, r in enumerate(results) if isinstance(r, InferenceFailed)]
    assert 1 in failed
    assert len(failed) <= 2  # at most the poisoned image's batch-mate fails with it
    assert all(isinstance(r, np.ndarray) for i, r in enumerate(results) if i not in failed)
    np.testing.assert_allclose(after, expected_logits(7.0), rtol=1e-6)


def test_late_requests_get_deadline_exceeded_and_are_not_run(make_fake_engine):
    engine = make_fake_engine(delay_s=1.0)

    async def main():
        batcher = Batcher(engine, max_batch_size=1, max_queue_delay_ms=0, max_queue_size=64)
        await batcher.start()
        blocker = asyncio.create_task(batcher.submit(image(0.0)))
        await asyncio.sleep(0.01)
        with pytest.raises(DeadlineExceeded):
            await batcher.submit(image(99.0), deadline=time.monotonic() + 0.05)
        # Answered at its deadline, while the engine is still busy with the blocker (1 s).
        answered_while_busy = not blocker.done()
        await blocker
        await batcher.stop()
        return answered_while_busy

    assert asyncio.run(main())
    assert engine.batch_sizes == [1]  # the late image was skipped, never run


def test_full_queue_answers_overloaded_at_once(make_fake_engine):
    engine = make_fake_engine(delay_s=0.2)

    async def main():
        batcher = Batcher(engine, max_batch_size=1, max_queue_delay_ms=0, max_queue_size=2)
        await batcher.start()
        running = asyncio.create_task(batcher.submit(image(0.0)))
        await asyncio.sleep(0.02)  # taken off the queue, running
        queued = [asyncio.create_task(batcher.submit(image(float(i)))) for i in (1, 2)]
        await asyncio.sleep(0)
        # Refused at once: before the running image or either queued one has been answered.
        with pytest.raises(Overloaded) as info:
            await batcher.submit(image(3.0))
        refused_while_full = not any(task.done() for task in (running, *queued))
        await asyncio.gather(running, *queued)
        await batcher.stop()
        return refused_while_full, info.value

    refused_while_full, error = asyncio.run(main())
    assert refused_while_full
    assert error.status_code == 429 and int(error.headers["Retry-After"]) >= 1


def test_cancelled_requests_are_skipped(make_fake_engine):
    engine = make_fake_engine(delay_s=0.1)

    async def main():
        batcher = Batcher(engine, max_batch_size=8, max_queue_delay_ms=0, max_queue_size=64)
        await batcher.start()
        running = asyncio.create_task(batcher.submit(image(0.0)))
        await asyncio.sleep(0.02)
        gone = [asyncio.create_task(batcher.submit(image(float(i)))) for i in (1, 2, 3)]
        stays = asyncio.create_task(batcher.submit(image(4.0)))
        await asyncio.sleep(0.01)
        for task in gone:  # the clients disconnected: their request tasks are cancelled
            task.cancel()
        await running
        logits = await stays
        await batcher.stop()
        return logits

    logits = asyncio.run(main())
    np.testing.assert_allclose(logits, expected_logits(4.0), rtol=1e-6)
    assert engine.batch_sizes == [1, 1]  # only the remaining client's image ran


def test_stop_drains_accepted_work_then_refuses(make_fake_engine):
    engine = make_fake_engine(delay_s=0.03)

    async def main():
        batcher = Batcher(engine, max_batch_size=2, max_queue_delay_ms=0, max_queue_size=64)
        await batcher.start()
        tasks = [asyncio.create_task(batcher.submit(image(float(i)))) for i in range(5)]
        await asyncio.sleep(0)
        await batcher.stop(drain=True)
        results = await asyncio.gather(*tasks)
        with pytest.raises(NotReady):
            await batcher.submit(image(9.0))
        return results

    results = asyncio.run(main())
    assert len(results) == 5 and sum(engine.batch_sizes) == 5


def test_constructor_validates_limits(make_fake_engine):
    with pytest.raises(ValueError, match="max_batch_size"):
        Batcher(make_fake_engine(), max_batch_size=0)
    with pytest.raises(ValueError, match="max_queue_delay_ms"):
        Batcher(make_fake_engine(), max_queue_delay_ms=-1)


def test_burst_after_a_full_batch_is_gathered_but_a_lone_client_never_waits(make_fake_engine):
    engine = make_fake_engine(delay_s=0.05)

    async def main():
        batcher = Batcher(engine, max_batch_size=8, max_queue_delay_ms=200, max_queue_size=64)
        await batcher.start()
        await asyncio.gather(*(batcher.submit(image(float(i))) for i in range(4)))  # one batch of 4
        # Its clients come back a few ms apart (closed loop): they share one batch.
        first = asyncio.create_task(batcher.submit(image(1.0)))
        await asyncio.sleep(0.005)
        second = asyncio.create_task(batcher.submit(image(2.0)))
        await asyncio.gather(first, second)
        await asyncio.sleep(0.3)  # the burst is over: a lone request goes at once
        lone = asyncio.create_task(batcher.submit(image(3.0)))
        # Had the lone request waited for company (up to 200 ms), this one, 100 ms later, would join it.
        await asyncio.sleep(0.1)
        later = asyncio.create_task(batcher.submit(image(4.0)))
        async with asyncio.timeout(HANG_S):
            await asyncio.gather(lone, later)
        await batcher.stop()

    asyncio.run(main())
    assert engine.batch_sizes == [4, 2, 1, 1]
