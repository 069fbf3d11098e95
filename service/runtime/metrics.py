"""Prometheus metrics, one registry per app (so several apps in one test process never collide).

Exposed at GET /metrics: requests and latency by route and status, queue depth, in-flight batch,
batch-size histogram, inference and pre-processing time, images classified (total and per second
over a sliding window).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_LATENCY_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


class RateWindow:
    """Events per second over the last ``window_s`` seconds (thread-safe, O(1) amortised)."""

    def __init__(self, window_s: float = 10.0) -> None:
        self.window_s = window_s
        self._events: deque[tuple[float, int]] = deque()
        self._lock = threading.Lock()

    def add(self, count: int, now: float | None = None) -> None:
        with self._lock:
            self._events.append((time.monotonic() if now is None else now, count))

    def rate(self, now: float | None = None) -> float:
        now = time.monotonic() if now is None else now
        with self._lock:
            while self._events and self._events[0][0] < now - self.window_s:
                self._events.popleft()
            return sum(n for _, n in self._events) / self.window_s


class Metrics:
    """All of the service's metrics in a private registry."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "vitserve_requests_total", "HTTP requests answered", ["route", "method", "status"], registry=r
        )
        self.latency = Histogram(
            "vitserve_request_duration_seconds",
            "HTTP request latency",
            ["route", "method", "status"],
            buckets=_LATENCY_BUCKETS_S,
            registry=r,
        )
        self.in_flight_requests = Gauge("vitserve_requests_in_flight", "HTTP requests being handled", registry=r)
        self.queue_depth = Gauge("vitserve_queue_depth", "images waiting in the batcher queue", registry=r)
        self.batch_size = Histogram("vitserve_batch_size", "images per engine run", buckets=_BATCH_BUCKETS, registry=r)
        self.inference = Histogram(
            "vitserve_inference_seconds", "engine run time per batch", buckets=_LATENCY_BUCKETS_S, registry=r
        )
        self.preprocess = Histogram(
            "vitserve_preprocess_seconds",
            "decode + resize + normalise time per image",
            buckets=_LATENCY_BUCKETS_S,
            registry=r,
        )
        self.images = Counter("vitserve_images_total", "images classified", registry=r)
        self.image_errors = Counter("vitserve_image_errors_total", "images rejected or failed", ["code"], registry=r)
        self._rate = RateWindow(10.0)
        self.images_per_second = Gauge(
            "vitserve_images_per_second", "images classified per second (last 10 s)", registry=r
        )
        self.images_per_second.set_function(self._rate.rate)
        self.ready = Gauge("vitserve_ready", "1 when warmed up and accepting requests", registry=r)
        # Per model version (service/serving/registry.py) and the response cache.
        self.model_ready = Gauge(
            "vitserve_model_ready", "1 while a model version takes traffic", ["model", "version"], registry=r
        )
        self.model_images = Counter(
            "vitserve_model_images_total", "images run per model version", ["model", "version"], registry=r
        )
        self.model_load_failures = Counter(
            "vitserve_model_load_failures_total",
            "model versions that failed to load, warm up or pass their golden check",
            ["model"],
            registry=r,
        )
        self.cache_events = Counter(
            "vitserve_cache_events_total", "response cache lookups and evictions", ["event"], registry=r
        )

    def watch_queue(self, depth: Callable[[], float]) -> None:
        self.queue_depth.set_function(depth)

    def observe_batch(self, size: int, seconds: float) -> None:
        self.batch_size.observe(size)
        self.inference.observe(seconds)
        self.images.inc(size)
        self._rate.add(size)

    def observe_request(self, route: str, method: str, status: int, seconds: float) -> None:
        self.requests.labels(route, method, str(status)).inc()
        self.latency.labels(route, method, str(status)).observe(seconds)

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
