"""The engine process's cost per image, alone: a fake front-end worker drives the real engine process.

    .venv/bin/python bench/engine_hop.py [--in-flight 8,64] [--seconds 5] [--clients 1]

One process forks the engine process exactly as ``vitserve serve --workers N`` does
(service/serving/engine_process.py: the batcher and the ONNX Runtime session of the near-free model
of bench/serve.py, so inference costs microseconds) and connects ``--clients`` ``EngineClient``s to
it, each keeping ``--in-flight`` images queued: every answer sends the next image (copied into its
ring slot, its slot number on the socket). No HTTP and no decoding, so what is measured is the hop
itself: the engine's CPU per image (SUBMIT parsing, the batcher, stacking the batch from the rings,
the session call, the RESULT frames) and the client's (the slot copy, the frames, the futures).

On a GPU host the engine process is one process for the whole device: its CPU microseconds per
image bound the images/s the front end can ever feed it (1e6 / us_per_image on one core).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))


def cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def drive(clients, in_flight: int, seconds: float, engine_pid: int) -> dict:
    pixels = np.random.default_rng(0).normal(size=(3, 224, 224)).astype(np.float32)
    lanes = []
    for client in clients:
        lane = client.snapshot.lanes[0]
        lanes.append((client, lane.name, lane.version))
    done = 0
    stop_at = 0.0

    async def loop(client, name, version) -> None:
        nonlocal done
        while time.perf_counter() < stop_at:
            await client.send_image(pixels, lane=0, model=name, version=version)
            done += 1

    for warm in (True, False):
        done = 0
        stop_at = time.perf_counter() + (1.0 if warm else seconds)
        engine_before, self_before, started = cpu_s(engine_pid), time.process_time(), time.perf_counter()
        await asyncio.gather(*(loop(*lane) for lane in lanes for _ in range(in_flight)))
        elapsed = time.perf_counter() - started
    return {
        "images_s": done / elapsed,
        "engine_us": (cpu_s(engine_pid) - engine_before) * 1e6 / done,
        "client_us": (time.process_time() - self_before) * 1e6 / done,
    }


async def run_clients(socket_path: Path, control, count: int, levels: list[int], seconds: float, pid: int) -> list:
    from service.serving.engine_client import EngineClient

    clients = [EngineClient(socket_path, index, control, ring_slots=max(levels) + 16) for index in range(count)]
    for client in clients:
        await client.connect(timeout_s=120)
    rows = [(level, await drive(clients, level, seconds, pid)) for level in levels]
    for client in clients:
        await client.stop(drain=True)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--in-flight", default="1,8,64", help="comma list: images each client keeps queued")
    parser.add_argument("--clients", type=int, default=1, help="fake workers (one ring and socket each)")
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--max-batch-size", type=int, default=8)
    args = parser.parse_args()
    levels = [int(x) for x in args.in_flight.split(",")]

    from serve import write_near_free_model

    from service.core.settings import Settings
    from service.runtime.engine import Engine
    from service.serving.control_block import ControlBlock
    from service.serving.engine_process import EngineProcessContext, run_engine_process
    from service.serving.supervisor import enable_multiprocess_metrics

    runtime = Path(tempfile.mkdtemp(prefix="vitserve-hop-"))
    model = write_near_free_model(runtime / "near_free.onnx")
    (runtime / "metrics").mkdir()
    enable_multiprocess_metrics(runtime / "metrics")
    settings = Settings(
        model=model,
        data_dir=runtime / "data",
        max_batch_size=args.max_batch_size,
        max_queue_size=4096,
        max_queue_delay_ms=2.0,
        intra_op_threads=1,
    )
    control = ControlBlock(args.clients)
    context = EngineProcessContext(control, runtime / "engine.sock", runtime / "metrics", generation=1)
    pid = os.fork()
    if pid == 0:
        os._exit(run_engine_process(settings, lambda: Engine(model, intra_op_threads=1, log_placement=False), context))
    try:
        while control.engine_listening != 1:
            time.sleep(0.05)
        rows = asyncio.run(run_clients(context.socket_path, control, args.clients, levels, args.seconds, pid))
    finally:
        os.kill(pid, signal.SIGTERM)
        os.waitpid(pid, 0)
    print(
        f"\nengine hop, near-free model, {args.clients} client(s), max_batch_size {args.max_batch_size}, "
        f"load average {os.getloadavg()[0]:.1f}\n"
    )
    print("| images in flight per client | images/s | engine CPU us/image | client CPU us/image |")
    print("|---:|---:|---:|---:|")
    for level, r in rows:
        print(f"| {level} | {r['images_s']:.0f} | {r['engine_us']:.0f} | {r['client_us']:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
