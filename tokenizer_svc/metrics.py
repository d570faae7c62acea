"""The engine's Prometheus metrics (``--metrics-port``).

Besides the usual serving metrics, the device's busy time and the idle gap
before each step, measured by the worker on its compute stream: the number this
project exists to drive to zero. ``rate(tandem_device_busy_seconds_total[1m]) /
(rate(tandem_device_busy_seconds_total[1m]) + rate(tandem_device_idle_seconds_total[1m]))``
is the device's busy fraction.
"""

from __future__ import annotations

import bisect
import math
import threading
from collections.abc import Iterable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import HistogramMetricFamily
from prometheus_client.utils import floatToGoString

from tandem.metrics import serve_metrics

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.25, 0.5, 1)
GAP_BUCKETS = (1e-6, 1e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 5e-2, 0.1)
SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)


class EngineMetrics:
    """All of one engine's metrics, in their own registry (no module-level state)."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.ttft = Histogram("tandem_time_to_first_token_seconds",
                              "Arrival to first generated token", buckets=LATENCY_BUCKETS,
                              registry=r)
        self.itl = StepHistogram("tandem_inter_token_latency_seconds",
                                 "Time between a request's consecutive tokens",
                                 buckets=TOKEN_BUCKETS, registry=r)
        self.queue_time = Histogram("tandem_queue_time_seconds", "Arrival to first scheduled",
                                    buckets=LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram("tandem_e2e_latency_seconds", "Arrival to the end of the request",
                             buckets=LATENCY_BUCKETS, registry=r)
        self.running = Gauge("tandem_requests_running", "Requests holding KV blocks", registry=r)
        self.waiting = Gauge("tandem_requests_waiting", "Requests waiting to be scheduled",
                             registry=r)
        self.kv_usage = Gauge("tandem_kv_cache_usage_ratio", "Fraction of KV blocks in use",
                              registry=r)
        self.batch_rows = Histogram("tandem_batch_size_requests", "Requests per batch",
                                    buckets=SIZE_BUCKETS, registry=r)
        self.batch_tokens = Histogram("tandem_batch_size_tokens", "Tokens per batch",
                                      buckets=SIZE_BUCKETS, registry=r)
        self.preemptions = Counter("tandem_preemptions", "Requests preempted for KV blocks",
                                   registry=r)
        self.prefix_queried = Counter("tandem_prefix_cache_queried_tokens",
                                      "Known tokens of requests admitted to a batch", registry=r)
        self.prefix_hits = Counter("tandem_prefix_cache_hit_tokens",
                                   "Of those, tokens whose KV came from the prefix cache "
                                   "(not computed again)", registry=r)
        self.rejected = Counter("tandem_requests_rejected", "Requests refused at admission",
                                ["reason"], registry=r)
        self.cancelled = Counter("tandem_requests_cancelled",
                                 "Requests aborted by their client (cancel, disconnect, deadline)",
                                 registry=r)
        self.displaced = Counter("tandem_requests_displaced",
                                 "Waiting requests ended to make room in a full queue for one "
                                 "of higher priority", registry=r)
        self.finished = Counter("tandem_requests_finished", "Requests finished",
                                ["finish_reason"], registry=r)
        self.generated = Counter("tandem_generated_tokens", "Tokens generated", registry=r)
        self.device_busy = Counter("tandem_device_busy_seconds",
                                   "Device compute-stream time spent running batches", registry=r)
        self.device_idle = Counter("tandem_device_idle_seconds",
                                   "Device compute-stream time idle between batches", registry=r)
        self.idle_gap = Histogram("tandem_device_idle_gap_seconds",
                                  "Idle gap of the device's compute stream before each batch",
                                  buckets=GAP_BUCKETS, registry=r)
        self.step_time = Histogram("tandem_device_step_seconds", "Device time of one batch",
                                   buckets=TOKEN_BUCKETS, registry=r)

    def serve(self, port: int, host: str = "0.0.0.0") -> int:
        """Serve /metrics over HTTP; returns the port (useful when asked for port 0)."""
        return serve_metrics(self.registry, port, host)

    def observe_step(self, busy_s: float, idle_s: float) -> None:
        self.device_busy.inc(busy_s)
        self.device_idle.inc(idle_s)
        self.idle_gap.observe(idle_s)
        self.step_time.observe(busy_s)


class StepHistogram:
    """A Prometheus histogram that takes a whole step's observations in one call
    (:meth:`observe_many`): the inter-token latency has one observation per running request
    per step, and ``Histogram.observe`` one at a time took ~9% of the engine thread's step
    at 128 requests. Exposed as ``Histogram`` exposes it (``_bucket``, ``_count``,
    ``_sum``), less the ``_created`` sample."""

    def __init__(self, name: str, documentation: str, buckets: Iterable[float],
                 registry: CollectorRegistry) -> None:
        self.name, self.documentation = name, documentation
        self._bounds = (*sorted(float(b) for b in buckets), math.inf)
        self._counts = [0] * len(self._bounds)
        self._sum = 0.0
        self._lock = threading.Lock()  # the /metrics thread reads while the engine writes
        registry.register(self)

    def observe(self, value: float) -> None:
        self.observe_many((value,))

    def observe_many(self, values: Iterable[float]) -> None:
        values = list(values)
        slots = [bisect.bisect_left(self._bounds, v) for v in values]  # first bound >= v
        total = math.fsum(values)
        with self._lock:
            for i in slots:
                self._counts[i] += 1
            self._sum += total

    def collect(self) -> Iterator[HistogramMetricFamily]:
        with self._lock:
            counts, total = list(self._counts), self._sum
        cumulative, buckets = 0, []
        for bound, count in zip(self._bounds, counts, strict=True):
            cumulative += count
            buckets.append((floatToGoString(bound), cumulative))
        yield HistogramMetricFamily(self.name, self.documentation, buckets=buckets,
                                    sum_value=total)

    def describe(self) -> Iterator[HistogramMetricFamily]:
        yield HistogramMetricFamily(self.name, self.documentation)
