"""The engines behind the gateway: their channels, health, model info and load.

Health is *polled* with `Health.Check` every `health_poll_interval_s` (0.5 s) rather than
followed with `Health.Watch`:

- a Check carries a deadline, so a wedged engine (event loop stuck, connection still open) is
  noticed; a Watch stream would just stay silent, and keepalive pings are answered by the gRPC
  core even then;
- there is no stream to re-establish: after an engine restart, the next poll simply succeeds
  (the channel reconnects by itself, with a short backoff set below);
- grpc-python's reference asyncio Health servicer drops all watchers of a service when one
  of them hangs up, so a Watch could silently stop reporting changes;
- the cost, one tiny unary RPC per engine per half second, is nothing next to generation, and
  the half second is well inside the time any engine takes to load a model.

Losing a child process is reported at once by the supervisor (`Engine.mark_down`), which also
fails that engine's in-flight requests, without waiting for the next poll.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gateway.affinity import PrefixAffinity, input_bytes, prefix_keys
from gateway.config import GatewayConfig
from gateway.errors import EngineLost, GatewayError, NoEngineReady
from gateway.mux import EngineMux, MuxCall
from tandem.internal.v1 import engine_pb2, engine_pb2_grpc
from tandem.v1 import generation_pb2 as pb

logger = logging.getLogger(__name__)

ENGINE_SERVICE = "tandem.internal.v1.Engine"


def channel_options(config: GatewayConfig) -> list[tuple[str, int]]:
    """Options of every channel to an engine."""
    return [
        ("grpc.max_receive_message_length", config.max_response_bytes),
        # set, not gRPC's unlimited default: the relay refuses a larger request first
        ("grpc.max_send_message_length", config.max_engine_message_bytes),
        ("grpc.keepalive_time_ms", int(config.keepalive_time_s * 1000)),
        ("grpc.keepalive_timeout_ms", int(config.keepalive_timeout_s * 1000)),
        ("grpc.keepalive_permit_without_calls", 0),
        ("grpc.initial_reconnect_backoff_ms", 100),
        ("grpc.min_reconnect_backoff_ms", 100),
        ("grpc.max_reconnect_backoff_ms", int(config.max_reconnect_backoff_s * 1000)),
    ]


class Lease:
    """One request's hold on an engine: it counts toward the engine's load until released."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.error: GatewayError | None = None  # why the gateway ended the request, if it did
        self._call: grpc.aio.Call | MuxCall | None = None
        self._is_released = False

    def attach(self, call: grpc.aio.Call | MuxCall) -> None:
        """Registers the engine call, so that `abort` or `release` cancels it."""
        self._call = call
        if self.error is not None:
            call.cancel()

    def lose(self, reason: str) -> None:
        """The engine went away: the request ends with EngineLost."""
        self.abort(EngineLost(self.engine.address, reason))

    def abort(self, error: GatewayError) -> None:
        """Ends the request with `error`: cancels the engine call, and `raise_if_aborted`
        (called by whoever was waiting on that call) raises `error`. The first error wins."""
        if self.error is None:
            self.error = error
        if self._call is not None:
            self._call.cancel()

    def raise_if_aborted(self) -> None:
        """Raises the error given to `abort`, if the call ended because of it.

        Not when the current task is itself being cancelled (the client went away first).
        """
        task = asyncio.current_task()
        if self.error is not None and (task is None or not task.cancelling()):
            raise self.error

    def release(self) -> None:
        """Idempotent: cancels the engine call if still running and drops the load count."""
        if self._is_released:
            return
        self._is_released = True
        if self._call is not None and not self._call.done():
            self._call.cancel()
        self.engine.leases.discard(self)


