"""The gateway's own `grpc.health.v1.Health` servicer.

A small replacement for `grpc_health.v1._async.HealthServicer`, whose `Watch` forgets every
watcher of a service as soon as one of them hangs up (later status changes then reach no one).
Here all watchers wait on one event that is replaced on every change, so any number may come
and go. `set` is synchronous, so readiness callbacks can call it directly.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterable

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

ServingStatus = health_pb2.HealthCheckResponse.ServingStatus
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
SERVICE_UNKNOWN = health_pb2.HealthCheckResponse.SERVICE_UNKNOWN


class HealthServicer(health_pb2_grpc.HealthServicer):
    """Serves the status of a fixed set of services; all start NOT_SERVING."""

    def __init__(self, services: Iterable[str]) -> None:
        self._statuses: dict[str, ServingStatus] = {name: NOT_SERVING for name in services}
        self._changed = asyncio.Event()
        self._is_shutting_down = False

    def set(self, service: str, status: ServingStatus) -> None:
        """Sets one service's status (ignored once shutdown has begun)."""
        if self._is_shutting_down or self._statuses.get(service) == status:
            return
        self._statuses[service] = status
        self._changed.set()
        self._changed = asyncio.Event()

    def set_all(self, status: ServingStatus) -> None:
        for service in list(self._statuses):
            self.set(service, status)

    def enter_graceful_shutdown(self) -> None:
        """NOT_SERVING for good: load balancers stop sending new requests."""
        self.set_all(NOT_SERVING)
        self._is_shutting_down = True

    def status(self, service: str) -> ServingStatus | None:
        return self._statuses.get(service)

    async def Check(
        self, request: health_pb2.HealthCheckRequest, context: grpc.aio.ServicerContext
    ) -> health_pb2.HealthCheckResponse:
        status = self._statuses.get(request.service)
        if status is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"unknown service {request.service!r}")
        return health_pb2.HealthCheckResponse(status=status)

    async def Watch(
        self, request: health_pb2.HealthCheckRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[health_pb2.HealthCheckResponse]:
        last = None
        while True:
            changed = self._changed
            status = self._statuses.get(request.service, SERVICE_UNKNOWN)
            if status != last:
                yield health_pb2.HealthCheckResponse(status=status)
                last = status
            await changed.wait()
