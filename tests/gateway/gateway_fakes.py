"""A fake engine (tandem.internal.v1.Engine + health) and helpers to run a gateway in front of it.

Used in-process by the tests and, through gateway_fake_engine_proc.py, as a child process.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections.abc import AsyncIterator

import grpc
from grpc_health.v1 import health as grpc_health
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gateway.config import GatewayConfig
from gateway.server import GatewayServer, build_server
from tandem.internal.v1 import engine_pb2, engine_pb2_grpc
from tandem.link import ENGINE_MAX_MESSAGE_BYTES
from tandem.v1 import generation_pb2 as pb
from tandem.v1 import generation_pb2_grpc

ENGINE_SERVICE = "tandem.internal.v1.Engine"
# the gateway's --engine-streams in fast_config; test_gateway_server runs with each value
ENGINE_STREAMS = ["multiplexed"]
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING

MODEL_INFO = pb.ModelInfo(
    model="fake-model", vocab_size=1000, max_context_tokens=2048, default_max_tokens=256,
    eos_token_ids=[2], max_top_logprobs=5, device="cpu", dtype="float32", mode="async",
    kv_block_size=16, kv_num_blocks=128,
)


def default_chunks() -> list[pb.GenerateStreamResponse]:
    """Three deltas, the last one carrying finish_reason, usage and timing."""
    return [
        pb.GenerateStreamResponse(
            text="Hel", token_ids=[11],
            logprobs=[pb.TokenLogprob(token_id=11, logprob=-0.5, token="Hel",
                                      top=[pb.TopLogprob(token_id=11, logprob=-0.5, token="Hel"),
                                           pb.TopLogprob(token_id=9, logprob=-1.5)])],
        ),
        pb.GenerateStreamResponse(
            text="lo", token_ids=[12, 13],
            logprobs=[pb.TokenLogprob(token_id=12, logprob=-0.25),
                      pb.TokenLogprob(token_id=13, logprob=-0.125)],
        ),
        pb.GenerateStreamResponse(
            text=" world", token_ids=[14],
            logprobs=[pb.TokenLogprob(token_id=14, logprob=-1.0)],
            finish_reason=pb.FINISH_REASON_STOP,
            usage=pb.Usage(prompt_tokens=5, completion_tokens=4),
            timing=pb.Timing(queue_seconds=0.01, first_token_seconds=0.02, total_seconds=0.05),
        ),
    ]


class FakeEngine(engine_pb2_grpc.EngineServicer):
    """Streams `chunks` for every request, or fails with `error`, or hangs when `hang` is set.

    A slow stream: with `hold_last` set, the last chunk waits for that event; `chunk_delay_s`
    sleeps before each chunk.

    Records the requests it got, the remaining time of each call, and whether a Generate
    stream was cancelled (`cancelled` is set, `num_cancelled` counts them).
    """

    def __init__(self, info: pb.ModelInfo = MODEL_INFO) -> None:
        self.info = info
        self.chunks = default_chunks()
        self.error: tuple[grpc.StatusCode, str] | None = None
        self.hang = False  # after sending the chunks but the last, wait forever
        self.hold_last: asyncio.Event | None = None
        self.chunk_delay_s = 0.0
        self.requests: list[engine_pb2.EngineRequest] = []
        self.time_remaining: list[float | None] = []
        self.tokenize_requests: list[pb.TokenizeRequest] = []
        self.started = asyncio.Event()
        self.cancelled = asyncio.Event()
        self.num_cancelled = 0
        self.num_active = 0

    async def Generate(self, request, context) -> AsyncIterator[pb.GenerateStreamResponse]:
        self.requests.append(request)
        self.time_remaining.append(context.time_remaining())
        self.num_active += 1
        self.started.set()
        try:
            if self.error is not None:
                await context.abort(*self.error)
            chunks = self.chunks[:-1] if self.hang else self.chunks
            for i, chunk in enumerate(chunks):
                if self.chunk_delay_s:
                    await asyncio.sleep(self.chunk_delay_s)
                if self.hold_last is not None and i == len(self.chunks) - 1:
                    await self.hold_last.wait()
                yield chunk
            if self.hang:
                await asyncio.Event().wait()
        except asyncio.CancelledError:
            self.num_cancelled += 1
            self.cancelled.set()
            raise
        finally:
            self.num_active -= 1

    async def GenerateMany(self, calls, context) -> AsyncIterator[engine_pb2.EngineEvents]:
        """Each started request runs as `Generate` would, its chunks and its abort sent as
        events (no per-request deadline: the gateway keeps those on this path)."""
        events: asyncio.Queue = asyncio.Queue()
        running: dict[str, asyncio.Task] = {}

        async def run_one(request: engine_pb2.EngineRequest) -> None:
            rid = request.request_id
            try:
                async for chunk in self.Generate(request, _MuxContext()):
                    events.put_nowait(engine_pb2.EngineEvent(request_id=rid, output=chunk))
            except _Aborted as exc:
                events.put_nowait(engine_pb2.EngineEvent(
                    request_id=rid, error_code=exc.code.value[0], error_message=exc.details))

        async def read() -> None:
            async for call in calls:
                if call.WhichOneof("call") == "start":
                    running[call.start.request_id] = asyncio.create_task(run_one(call.start))
                elif call.cancel in running:
                    running[call.cancel].cancel()

        reader = asyncio.create_task(read())
        try:
            while True:
                yield engine_pb2.EngineEvents(events=[await events.get()])
        finally:
            reader.cancel()
            for task in running.values():
                task.cancel()

    async def Tokenize(self, request, context) -> pb.TokenizeResponse:
        self.tokenize_requests.append(request)
        if self.error is not None:
            await context.abort(*self.error)
        return pb.TokenizeResponse(token_ids=[7, 8], tokens=["he", "llo"])

    async def GetModelInfo(self, request, context) -> pb.ModelInfo:
        return self.info


class _Aborted(Exception):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.code, self.details = code, details


class _MuxContext:
    """What FakeEngine.Generate needs of a call's context, for a request on GenerateMany."""

    def time_remaining(self) -> None:
        return None

    async def abort(self, code: grpc.StatusCode, details: str) -> None:
        raise _Aborted(code, details)


