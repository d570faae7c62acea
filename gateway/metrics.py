"""The gateway's Prometheus metrics (``--metrics-port``): every call of the public
Generation API by method and final status code, calls in flight, and how long they took.
The engines count what reaches them (``tokenizer_svc.metrics``); requests the gateway
refuses itself (bad input, no engine ready) are counted only here. Calls refused for a
missing API key never reach the servicer and are not counted."""

from __future__ import annotations

import grpc
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from tandem.metrics import serve_metrics

LATENCY_BUCKETS = (0.001, 0.005, 0.025, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class GatewayMetrics:
    """One gateway's metrics, in their own registry."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.calls = Counter("tandem_gateway_requests_total",
                             "Public API calls finished, by method and status code",
                             ["method", "code"], registry=r)
        self.in_flight = Gauge("tandem_gateway_requests_in_flight",
                               "Public API calls in progress", ["method"], registry=r)
        self.seconds = Histogram("tandem_gateway_request_seconds",
                                 "Public API calls, arrival to last message",
                                 ["method"], buckets=LATENCY_BUCKETS, registry=r)

    def started(self, method: str) -> None:
        self.in_flight.labels(method).inc()

    def finished(self, method: str, code: grpc.StatusCode, seconds: float) -> None:
        self.in_flight.labels(method).dec()
        self.calls.labels(method, code.name).inc()
        self.seconds.labels(method).observe(seconds)

    def serve(self, port: int, host: str = "127.0.0.1") -> int:
        """Serve /metrics over HTTP; returns the port (useful when asked for port 0)."""
        return serve_metrics(self.registry, port, host)
