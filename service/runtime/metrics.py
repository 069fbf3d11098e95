"""Prometheus metrics, one registry per app (so several apps in one test process never collide).

Exposed at GET /metrics: requests and latency by route and status, queue depth, in-flight batch,
batch-size histogram, queue-wait, inference and pre-processing time, images classified (total and
per second over a sliding window), and scoring jobs by state with their images by outcome.

A multi-process server (service/serving/supervisor.py) uses prometheus_client's multiprocess mode:
every process writes its figures to files in one directory and any worker's /metrics sums them
(counters and histograms over all processes, the engine's gauges as the engine set them). There,
``worker`` gives per-worker figures (``vitserve_worker_requests_total{worker=...}``), gauges that a
callable computes are refreshed by ``refresh()`` (the engine process calls it periodically), since
a scrape in one process cannot call a function in another (the job gauges too).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

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


# What a job-count source returns: {"jobs": {state: count}, "images": {outcome: count}}.
JobCounts = Mapping[str, Mapping[str, int]]
JOB_STATES = ("queued", "running", "done", "cancelled", "failed")
JOB_IMAGE_OUTCOMES = ("scored", "failed", "pending")


class _JobCollector(Collector):
    """Job gauges read from the jobs store at scrape time (the store is the truth, also after a restart)."""

    def __init__(self) -> None:
        self.counts: Callable[[], JobCounts] | None = None

    def collect(self) -> Iterator[Metric]:
        if self.counts is None:
            return
        try:
            counts = self.counts()
        except Exception:  # noqa: BLE001 - a closed or busy store must not fail the whole scrape
            return
        jobs = GaugeMetricFamily("vitserve_jobs", "scoring jobs held in the store, by state", labels=["state"])
        for state in JOB_STATES:
            jobs.add_metric([state], counts.get("jobs", {}).get(state, 0))
        yield jobs
        images = GaugeMetricFamily(
            "vitserve_job_images", "images of the jobs held in the store, by outcome", labels=["outcome"]
        )
        for outcome in JOB_IMAGE_OUTCOMES:
            images.add_metric([outcome], counts.get("images", {}).get(outcome, 0))
        yield images


class _BothGauges:
    """inc/dec two gauges at once: the server-wide figure and this worker's own."""

    def __init__(self, *gauges: Gauge) -> None:
        self._gauges = gauges

    def inc(self, amount: float = 1) -> None:
        for gauge in self._gauges:
            gauge.inc(amount)

    def dec(self, amount: float = 1) -> None:
        for gauge in self._gauges:
            gauge.dec(amount)

    def set(self, value: float) -> None:
        for gauge in self._gauges:
            gauge.set(value)