class Engine:
    """One engine (a tokenizer_svc) at one address."""

    def __init__(
        self, address: str, config: GatewayConfig, on_change: Callable[[], None]
    ) -> None:
        self.address = address
        self.model_info: pb.ModelInfo | None = None
        self.is_serving = False
        self.leases: set[Lease] = set()
        self._config = config
        self._on_change = on_change
        self._channel = grpc.aio.insecure_channel(address, options=channel_options(config))
        self.stub = engine_pb2_grpc.EngineStub(self._channel)
        self._mux = EngineMux(self.stub, address) \
            if config.engine_streams == "multiplexed" else None
        self._health = health_pb2_grpc.HealthStub(self._channel)
        self._poller: asyncio.Task[None] | None = None
        self._last_problem: str | None = None

    @property
    def is_ready(self) -> bool:
        """SERVING, with its ModelInfo known: requests may be routed here."""
        return self.is_serving and self.model_info is not None

    @property
    def num_in_flight(self) -> int:
        return len(self.leases)

    def lease(self) -> Lease:
        lease = Lease(self)
        self.leases.add(lease)
        return lease

    def generate(self, request: engine_pb2.EngineRequest,
                 timeout: float | None) -> grpc.aio.UnaryStreamCall | MuxCall:
        """Starts ``request`` on this engine: a call to iterate for its outputs and to
        cancel, on a stream of its own or on the engine's multiplexed stream."""
        if self._mux is not None:
            return self._mux.start(request, timeout)
        return self.stub.Generate(request, timeout=timeout)

    def start(self) -> None:
        self._poller = asyncio.create_task(self._poll_health(), name=f"health {self.address}")

    async def close(self) -> None:
        if self._poller is not None:
            self._poller.cancel()
            await asyncio.gather(self._poller, return_exceptions=True)
        if self._mux is not None:
            await self._mux.close()
        await self._channel.close(grace=None)

    def mark_down(self, reason: str) -> None:
        """The engine is gone (its process exited): not ready, and its requests fail now."""
        self._note_problem(reason)
        self._set_serving(False)
        for lease in list(self.leases):
            lease.lose(reason)

    async def _poll_health(self) -> None:
        interval = self._config.health_poll_interval_s
        while True:
            await self.refresh()
            await asyncio.sleep(interval)

    async def refresh(self) -> None:
        """One health poll; fetches ModelInfo when the engine turns SERVING."""
        is_serving = await self._check_serving()
        if is_serving and not self.is_serving:
            self.model_info = await self._fetch_model_info()
            is_serving = self.model_info is not None
        self._set_serving(is_serving)

    async def _check_serving(self) -> bool:
        request = health_pb2.HealthCheckRequest(service=ENGINE_SERVICE)
        try:
            response = await self._health.Check(
                request, timeout=self._config.health_check_timeout_s
            )
        except grpc.aio.AioRpcError as exc:
            self._note_problem(f"health check failed: {exc.code().name} {exc.details()}")
            return False
        if response.status != health_pb2.HealthCheckResponse.SERVING:
            status = health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
            self._note_problem(f"health is {status}")
            return False
        return True

    async def _fetch_model_info(self) -> pb.ModelInfo | None:
        try:
            return await self.stub.GetModelInfo(
                pb.GetModelInfoRequest(), timeout=self._config.rpc_timeout_s
            )
        except grpc.aio.AioRpcError as exc:
            self._note_problem(f"GetModelInfo failed: {exc.code().name} {exc.details()}")
            return None

    def _set_serving(self, is_serving: bool) -> None:
        if is_serving == self.is_serving:
            return
        self.is_serving = is_serving
        if is_serving:
            self._last_problem = None
            info = self.model_info
            logger.info(
                "engine %s is SERVING: model=%s vocab_size=%d max_context_tokens=%d mode=%s",
                self.address, info.model, info.vocab_size, info.max_context_tokens, info.mode,
            )
        self._on_change()

    def _note_problem(self, problem: str) -> None:
        """Logs a problem once, not on every poll; loudly if the engine was serving."""
        if problem != self._last_problem:
            level = logging.WARNING if self.is_serving else logging.INFO
            logger.log(level, "engine %s not ready: %s", self.address, problem)
            self._last_problem = problem


class EnginePool:
    """All engines; routes each request to a ready one: the least loaded, or with
    ``config.routing == "prefix"`` the one its input's beginning went to before, if that
    one's load is within ``AFFINITY_SLACK`` (or a quarter) of the least loaded one's."""

    AFFINITY_SLACK = 2  # requests in flight

    def __init__(self, addresses: tuple[str, ...], config: GatewayConfig,
                 on_change: Callable[[], None]) -> None:
        self.engines = [Engine(address, config, on_change) for address in addresses]
        self.affinity = PrefixAffinity() if config.routing == "prefix" else None

    @property
    def is_ready(self) -> bool:
        return any(engine.is_ready for engine in self.engines)

    def get(self, address: str) -> Engine:
        return next(engine for engine in self.engines if engine.address == address)

    def acquire(self, request: pb.GenerateRequest | None = None) -> Lease:
        """A lease on a ready engine for ``request`` (None: any work, such as Tokenize): the
        one with the fewest requests in flight from this gateway, unless prefix routing
        prefers another (see the class)."""
        if request is None or self.affinity is None:
            return self._pick().lease()
        keys = prefix_keys(input_bytes(request))
        engine = self._pick(keys)
        self.affinity.record(engine.address, keys)
        return engine.lease()

    def model_info(self) -> pb.ModelInfo:
        """The cached ModelInfo of a ready engine."""
        info = self._pick().model_info
        assert info is not None
        return info

    def _pick(self, keys: list[bytes] | None = None) -> Engine:
        ready = [engine for engine in self.engines if engine.is_ready]
        if not ready:
            raise NoEngineReady()
        least = min(ready, key=lambda engine: engine.num_in_flight)
        if not keys or self.affinity is None:
            return least
        limit = least.num_in_flight + max(self.AFFINITY_SLACK, least.num_in_flight // 4)
        depth = {engine: self.affinity.depth(engine.address, keys) for engine in ready
                 if engine.num_in_flight <= limit}
        best = max(depth, key=depth.__getitem__)
        return best if depth[best] else least

    @property
    def num_in_flight(self) -> int:
        return sum(engine.num_in_flight for engine in self.engines)

    def abort_all(self, error: GatewayError) -> int:
        """Ends every request in flight on any engine with `error`; how many there were."""
        leases = [lease for engine in self.engines for lease in engine.leases]
        for lease in leases:
            lease.abort(error)
        return len(leases)

    def start(self) -> None:
        for engine in self.engines:
            engine.start()

    async def close(self) -> None:
        await asyncio.gather(*(engine.close() for engine in self.engines))
