"""The dynamic batcher with a fake engine that records batch sizes (LitServe-style behaviour tests)."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest

from service.core.errors import DeadlineExceeded, InferenceFailed, NotReady, Overloaded
from service.runtime.batcher import Batcher


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
        batcher = Batcher(engine, max_batch_size=32, max_queue_delay_ms=500, max_queue_size=64)
        await batcher.start()
        await batcher.submit(image(1.0))  # first call pays thread-pool start-up
        started = time.perf_counter()
        await batcher.submit(image(2.0))
        elapsed = time.perf_counter() - started
        await batcher.stop()
        return elapsed

    elapsed = asyncio.run(main())
    assert elapsed < 0.1, f"an idle request waited {elapsed * 1000:.0f} ms; the queue delay is 500 ms"
    assert engine.batch_sizes == [1, 1]


def test_busy_engine_waits_for_more_but_at_most_the_queue_delay(make_fake_engine):
    engine = make_fake_engine(delay_s=0.05)

    async def main():
        batcher = Batcher(engine, max_batch_size=8, max_queue_delay_ms=100, max_queue_size=64)
        await batcher.start()
        first = asyncio.create_task(batcher.submit(image(0.0)))
        await asyncio.sleep(0.01)  # the engine is now busy with the first request
        second = asyncio.create_task(batcher.submit(image(1.0)))
        await asyncio.sleep(0.06)  # first batch done; the 2nd waits for company
        third = asyncio.create_task(batcher.submit(image(2.0)))
        started = time.perf_counter()
        await asyncio.gather(first, second, third)
        waited = time.perf_counter() - started
        await batcher.stop()
        return waited

    waited = asyncio.run(main())
    assert engine.batch_sizes == [1, 2]  # the 2nd and 3rd shared a batch
    assert waited < 0.2  # bounded by the 100 ms delay (anchored at the 2nd) + a 50 ms run


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
    engine = make_fake_engine(delay_s=0.4)

    async def main():
        batcher = Batcher(engine, max_batch_size=1, max_queue_delay_ms=0, max_queue_size=64)
        await batcher.start()
        blocker = asyncio.create_task(batcher.submit(image(0.0)))
        await asyncio.sleep(0.01)
        started = time.perf_counter()
        with pytest.raises(DeadlineExceeded):
            await batcher.submit(image(99.0), deadline=time.monotonic() + 0.05)
        answered_after = time.perf_counter() - started
        await blocker
        await batcher.stop()
        return answered_after

    answered_after = asyncio.run(main())
    assert answered_after < 0.3  # answered at its deadline (50 ms), not when the engine got to it (400 ms)
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
        started = time.perf_counter()
        with pytest.raises(Overloaded) as info:
            await batcher.submit(image(3.0))
        rejected_in = time.perf_counter() - started
        await asyncio.gather(running, *queued)
        await batcher.stop()
        return rejected_in, info.value

    rejected_in, error = asyncio.run(main())
    assert rejected_in < 0.01
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
        started = time.perf_counter()
        await batcher.submit(image(3.0))
        lone = time.perf_counter() - started
        await batcher.stop()
        return lone

    lone = asyncio.run(main())
    assert engine.batch_sizes == [4, 2, 1]
    assert lone < 0.05 + 0.1  # its run (50 ms), without the 200 ms queue delay