class Metrics:
    """All of the service's metrics in a private registry.

    Args:
        multiprocess_dir: prometheus_client's multiprocess directory when this process is one of a
            multi-process server (its value class must already be the multiprocess one); None = alone.
        worker: this process's front-end worker index (per-worker figures), None for the engine process.
    """

    def __init__(self, multiprocess_dir: Path | None = None, worker: int | None = None) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.multiprocess_dir = multiprocess_dir
        self.worker = worker
        self._queue_depth_fn: Callable[[], float] | None = None
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
        self.in_flight_requests = Gauge(
            "vitserve_requests_in_flight", "HTTP requests being handled", registry=r, multiprocess_mode="livesum"
        )
        self.queue_depth = Gauge(
            "vitserve_queue_depth", "images waiting in the batcher queue", registry=r, multiprocess_mode="livemax"
        )
        self.batch_size = Histogram("vitserve_batch_size", "images per engine run", buckets=_BATCH_BUCKETS, registry=r)
        self.inference = Histogram(
            "vitserve_inference_seconds", "engine run time per batch", buckets=_LATENCY_BUCKETS_S, registry=r
        )
        self.queue_wait = Histogram(
            "vitserve_queue_seconds",
            "time an image waits in the batcher queue before its batch starts",
            buckets=_LATENCY_BUCKETS_S,
            registry=r,
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
            "vitserve_images_per_second",
            "images classified per second (last 10 s)",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.ready = Gauge(
            "vitserve_ready", "1 when warmed up and accepting requests", registry=r, multiprocess_mode="livemin"
        )
        self.worker_requests: Counter | None = None
        if multiprocess_dir is None:
            self.images_per_second.set_function(self._rate.rate)
        else:
            process_up = Gauge(
                "vitserve_process_up",
                "1 per live process of a multi-process server (role engine or worker; pid label)",
                ["role", "worker"],
                registry=r,
                multiprocess_mode="liveall",
            )
            process_up.labels("engine" if worker is None else "worker", "" if worker is None else str(worker)).set(1)
        if multiprocess_dir is not None and worker is not None:
            self.worker_requests = Counter(
                "vitserve_worker_requests_total", "HTTP requests answered, per front-end worker", ["worker"], registry=r
            )
            per_worker = Gauge(
                "vitserve_worker_requests_in_flight",
                "HTTP requests being handled, per front-end worker",
                ["worker"],
                registry=r,
                multiprocess_mode="livesum",
            )
            self.in_flight_requests = _BothGauges(self.in_flight_requests, per_worker.labels(str(worker)))  # type: ignore[assignment]
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
        self._jobs = _JobCollector()
        self._job_gauges: tuple[Gauge, Gauge] | None = None
        if multiprocess_dir is None:
            r.register(self._jobs)
        else:  # the store lives in the engine process: refresh() writes what a worker's scrape reads
            self._job_gauges = (
                Gauge(
                    "vitserve_jobs",
                    "scoring jobs held in the store, by state",
                    ["state"],
                    registry=r,
                    multiprocess_mode="livemax",
                ),
                Gauge(
                    "vitserve_job_images",
                    "images of the jobs held in the store, by outcome",
                    ["outcome"],
                    registry=r,
                    multiprocess_mode="livemax",
                ),
            )
        self.cache_events = Counter(
            "vitserve_cache_events_total", "response cache lookups and evictions", ["event"], registry=r
        )

    def watch_queue(self, depth: Callable[[], float]) -> None:
        if self.multiprocess_dir is None:
            self.queue_depth.set_function(depth)
        else:
            self._queue_depth_fn = depth

    def refresh(self) -> None:
        """Multiprocess mode: write the computed gauges (queue depth, images per second) now."""
        if self.multiprocess_dir is None:
            return
        if self._queue_depth_fn is not None:
            self.queue_depth.set(self._queue_depth_fn())
        self.images_per_second.set(self._rate.rate())
        if self._job_gauges is not None and self._jobs.counts is not None:
            try:
                counts = self._jobs.counts()
            except Exception:  # noqa: BLE001 - a busy store: the last figures stay
                return
            jobs, images = self._job_gauges
            for state in JOB_STATES:
                jobs.labels(state).set(counts.get("jobs", {}).get(state, 0))
            for outcome in JOB_IMAGE_OUTCOMES:
                images.labels(outcome).set(counts.get("images", {}).get(outcome, 0))

    def watch_jobs(self, counts: Callable[[], JobCounts]) -> None:
        """Report job gauges from ``counts`` at every scrape (a later call replaces the source)."""
        self._jobs.counts = counts

    def observe_batch(self, size: int, seconds: float) -> None:
        self.batch_size.observe(size)
        self.inference.observe(seconds)
        self.images.inc(size)
        self._rate.add(size)

    def observe_request(self, route: str, method: str, status: int, seconds: float) -> None:
        self.requests.labels(route, method, str(status)).inc()
        self.latency.labels(route, method, str(status)).observe(seconds)
        if self.worker_requests is not None:
            self.worker_requests.labels(str(self.worker)).inc()

    def render(self) -> tuple[bytes, str]:
        if self.multiprocess_dir is None:
            return generate_latest(self.registry), CONTENT_TYPE_LATEST
        merged = CollectorRegistry()
        MultiProcessCollector(merged, path=str(self.multiprocess_dir))  # type: ignore[no-untyped-call]
        return generate_latest(merged), CONTENT_TYPE_LATEST
