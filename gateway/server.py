"""The gateway server: `tandem.v1.Generation`, health and reflection on one grpc.aio server,
in front of an engine pool (and, optionally, a local engine it spawns and supervises).

Built in-process by tests and by `__main__` alike:

    server = await build_server(config)
    await server.start()        # server.port is the bound port
    exit_code = await server.wait()
    await server.drain()        # graceful: in-flight requests get the grace period to finish

The public port speaks TLS when `config.tls` is set (mutual TLS with a client CA), and every
call but health and reflection needs an API key when `config.api_keys` is set
(`gateway.security`).
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import tempfile

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2, reflection_pb2_grpc

from gateway.admission import Admission
from gateway.config import GatewayConfig, split_host_port
from gateway.engines import EnginePool
from gateway.errors import ShuttingDown
from gateway.health import NOT_SERVING, SERVING, HealthServicer
from gateway.metrics import GatewayMetrics
from gateway.relay import Relay
from gateway.security import ApiKeyAuth, server_credentials
from gateway.servicer import GenerationServicer
from gateway.supervisor import DIR_PREFIX, EngineSupervisor
from tandem.v1 import generation_pb2, generation_pb2_grpc

logger = logging.getLogger(__name__)

GENERATION_SERVICE = generation_pb2.DESCRIPTOR.services_by_name["Generation"].full_name
HEALTH_SERVICE = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
HEALTH_SERVICES = ("", GENERATION_SERVICE)
# gRPC reflection v1: the messages of v1alpha (which grpcio-reflection serves) under the
# newer name, which some tools ask for first
REFLECTION_V1 = "grpc.reflection.v1.ServerReflection"
OPEN_SERVICES = (HEALTH_SERVICE, reflection.SERVICE_NAME, REFLECTION_V1)  # no API key needed
# After the grace period, how long cut-off requests get to send their UNAVAILABLE status
# before the server cancels whatever is left.
CUT_OFF_WAIT_S = 1.0


class GatewayServer:
    """One gateway: the gRPC server, the engine pool, the optional engine supervisor."""

    def __init__(self, config: GatewayConfig) -> None:
        self.config = config
        self.exit_code: int | None = None  # set when the gateway should stop
        self._should_stop = asyncio.Event()
        self._drain_task: asyncio.Task[None] | None = None
        self._server = grpc.aio.server(
            options=_server_options(config), interceptors=_interceptors(config)
        )
        self.port = _bind(self._server, config)  # fail before starting anything else
        self.http = self._make_http_api(config)
        self.http_port: int | None = None  # where the HTTP API is served, once started
        self.health = HealthServicer(HEALTH_SERVICES)
        self.admission = Admission()
        self.metrics = GatewayMetrics()
        self.metrics_port: int | None = None  # where /metrics is served, once started
        self.supervisor = self._make_supervisor(config)
        addresses = config.engine_addresses
        if self.supervisor is not None:
            addresses = (*addresses, self.supervisor.address)
        self.pool = EnginePool(addresses, config, on_change=self._update_health)
        self._add_services()

    def _make_http_api(self, config: GatewayConfig):
        """The OpenAI-compatible HTTP API, calling this server over a Unix socket of its own
        (in a folder only this user can enter) so that every gRPC rule applies to it."""
        if config.http_listen is None:
            return None
        try:  # aiohttp, needed only when asked for
            from gateway.openai_api import OpenAIApi
        except ImportError as exc:
            raise RuntimeError(f"--http-listen needs aiohttp, which is not installed ({exc})") \
                from exc

        self._http_dir = tempfile.mkdtemp(prefix=f"{DIR_PREFIX}{os.getpid()}-")
        target = f"unix:{self._http_dir}/http-api.sock"
        if self._server.add_insecure_port(target) == 0:
            raise RuntimeError(f"cannot listen on {target}")
        return OpenAIApi(target, config.max_request_bytes, config.max_response_bytes)

    def _make_supervisor(self, config: GatewayConfig) -> EngineSupervisor | None:
        if config.spawn is None:
            return None
        return EngineSupervisor(config.spawn, self._on_engine_exit, self._on_engine_give_up)

    def _add_services(self) -> None:
        relay = Relay(self.pool, self.config, self.admission)
        servicer = GenerationServicer(relay, self.metrics)
        generation_pb2_grpc.add_GenerationServicer_to_server(servicer, self._server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._server)
        names = (GENERATION_SERVICE, HEALTH_SERVICE, reflection.SERVICE_NAME, REFLECTION_V1)
        reflector = reflection.aio.ReflectionServicer(names)
        reflection_pb2_grpc.add_ServerReflectionServicer_to_server(reflector, self._server)
        v1 = grpc.stream_stream_rpc_method_handler(
            reflector.ServerReflectionInfo,
            request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
            response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString)
        self._server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(REFLECTION_V1, {"ServerReflectionInfo": v1}),))

    async def start(self) -> None:
        if self.http is not None:
            host, port = split_host_port(self.config.http_listen)
            try:
                self.http_port = await self.http.start(host, port, self.config.tls)
            except OSError as exc:
                raise RuntimeError(f"cannot listen on {self.config.http_listen} ({exc})") from exc
            logger.info("OpenAI-compatible HTTP API on %s (port %d)", self.config.http_listen,
                        self.http_port)
        await self._server.start()
        self.pool.start()
        if self.supervisor is not None:
            self.supervisor.start()
        if self.config.metrics_port is not None:
            self.metrics_port = self.metrics.serve(self.config.metrics_port,
                                                   self.config.metrics_host)
            logger.info("metrics on http://%s:%d/metrics", self.config.metrics_host,
                        self.metrics_port)
        logger.info("gateway listening on %s (port %d, %s, %s), engines: %s (%s streams, "
                    "%s routing)", self.config.listen, self.port, _describe_tls(self.config),
                    _describe_auth(self.config), [e.address for e in self.pool.engines],
                    self.config.engine_streams, self.config.routing)
        if self.config.api_keys and self.config.tls is None and not _is_loopback(
            self.config.listen
        ):
            logger.warning("API keys without TLS: they cross the network in clear text "
                           "(give --tls-cert and --tls-key)")

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

    async def drain(self, grace: float | None = None) -> None:
        """Graceful shutdown (SIGTERM), idempotent: NOT_SERVING at once; new engine-bound
        calls get UNAVAILABLE; calls in flight get `grace` seconds (default: the configured
        grace period) to finish, and are then cut off (their engine calls cancelled); then
        the server, the engine channels and the spawned engine stop."""
        if self._drain_task is None:
            grace = self.config.grace_period_s if grace is None else grace
            self._drain_task = asyncio.create_task(self._drain(grace), name="drain")
        await asyncio.shield(self._drain_task)

    async def _drain(self, grace: float) -> None:
        self.request_stop()
        self.health.enter_graceful_shutdown()
        self.admission.close()
        if self.admission.num_in_flight:
            logger.info("draining: %d requests in flight get up to %.1f s to finish",
                        self.admission.num_in_flight, grace)
        if not await self.admission.wait_idle(grace):
            error = ShuttingDown(f"the request did not finish within the {grace:g} s grace "
                                 "period; retry")
            num_cut_off = self.pool.abort_all(error)
            logger.warning("grace period over: cut off %d requests", num_cut_off)
            await self.admission.wait_idle(CUT_OFF_WAIT_S)
        if self.http is not None:
            await self.http.stop()  # its calls are done: it only relays them
            shutil.rmtree(self._http_dir, ignore_errors=True)
        await self._server.stop(0)  # ends what is left: health watches, stragglers
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
        logger.error("the local engine cannot be kept running (%s); the gateway exits", reason)
        self.request_stop(exit_code=1)


async def build_server(config: GatewayConfig) -> GatewayServer:
    """Builds (but does not start) a gateway; call from a running event loop."""
    return GatewayServer(config)


def _bind(server: grpc.aio.Server, config: GatewayConfig) -> int:
    """Binds the listening address, with TLS if configured; returns the port (the chosen one
    for port 0)."""
    address = config.listen
    problem = f"cannot listen on {address} (in use, or not a valid address)"
    try:
        if config.tls is None:
            port = server.add_insecure_port(address)
        else:
            problem = (f"cannot listen on {address} (in use, not a valid address, or "
                       f"{config.tls.cert_file} and {config.tls.key_file} are not a PEM "
                       "certificate chain and its private key)")
            port = server.add_secure_port(address, server_credentials(config.tls))
    except RuntimeError as exc:
        raise RuntimeError(problem) from exc
    if port == 0:
        raise RuntimeError(problem)
    return port


def _interceptors(config: GatewayConfig) -> list[grpc.aio.ServerInterceptor]:
    if not config.api_keys:
        return []
    return [ApiKeyAuth(config.api_keys, open_services=OPEN_SERVICES)]


def _server_options(config: GatewayConfig) -> list[tuple[str, int]]:
    return [
        ("grpc.max_receive_message_length", config.max_request_bytes),
        ("grpc.max_send_message_length", config.max_response_bytes),
        ("grpc.so_reuseport", 0),  # a second gateway on the same port fails instead of sharing it
    ]


def _describe_tls(config: GatewayConfig) -> str:
    if config.tls is None:
        return "plain text"
    return "mutual TLS" if config.tls.client_ca_file else "TLS"


def _describe_auth(config: GatewayConfig) -> str:
    return f"{len(config.api_keys)} API keys" if config.api_keys else "no authentication"


def _is_loopback(address: str) -> bool:
    host = address.rsplit(":", 1)[0].strip("[]")
    return host in ("localhost", "::1") or host.startswith("127.") or address.startswith("unix:")
