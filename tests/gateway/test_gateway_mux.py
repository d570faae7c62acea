"""The gateway's multiplexed engine stream (gateway.mux) against a scripted engine: outputs,
refusals with their own code, cancellation, deadlines, and a broken stream."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from gateway.mux import EngineMux
from tandem.internal.v1 import engine_pb2, engine_pb2_grpc
from tandem.v1 import generation_pb2 as pb
from tests.gateway.gateway_fakes import run, wait_until


class ScriptedEngine(engine_pb2_grpc.EngineServicer):
    """GenerateMany by request id: "ok…" two outputs, the last finished; "refuse…" a
    RESOURCE_EXHAUSTED refusal; "hang…" nothing; "flood…" 100 outputs, none finished;
    "break…" fails the whole stream."""

    def __init__(self) -> None:
        self.cancelled: list[str] = []
        self.streams = 0

    async def GenerateMany(self, calls, context):
        self.streams += 1
        async for call in calls:
            if call.WhichOneof("call") == "cancel":
                self.cancelled.append(call.cancel)
                continue
            rid = call.start.request_id
            if rid.startswith("ok"):
                yield engine_pb2.EngineEvents(events=[engine_pb2.EngineEvent(
                    request_id=rid, output=pb.GenerateStreamResponse(text="a", token_ids=[1]))])
                yield engine_pb2.EngineEvents(events=[engine_pb2.EngineEvent(
                    request_id=rid, output=pb.GenerateStreamResponse(
                        text="b", token_ids=[2], finish_reason=pb.FINISH_REASON_LENGTH))])
            elif rid.startswith("refuse"):
                yield engine_pb2.EngineEvents(events=[engine_pb2.EngineEvent(
                    request_id=rid, error_code=grpc.StatusCode.RESOURCE_EXHAUSTED.value[0],
                    error_message="queue full")])
            elif rid.startswith("flood"):
                yield engine_pb2.EngineEvents(events=[engine_pb2.EngineEvent(
                    request_id=rid, output=pb.GenerateStreamResponse(text="x", token_ids=[1]))
                    for _ in range(100)])
            elif rid.startswith("break"):
                await context.abort(grpc.StatusCode.UNAVAILABLE, "engine going away")


async def with_mux(body):
    engine = ScriptedEngine()
    server = grpc.aio.server()
    engine_pb2_grpc.add_EngineServicer_to_server(engine, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    mux = EngineMux(engine_pb2_grpc.EngineStub(channel), "fake")
    try:
        await body(mux, engine)
    finally:
        await mux.close()
        await channel.close()
        await server.stop(None)


def start(mux, rid, timeout=None):
    return mux.start(engine_pb2.EngineRequest(request_id=rid, request=pb.GenerateRequest(
        text="hi")), timeout)


async def texts(call):
    return [out.text async for out in call]


def test_requests_share_one_stream_and_a_refusal_keeps_its_code():
    async def body(mux, engine):
        first, refused, second = start(mux, "ok-1"), start(mux, "refuse-1"), start(mux, "ok-2")
        assert await texts(first) == ["a", "b"] and first.done()
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await texts(refused)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert err.value.details() == "queue full"
        assert await texts(second) == ["a", "b"]
        assert engine.streams == 1

    run(with_mux(body))


def test_cancel_tells_the_engine_and_ends_the_iteration():
    async def body(mux, engine):
        call = start(mux, "hang-1")
        waiting = asyncio.create_task(texts(call))
        await asyncio.sleep(0.05)
        assert call.cancel() and not call.cancel()  # only once
        with pytest.raises(asyncio.CancelledError):
            await waiting
        await wait_until(lambda: engine.cancelled)
        assert engine.cancelled == ["hang-1"]

    run(with_mux(body))


def test_a_deadline_is_deadline_exceeded_and_cancels_the_request():
    async def body(mux, engine):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await texts(start(mux, "hang-2", timeout=0.1))
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        await wait_until(lambda: engine.cancelled)
        assert engine.cancelled == ["hang-2"]

    run(with_mux(body))


def test_a_deadline_cancels_the_request_even_while_nobody_reads():
    async def body(mux, engine):
        call = start(mux, "hang-4", timeout=0.1)  # never iterated: the relay is blocked
        await wait_until(lambda: engine.cancelled, timeout=2)
        assert engine.cancelled == ["hang-4"] and call.done()

    run(with_mux(body))


def test_a_deadline_comes_before_the_outputs_still_queued():
    async def body(mux, engine):
        call = start(mux, "flood-1", timeout=0.2)
        await asyncio.sleep(0.4)  # 100 outputs arrive; nobody reads them
        received = []
        with pytest.raises(grpc.aio.AioRpcError) as err:
            async for out in call:
                received.append(out)
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert received == []  # dropped, not relayed after the deadline
        assert engine.cancelled == ["flood-1"]

    run(with_mux(body))


def test_cancel_drops_the_outputs_still_queued():
    async def body(mux, engine):
        call = start(mux, "flood-2")
        await asyncio.sleep(0.2)  # 100 outputs arrive; nobody reads them
        call.cancel()
        received = []
        with pytest.raises(asyncio.CancelledError):
            async for out in call:
                received.append(out)
        assert received == []

    run(with_mux(body))


def test_a_broken_stream_fails_its_requests_and_the_next_one_opens_another():
    async def body(mux, engine):
        hanging = start(mux, "hang-3")
        start(mux, "break-1")
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await texts(hanging)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert await texts(start(mux, "ok-3")) == ["a", "b"]
        assert engine.streams == 2

    run(with_mux(body))
