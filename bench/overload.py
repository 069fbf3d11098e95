"""How fast overload is refused and what throughput survives it; how slow uploads affect other clients.

    .venv/bin/python bench/overload.py [--seconds 6] [--repeat 1]

Runs the reliability tests' own scenarios (tests/reliability/scenarios.py) against the same real
server (tests/reliability/fault_server.py: the production server and ONNX Runtime engine serving a
random-weight ViT-tiny, every batch made 100 ms slower so the engine is the bottleneck) on
127.0.0.1, bounded in time, and prints what the tests do not assert (docs/RELIABILITY.md):

1. overload: as many closed-loop clients as the queue holds (8) for half the time, then four times
   as many: answers/s of each phase and their ratio (refusing must not cost the engine its work),
   200 p99, 429 latency client-side (p50/p99) and server-side (share within 25 ms / 250 ms).
2. slow clients: 16 uploads trickling in 64 bytes at a time for 3 s while one client sends fast
   requests back to back: how many, and their latency (p50 / max).

Needs the model extra (torch) to export the test model. On a shared machine the rates move with
other load: run it twice and trust differences beyond the spread.
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests"), str(REPO / "tests" / "reliability")]

from load_generator import LOST, percentile  # noqa: E402 - needs sys.path above
from reliability_lib import SERVICE_FIXTURES, LiveServer, metric  # noqa: E402 - needs sys.path above
from scenarios import (  # noqa: E402 - needs sys.path above
    OVERLOAD_ENV,
    OVERLOAD_QUEUE,
    SLOW_CLIENTS_ENV,
    run_overload,
    run_slow_clients,
)


def overload(model: Path, workdir: Path, seconds: float) -> list[str]:
    server = LiveServer(model, workdir, OVERLOAD_ENV).wait_ready()
    try:
        run = run_overload(server, seconds)
    finally:
        server.terminate(timeout_s=30)
    unloaded, loaded = run.unloaded, run.loaded
    labels = 'method="POST",route="/v1/classify",status="429"'
    total = metric(run.metrics, f"vitserve_request_duration_seconds_count{{{labels}}}")
    within = {
        le: metric(run.metrics, f'vitserve_request_duration_seconds_bucket{{le="{le}",{labels}}}')
        for le in ("0.025", "0.25")
    }
    ms = 1000.0
    return [
        f"| {OVERLOAD_QUEUE} clients, {seconds / 2:g} s | {unloaded.rate(200):.1f} | | {unloaded.statuses()} "
        f"| {percentile(unloaded.latencies(200), 0.99) * ms:.0f} | | |",
        f"| {4 * OVERLOAD_QUEUE} clients, {seconds:g} s | {loaded.rate(200):.1f} "
        f"| {loaded.rate(200) / unloaded.rate(200):.2f} | {loaded.statuses()} "
        f"| {percentile(loaded.latencies(200), 0.99) * ms:.0f} "
        f"| {percentile(loaded.latencies(429), 0.5) * ms:.1f} / {percentile(loaded.latencies(429), 0.99) * ms:.1f} "
        f"| {within['0.025']:.0f} / {within['0.25']:.0f} of {total:.0f} |"
        + (" LOST requests!" if LOST in loaded.statuses() else ""),
    ]


def slow_clients(model: Path, workdir: Path) -> str:
    server = LiveServer(model, workdir, SLOW_CLIENTS_ENV).wait_ready()
    try:
        run = run_slow_clients(server)
    finally:
        server.terminate(timeout_s=30)
    seconds = sorted(s for _, s in run.fast)
    statuses = sorted({status for status, _ in run.fast})
    ok = sum(answer == b"HTTP/1.1 200 OK" for answer in run.slow_answers)
    return (
        f"| {len(run.slow_answers)} | {len(run.fast)} | {statuses} | {percentile(seconds, 0.5) * 1000:.0f} "
        f"| {max(seconds) * 1000:.0f} | {ok} of {len(run.slow_answers)} |"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=6.0, help="overloaded phase length (unloaded: half)")
    parser.add_argument("--repeat", type=int, default=1, help="runs of each scenario (the machine is shared)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="vitserve-bench-overload-") as tmp:
        workdir = Path(tmp)
        model = workdir / "tiny_vit.onnx"
        SERVICE_FIXTURES.export_tiny_vit(model)
        when = f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC"
        print(f"# bench/overload.py, {when}, {platform.node()}, python {platform.python_version()}")
        print("\n## Overload (queue 8, batch 4, engine 100 ms per batch = 40 images/s, deadline 5 s)\n")
        print(
            "| clients | 200/s | vs unloaded | statuses | 200 p99 ms | 429 p50 / p99 ms (client) "
            "| 429s within 25 / 250 ms (server) |"
        )
        print("|---|---:|---:|---|---:|---:|---|")
        for _ in range(args.repeat):
            for row in overload(model, workdir, args.seconds):
                print(row, flush=True)
        print("\n## Slow clients (16 uploads at 64 bytes per round for 3 s, fast requests meanwhile)\n")
        print("| slow uploads | fast requests | fast statuses | fast p50 ms | fast max ms | slow ones answered 200 |")
        print("|---:|---:|---|---:|---:|---|")
        for _ in range(args.repeat):
            print(slow_clients(model, workdir), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
