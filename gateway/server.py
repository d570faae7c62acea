"""The gateway server: `tandem.v1.Generation`, health and reflection on one grpc.aio server,
in front of an engine pool (and, optionally, a local engine it spawns and supervises).

Built in-process by tests and by `__main__` alike:

    server = await build_server(config)
    await server.start()        # server.port is the bound port
    exit_code = await server.wait()
    await server.stop()
"""

from __future__ import annotations

import asyncio
import logging

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from gateway.config import GatewayConfig
from gateway.engines import EnginePool
from gateway.health import NOT_SERVING, SERVING, HealthServicer
from gateway.relay import Relay
from gateway.servicer import GenerationServicer
from gateway.supervisor import EngineSupervisor
from tandem.v1 import generation_pb2, generation_pb2_grpc

logger = logging.getLogger(__name__)

GENERATION_SERVICE = generation_pb2.DESCRIPTOR.services_by_name["Generation"].full_name
HEALTH_SERVICE = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
HEALTH_SERVICES = ("", GENERATION_SERVICE)


class GatewayServer:
    """One gateway: the gRPC server, the engine pool, the optional engine supervisor."""

    def __init__(self, config: GatewayConfig) -> None:
        self.config = config
        self.exit_code: int | None = None  # set when the gateway should stop
        self._should_stop = asyncio.Event()
        self._server = grpc.aio.server(options=_server_options(config))
        self.port = _bind(self._server, config.listen)  # fail before starting anything else
        self.health = HealthServicer(HEALTH_SERVICES)
        self.supervisor = self._make_supervisor(config)
        addresses = config.engine_addresses
        if self.supervisor is not None:
            addresses = (*addresses, self.supervisor.address)
        self.pool = EnginePool(addresses, config, on_change=self._update_health)
        self._add_services()

    def _make_supervisor(self, config: GatewayConfig) -> EngineSupervisor | None:
        if config.spawn is None:
            return None
        return EngineSupervisor(config.spawn, self._on_engine_exit, self._on_engine_give_up)

    def _add_services(self) -> None:
        relay = Relay(self.pool, self.config)
        servicer = GenerationServicer(relay)
        generation_pb2_grpc.add_GenerationServicer_to_server(servicer, self._server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._server)
        names = (GENERATION_SERVICE, HEALTH_SERVICE, reflection.SERVICE_NAME)
        reflection.enable_server_reflection(names, self._server)

    async def start(self) -> None:
        await self._server.start()
        self.pool.start()
        if self.supervisor is not None:
            self.supervisor.start()
        logger.info("gateway listening on %s (port %d), engines: %s",
                    self.config.listen, self.port, [e.address for e in self.pool.engines])

    def request_stop(self, exit_code: int = 0) -> None:
        """Makes `wait` return (the first code given wins)."""
        if self.exit_code is None:
            self.exit_code = exit_code
        self._should_stop.set()

    async def wait(self) -> int:
        """Waits until a stop is requested or the engine supervisor gives up; the exit code."""
        await self._should_stop.wait()
        assert self.exit_code is not None
        return self.exit_code

    async def stop(self, grace: float | None = None) -> None:
        """Graceful shutdown: NOT_SERVING, let in-flight requests finish for `grace` seconds
        (default: the configured grace period), then stop the engine child and channels."""
        self.request_stop()
        self.health.enter_graceful_shutdown()
        await self._server.stop(self.config.grace_period_s if grace is None else grace)
        await self.pool.close()  # no more health polls: the engine's exit is no news now
        if self.supervisor is not None:
            await self.supervisor.stop()
        logger.info("gateway stopped")

    def _update_health(self) -> None:
        self.health.set_all(SERVING if self.pool.is_ready else NOT_SERVING)

    def _on_engine_exit(self, reason: str) -> None:
        assert self.supervisor is not None
        self.pool.get(self.supervisor.address).mark_down(reason)

    def _on_engine_give_up(self, reason: str) -> None:
        logger.error("the local engine keeps failing (%s); the gateway exits", reason)
        self.request_stop(exit_code=1)


async def build_server(config: GatewayConfig) -> GatewayServer:
    """Builds (but does not start) a gateway; call from a running event loop."""
    return GatewayServer(config)


def _bind(server: grpc.aio.Server, address: str) -> int:
    """Binds the listening address; returns the port (the chosen one for port 0)."""
    try:
        port = server.add_insecure_port(address)
    except RuntimeError as exc:
        raise RuntimeError(f"cannot listen on {address} (in use, or not a valid address)") from exc
    if port == 0:
        raise RuntimeError(f"cannot listen on {address} (in use, or not a valid address)")
    return port


def _server_options(config: GatewayConfig) -> list[tuple[str, int]]:
    return [
        ("grpc.max_receive_message_length", config.max_request_bytes),
        ("grpc.max_send_message_length", config.max_response_bytes),
        ("grpc.so_reuseport", 0),  # a second gateway on the same port fails instead of sharing it
    ]
