"""The dynamic batcher's latencies, in-process with a fake engine of known run time.

    .venv/bin/python bench/batcher.py [--repeat 20]

tests/service/test_batcher.py and test_jobs_priority.py assert what the batcher does (who shares a
batch, what is refused or skipped, which lane runs when); this prints how long each of those takes,
``--repeat`` times each, median and worst, so that a change to the batcher shows in figures:

- an idle request with a 500 ms queue delay (dispatched at once: the delay never applies);
- a request that arrives while the engine is busy (50 ms runs) and that nobody joins: it waits
  for company at most the queue delay (100 ms), anchored at its arrival;
- a request whose deadline (50 ms) passes behind a 400 ms run: answered at the deadline;
- a request refused by a full queue;
- a lone client right after a closed-loop burst has ended (200 ms queue delay, 50 ms runs);
- online latency (4 closed-loop clients, 10 ms runs) with and without a 40-image job in the low lane;
- an online request arriving while a 50 ms job batch runs.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from service.core.errors import DeadlineExceeded, Overloaded  # noqa: E402 - needs sys.path above
from service.runtime.batcher import Batcher  # noqa: E402 - needs sys.path above


def _fake_engine_class() -> type:
    """tests/service/conftest.py's FakeEngine: deterministic logits after ``delay_s`` per run."""
    spec = importlib.util.spec_from_file_location("vitserve_service_conftest_bench", REPO / "tests/service/conftest.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.FakeEngine


FakeEngine = _fake_engine_class()


def image(marker: float = 0.0) -> np.ndarray:
    pixels = np.zeros((3, 4, 4), dtype=np.float32)
    pixels[0, 0, 0] = marker
    return pixels


async def started(engine: object, **options: float) -> Batcher:
    batcher = Batcher(engine, max_queue_size=256, **options)
    await batcher.start()
    await asyncio.sleep(0)  # the consumer waits for work, as in a running server
    await batcher.submit(image())  # thread-pool start-up is not part of any figure
    return batcher


async def timed(awaitable: Awaitable[object]) -> float:
    t0 = time.perf_counter()
    try:
        await awaitable
    except (DeadlineExceeded, Overloaded):
        pass
    return time.perf_counter() - t0


async def idle() -> float:
    batcher = await started(FakeEngine(), max_batch_size=32, max_queue_delay_ms=500)
    seconds = await timed(batcher.submit(image(1.0)))
    await batcher.stop()
    return seconds


async def behind_a_running_batch(engine_delay_s: float, deadline_s: float | None = None, **options: float) -> float:
    """One request sent 10 ms into another's run, with nobody else around."""
    batcher = await started(FakeEngine(delay_s=engine_delay_s), **options)
    blocker = asyncio.create_task(batcher.submit(image(0.0)))
    await asyncio.sleep(0.01)
    deadline = None if deadline_s is None else time.monotonic() + deadline_s
    seconds = await timed(batcher.submit(image(1.0), deadline=deadline))
    await blocker
    await batcher.stop()
    return seconds


async def refused() -> float:
    batcher = Batcher(FakeEngine(delay_s=0.05), max_batch_size=1, max_queue_delay_ms=0, max_queue_size=2)
    await batcher.start()
    await asyncio.sleep(0)
    running = asyncio.create_task(batcher.submit(image(0.0)))
    await asyncio.sleep(0.01)
    queued = [asyncio.create_task(batcher.submit(image(float(i)))) for i in (1, 2)]
    await asyncio.sleep(0)
    seconds = await timed(batcher.submit(image(3.0)))
    await asyncio.gather(running, *queued)
    await batcher.stop()
    return seconds


async def lone_after_burst() -> float:
    batcher = await started(FakeEngine(delay_s=0.05), max_batch_size=8, max_queue_delay_ms=200)
    await asyncio.gather(*(batcher.submit(image(float(i))) for i in range(4)))
    await asyncio.sleep(0.3)  # the burst's window is over
    seconds = await timed(batcher.submit(image(3.0)))
    await batcher.stop()
    return seconds


async def online_p50(with_job: bool) -> float:
    batcher = await started(FakeEngine(delay_s=0.01), max_batch_size=4, max_queue_delay_ms=2, low_priority_idle_ms=100)
    job = [asyncio.create_task(batcher.submit_low(image(-1.0))) for _ in range(40)] if with_job else []
    latencies: list[float] = []
    stop_at = time.monotonic() + 0.6

    async def client(n: int) -> None:
        while time.monotonic() < stop_at:
            latencies.append(await timed(batcher.submit(image(float(n)))))
            await asyncio.sleep(0.002)  # the client's own turnaround

    await asyncio.gather(*(client(n) for n in range(4)))
    await asyncio.gather(*job)
    await batcher.stop()
    return statistics.median(latencies)


async def behind_a_job_batch() -> float:
    batcher = await started(FakeEngine(delay_s=0.05), max_batch_size=4, max_queue_delay_ms=2, low_priority_idle_ms=0)
    job = [asyncio.create_task(batcher.submit_low(image(-1.0))) for _ in range(40)]
    await asyncio.sleep(0.075)  # a job batch is running now
    seconds = await timed(batcher.submit(image(1.0)))
    await asyncio.gather(*job)
    await batcher.stop()
    return seconds


CASES: list[tuple[str, str, Callable[[], Awaitable[float]]]] = [
    ("idle request, 500 ms queue delay", "~0 (no delay)", idle),
    (
        "alone behind a busy engine (50 ms runs, 100 ms delay)",
        "~150 (delay + own run)",
        lambda: behind_a_running_batch(0.05, max_batch_size=8, max_queue_delay_ms=100),
    ),
    (
        "deadline 50 ms behind a 400 ms run",
        "~50",
        lambda: behind_a_running_batch(0.4, deadline_s=0.05, max_batch_size=1, max_queue_delay_ms=0),
    ),
    ("refused by a full queue", "~0", refused),
    ("lone client after a burst (50 ms runs, 200 ms delay)", "~50 (its run)", lone_after_burst),
    ("online p50, 4 clients, 10 ms runs, no job", "", lambda: online_p50(with_job=False)),
    ("online p50, same, 40-image job in the low lane", "~ as without", lambda: online_p50(with_job=True)),
    ("online request while a 50 ms job batch runs", "<= ~100 (rest + own run)", behind_a_job_batch),
]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=20, help="runs of each case (median and worst are printed)")
    args = parser.parse_args()
    print("| case | expected ms | median ms | worst ms |")
    print("|---|---:|---:|---:|")
    for name, expected, case in CASES:
        seconds = [asyncio.run(case()) for _ in range(max(1, args.repeat))]
        print(
            f"| {name} | {expected} | {statistics.median(seconds) * 1e3:.2f} | {max(seconds) * 1e3:.2f} |", flush=True
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
