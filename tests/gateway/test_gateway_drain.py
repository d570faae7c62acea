"""Graceful drain (what SIGTERM does), in-process against a fake engine with slow streams.

`python -m gateway` exiting 0 on SIGTERM with a stream in flight is tested, as a subprocess,
in test_gateway_supervisor.py.
"""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest
from gateway_fakes import (
    NOT_SERVING,
    SERVING,
    gateway_with_engine,
    rpc_error,
    run,
    stream_error,
    wait_for_status,
    wait_until,
)
from grpc_health.v1 import health_pb2

from gateway.admission import Admission
from gateway.errors import ShuttingDown
from tandem.v1 import generation_pb2 as pb

pytestmark = pytest.mark.timeout(60)

GOOD = pb.GenerateRequest(text="Say hello", request_id="drain-1")
SHUTTING_DOWN = (grpc.StatusCode.UNAVAILABLE, "server is shutting down")


def test_drain_finishes_in_flight_requests_and_refuses_new_ones() -> None:
    async def body() -> None:
        async with gateway_with_engine(grace_period_s=30) as (server, client, engine):
            engine.engine.hold_last = asyncio.Event()  # streams stop before their last chunk
            stream = client.stub.GenerateStream(GOOD)
            received = [await stream.read(), await stream.read()]
            unary = asyncio.ensure_future(client.stub.Generate(GOOD))
            await wait_until(lambda: engine.engine.num_active == 2)
            watch = client.health.Watch(health_pb2.HealthCheckRequest(service=""))
            assert (await watch.read()).status == SERVING

            drain = asyncio.create_task(server.drain())
            assert (await asyncio.wait_for(watch.read(), 5)).status == NOT_SERVING
            assert await client.health_status("tandem.v1.Generation") == NOT_SERVING
            error = await rpc_error(client.stub.Generate(GOOD))
            assert (error.code(), error.details()) == SHUTTING_DOWN
            error = await stream_error(client.stub.GenerateStream(GOOD))
            assert (error.code(), error.details()) == SHUTTING_DOWN
            error = await rpc_error(client.stub.Tokenize(pb.TokenizeRequest(text="x")))
            assert (error.code(), error.details()) == SHUTTING_DOWN
            assert len(engine.engine.requests) == 2  # the refused ones never got there
            await asyncio.sleep(0.2)
            assert not drain.done()  # still waiting for the two in flight

            released = time.monotonic()
            engine.engine.hold_last.set()
            while (chunk := await stream.read()) != grpc.aio.EOF:
                received.append(chunk)
            assert [c.text for c in received] == ["Hel", "lo", " world"]
            assert received[-1].finish_reason == pb.FINISH_REASON_STOP
            assert await stream.code() == grpc.StatusCode.OK
            assert (await unary).text == "Hello world"
            # Done as soon as they are, though a health watch is still open.
            await asyncio.wait_for(drain, 10)
            assert time.monotonic() - released < 10
            assert engine.engine.num_cancelled == 0
            assert await server.wait() == 0

    run(body())


def test_drain_cuts_off_requests_still_running_after_the_grace_period() -> None:
    async def body() -> None:
        async with gateway_with_engine() as (server, client, engine):
            engine.engine.hang = True
            stream = client.stub.GenerateStream(GOOD)
            assert [(await stream.read()).text, (await stream.read()).text] == ["Hel", "lo"]
            started = time.monotonic()
            await server.drain(grace=0.3)
            elapsed = time.monotonic() - started
            error = await rpc_error(stream.read())
            assert error.code() == grpc.StatusCode.UNAVAILABLE
            assert error.details() == ("server is shutting down: the request did not finish "
                                       "within the 0.3 s grace period; retry")
            await asyncio.wait_for(engine.engine.cancelled.wait(), 3)
            assert 0.3 <= elapsed < 5
            assert server.admission.num_in_flight == 0 and server.pool.num_in_flight == 0
            assert await server.wait() == 0

    run(body())


def test_drain_with_nothing_in_flight_is_quick_and_idempotent() -> None:
    async def body() -> None:
        async with gateway_with_engine(grace_period_s=30) as (server, client, _):
            await wait_for_status(client, SERVING)
            started = time.monotonic()
            await asyncio.gather(server.drain(), server.drain())
            assert time.monotonic() - started < 5
            await server.drain()

    run(body())


class FakeCall:
    def __init__(self) -> None:
        self.callbacks = []

    def add_done_callback(self, callback) -> None:
        self.callbacks.append(callback)

    def finish(self) -> None:
        for callback in self.callbacks:
            callback(self)


def test_admission_counts_calls_until_done_and_refuses_once_closed() -> None:
    async def body() -> None:
        admission = Admission()
        assert await admission.wait_idle(0)
        first, second = FakeCall(), FakeCall()
        admission.admit(first)
        admission.admit(second)
        admission.close()
        with pytest.raises(ShuttingDown, match="^server is shutting down$"):
            admission.admit(FakeCall())
        assert admission.num_in_flight == 2
        assert not await admission.wait_idle(0.05)
        first.finish()
        assert not await admission.wait_idle(0)
        waiter = asyncio.create_task(admission.wait_idle(5))
        second.finish()
        assert await waiter and admission.num_in_flight == 0

    run(body())