@dataclasses.dataclass
class RunningEngine:
    server: grpc.aio.Server
    engine: FakeEngine
    health: grpc_health.aio.HealthServicer
    address: str

    async def set_serving(self, is_serving: bool = True) -> None:
        await self.health.set(ENGINE_SERVICE, SERVING if is_serving else NOT_SERVING)


async def start_fake_engine(address: str = "127.0.0.1:0", is_serving: bool = True,
                            max_message_bytes: int = ENGINE_MAX_MESSAGE_BYTES) -> RunningEngine:
    """A fake engine serving on `address`; it refuses messages over `max_message_bytes`."""
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", max_message_bytes)])
    engine = FakeEngine()
    health = grpc_health.aio.HealthServicer()
    engine_pb2_grpc.add_EngineServicer_to_server(engine, server)
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    port = server.add_insecure_port(address)
    await server.start()
    if address.endswith(":0"):
        address = f"{address.rsplit(':', 1)[0]}:{port}"
    running = RunningEngine(server, engine, health, address)
    await running.set_serving(is_serving)
    return running


def fast_config(engine_addresses: tuple[str, ...], **overrides) -> GatewayConfig:
    """A gateway config for tests: loopback, free port, quick health polls, short grace."""
    values = dict(
        listen="127.0.0.1:0", engine_addresses=engine_addresses,
        health_poll_interval_s=0.05, health_check_timeout_s=0.5, grace_period_s=0.2,
        rpc_timeout_s=5.0, engine_streams=ENGINE_STREAMS[0],
    )
    values.update(overrides)
    return GatewayConfig(**values)


@dataclasses.dataclass
class Client:
    channel: grpc.aio.Channel
    stub: generation_pb2_grpc.GenerationStub
    health: health_pb2_grpc.HealthStub

    async def health_status(self, service: str = "") -> int:
        response = await self.health.Check(health_pb2.HealthCheckRequest(service=service))
        return response.status


@contextlib.asynccontextmanager
async def running_gateway(
    config: GatewayConfig, credentials: grpc.ChannelCredentials | None = None
) -> AsyncIterator[tuple[GatewayServer, Client]]:
    """A started gateway and a client (plain text, or TLS with `credentials`)."""
    server = await build_server(config)
    await server.start()
    target = f"127.0.0.1:{server.port}"
    if credentials is None:
        channel = grpc.aio.insecure_channel(target)
    else:
        channel = grpc.aio.secure_channel(target, credentials)
    client = Client(channel, generation_pb2_grpc.GenerationStub(channel),
                    health_pb2_grpc.HealthStub(channel))
    try:
        yield server, client
    finally:
        await channel.close()
        await server.drain(grace=0)


@contextlib.asynccontextmanager
async def gateway_with_engine(
    is_serving: bool = True, wait_ready: bool = True,
    credentials: grpc.ChannelCredentials | None = None,
    engine_max_message_bytes: int = ENGINE_MAX_MESSAGE_BYTES, **overrides
) -> AsyncIterator[tuple[GatewayServer, Client, RunningEngine]]:
    """A fake engine on loopback and a gateway in front of it (config `overrides`)."""
    engine = await start_fake_engine(is_serving=is_serving,
                                     max_message_bytes=engine_max_message_bytes)
    try:  # a config that does not validate must not leave the engine running (a hang)
        config = fast_config((engine.address,), **overrides)
        async with running_gateway(config, credentials) as (server, client):
            if wait_ready:
                await wait_for_status(client, SERVING)
            yield server, client, engine
    finally:
        await engine.server.stop(0)


async def wait_for_status(client: Client, status: int, timeout: float = 5.0,
                          service: str = "") -> None:
    await wait_until(lambda: _status_is(client, status, service), timeout)


async def _status_is(client: Client, status: int, service: str) -> bool:
    return await client.health_status(service) == status


async def wait_until(predicate, timeout: float = 5.0) -> None:
    """Polls `predicate` (a plain or async callable) until it is true."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        await asyncio.sleep(0.02)


# --- running async test bodies ------------------------------------------------------


def run(coro, timeout: float = 30) -> None:
    """Runs an async test body, failing it after ``timeout`` seconds."""
    asyncio.run(asyncio.wait_for(coro, timeout=timeout))


async def rpc_error(awaitable) -> grpc.aio.AioRpcError:
    """The error that ``awaitable`` (a call) ends with; fails the test if it succeeds."""
    import pytest

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await awaitable
    return caught.value


async def stream_error(call) -> grpc.aio.AioRpcError:
    """The error that a streaming call ends with, after whatever it streamed first."""

    async def consume() -> None:
        async for _ in call:
            pass

    return await rpc_error(consume())
