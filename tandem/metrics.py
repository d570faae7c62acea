"""Serving a process's Prometheus registry over HTTP (the gateway's and each engine's)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, start_http_server


def serve_metrics(registry: CollectorRegistry, port: int, host: str) -> int:
    """Serve ``registry`` at http://host:port/metrics from a daemon thread; returns the
    port (useful when asked for port 0)."""
    server, _ = start_http_server(port, addr=host, registry=registry)
    return server.server_port
