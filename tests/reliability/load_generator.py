"""Closed-loop HTTP load for the reliability tests: N clients, each sending its next request as
soon as it has an answer (after ``backoff_s`` when refused with 429/503, as a polite client
would), for a bounded time. Every request's status and latency is recorded; a transport error
after the server accepted the request (reset, closed mid-answer, timeout) is recorded as status 0:
a lost request; a connection that was never opened (refused: the server had stopped listening)
is recorded as -1, a request the server never saw.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import httpx

LOST = 0
REFUSED = -1


@dataclass(frozen=True)
class Outcome:
    status: int
    latency_s: float
    sent_at: float  # time.monotonic()
    error: str = ""  # the transport error, for LOST and REFUSED


@dataclass
class LoadResult:
    outcomes: list[Outcome]
    duration_s: float

    def count(self, status: int) -> int:
        return sum(1 for o in self.outcomes if o.status == status)

    def rate(self, status: int) -> float:
        return self.count(status) / self.duration_s

    def statuses(self) -> dict[int, int]:
        return dict(sorted(Counter(o.status for o in self.outcomes).items()))

    def latencies(self, status: int) -> list[float]:
        return sorted(o.latency_s for o in self.outcomes if o.status == status)


def percentile(values: list[float], q: float) -> float:
    return values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")


async def _closed_loop(
    url: str,
    request: Callable[[int], dict],
    clients: int,
    duration_s: float,
    timeout_s: float,
    backoff_s: float,
    total: int | None,
) -> LoadResult:
    outcomes: list[Outcome] = []
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=timeout_s) as client:
        started = time.monotonic()
        stop_at = started + duration_s

        issued = 0

        async def one_client(index: int) -> None:
            nonlocal issued
            n = 0
            while time.monotonic() < stop_at and (total is None or issued < total):
                issued += 1
                sent = time.monotonic()
                error = ""
                try:
                    response = await client.request(**{"method": "POST", **request(index * 1_000_000 + n)})
                    status = response.status_code
                except httpx.ConnectError as exc:
                    status, error = REFUSED, f"{type(exc).__name__}: {exc}"
                except httpx.TransportError as exc:
                    status, error = LOST, f"{type(exc).__name__}: {exc}"
                outcomes.append(Outcome(status, time.monotonic() - sent, sent, error))
                n += 1
                if status in (429, 503, REFUSED):
                    await asyncio.sleep(backoff_s)

        await asyncio.gather(*(one_client(i) for i in range(clients)))
        return LoadResult(outcomes, time.monotonic() - started)


def closed_loop(
    url: str,
    request: Callable[[int], dict],
    *,
    clients: int,
    duration_s: float,
    timeout_s: float = 30.0,
    backoff_s: float = 0.05,
    total: int | None = None,
) -> LoadResult:
    """Run ``clients`` closed-loop clients for ``duration_s`` (or until ``total`` requests were sent);
    ``request(n)`` gives the httpx ``request`` kwargs (method, url, ...) of a client's n-th request."""
    return asyncio.run(_closed_loop(url, request, clients, duration_s, timeout_s, backoff_s, total))
