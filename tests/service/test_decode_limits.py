"""service/runtime/decode_limits.py: the process-wide pixel gate and one request's decode share."""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from service.core.errors import ClientClosedRequest, DeadlineExceeded, PayloadTooLarge
from service.runtime.decode_limits import PixelGate, RequestDecodes


def test_gate_lets_small_decodes_share_and_serialises_large_ones():
    gate = PixelGate(100)
    peak = 0
    lock = threading.Lock()

    def decode(pixels: int) -> None:
        nonlocal peak
        with gate.hold(pixels):
            with lock:
                peak = max(peak, gate.in_use)
            time.sleep(0.02)

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(decode, [60] * 6 + [10] * 8))
    assert peak <= 100
    assert gate.in_use == 0


def test_gate_admits_one_decode_larger_than_its_capacity_when_idle():
    gate = PixelGate(100)
    with gate.hold(500):
        assert gate.in_use == 500
    assert gate.in_use == 0


def test_gate_wait_ends_at_the_deadline_and_when_the_check_raises():
    gate = PixelGate(100)
    with gate.hold(100):
        started = time.monotonic()
        with pytest.raises(DeadlineExceeded):
            with gate.hold(1, deadline=time.monotonic() + 0.1):
                pass
        assert time.monotonic() - started < 2

        def gone() -> None:
            raise ClientClosedRequest("gone")

        with pytest.raises(ClientClosedRequest):
            with gate.hold(1, check=gone):
                pass
    assert gate.in_use == 0


def _decodes(**kwargs) -> RequestDecodes:
    defaults = {"pixel_budget": 1000, "max_concurrent": 2, "deadline": time.monotonic() + 30, "gate": None}
    return RequestDecodes(**{**defaults, **kwargs})


def test_request_budget_refuses_the_image_that_crosses_it():
    decodes = _decodes(pixel_budget=1000)
    for _ in range(3):
        with decodes.admit(300):
            pass
    with pytest.raises(PayloadTooLarge, match="max_request_pixels"):
        with decodes.admit(300):
            pass
    with decodes.admit(100):  # a smaller one still fits
        pass
    assert decodes.spent == 1000


def test_request_never_has_more_than_its_slots_in_the_pool():
    async def main() -> int:
        decodes = _decodes(max_concurrent=2)
        running = peak = 0
        lock = threading.Lock()

        def work(admit) -> None:
            nonlocal running, peak
            with lock:
                running += 1
                peak = max(peak, running)
            time.sleep(0.03)
            with lock:
                running -= 1

        with ThreadPoolExecutor(8) as pool:
            await asyncio.gather(*(decodes.run(pool, work) for _ in range(10)))
        return peak

    assert asyncio.run(main()) == 2


def test_nothing_is_decoded_once_the_client_left_or_the_deadline_passed():
    async def main() -> list[str]:
        decodes = _decodes(max_concurrent=1)
        ran: list[str] = []

        def work(admit) -> None:
            with admit(10):
                ran.append("decoded")
            time.sleep(0.05)

        with ThreadPoolExecutor(2) as pool:
            tasks = [asyncio.ensure_future(decodes.run(pool, work)) for _ in range(5)]
            await asyncio.sleep(0.01)
            decodes.stop(ClientClosedRequest("client gone"))
            outcomes = await asyncio.gather(*tasks, return_exceptions=True)
        assert all(isinstance(o, ClientClosedRequest) for o in outcomes[1:]), outcomes
        late = _decodes(deadline=time.monotonic() - 1)
        with pytest.raises(DeadlineExceeded):
            with late.admit(1):
                pass
        return ran

    assert asyncio.run(main()) == ["decoded"]


def test_admission_holds_the_gate_while_decoding():
    gate = PixelGate(1000)
    decodes = _decodes(gate=gate)
    with decodes.admit(400):
        assert gate.in_use == 400
    assert gate.in_use == 0
