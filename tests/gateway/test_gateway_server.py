"""The gateway in-process, in front of a fake engine on loopback, through real gRPC."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from gateway_fakes import (
    MODEL_INFO,
    NOT_SERVING,
    SERVING,
    default_chunks,
    fast_config,
    gateway_with_engine,
    rpc_error,
    running_gateway,
    start_fake_engine,
    wait_for_status,
    wait_until,
)
from gateway_fakes import (
    run as run_body,
)
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from gateway.config import MIB
from gateway.server import build_server
from tandem.v1 import generation_pb2 as pb

pytestmark = pytest.mark.timeout(30)
PER_REQUEST_ONLY = "only a stream of its own can end without a finish_reason"


@pytest.fixture(autouse=True, params=["per-request", "multiplexed"])
def engine_streams(request, monkeypatch):
    """Every test runs with each of the gateway's --engine-streams."""
    import gateway_fakes

    monkeypatch.setattr(gateway_fakes, "ENGINE_STREAMS", [request.param])
    return request.param


def per_request_only(engine_streams: str) -> None:
    if engine_streams != "per-request":
        pytest.skip(PER_REQUEST_ONLY)

GOOD = pb.GenerateRequest(text="Say hello", request_id="client-1")


def run(coro) -> None:
    run_body(coro, timeout=20)


async def stream_error(call) -> tuple[list, grpc.aio.AioRpcError]:
    received = []
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for chunk in call:
            received.append(chunk)
    return received, caught.value


def test_unary_generate_accumulates_the_stream() -> None:
    async def body() -> None:
        async with gateway_with_engine() as (_, client, engine):
            response = await client.stub.Generate(GOOD)
            assert response.text == "Hello world"
            assert list(response.token_ids) == [11, 12, 13, 14]
            assert [lp.token_id for lp in response.logprobs] == [11, 12, 13, 14]
            assert [lp.logprob for lp in response.logprobs] == [-0.5, -0.25, -0.125, -1.0]
            assert response.finish_reason == pb.FINISH_REASON_STOP
            assert (response.usage.prompt_tokens, response.usage.completion_tokens) == (5, 4)
            assert response.timing.total_seconds == pytest.approx(0.05)
            assert response.request_id == "client-1"
            sent = engine.engine.requests[0]
            assert sent.request.text == "Say hello"
            assert sent.request.request_id == "client-1"
            assert sent.request_id and sent.request_id != "client-1"

    run(body())


def test_request_ids_are_made_up_and_unique_per_engine() -> None:
    async def body() -> None:
        async with gateway_with_engine() as (_, client, engine):
            anonymous = await client.stub.Generate(pb.GenerateRequest(text="x"))
            assert len(anonymous.request_id) == 32
            int(anonymous.request_id, 16)
            await client.stub.Generate(GOOD)
            await client.stub.Generate(GOOD)
            internal_ids = [r.request_id for r in engine.engine.requests]
            assert len(set(internal_ids)) == 3

    run(body())


def test_streaming_relays_deltas_in_order() -> None:
    async def body() -> None:
        async with gateway_with_engine() as (_, client, _engine):
            chunks = [c async for c in client.stub.GenerateStream(GOOD)]
            assert [c.text for c in chunks] == ["Hel", "lo", " world"]
            assert [list(c.token_ids) for c in chunks] == [[11], [12, 13], [14]]
            assert all(c.request_id == "client-1" for c in chunks)
            assert [c.finish_reason for c in chunks] == [0, 0, pb.FINISH_REASON_STOP]
            assert chunks[-1].usage.completion_tokens == 4

    run(body())


def test_client_cancelling_a_stream_cancels_the_engine_stream() -> None:
    async def body() -> None:
        async with gateway_with_engine() as (server, client, engine):
            engine.engine.hang = True
            call = client.stub.GenerateStream(GOOD)
            assert (await call.read()).text == "Hel"
            assert (await call.read()).text == "lo"
            assert server.pool.engines[0].num_in_flight == 1
            call.cancel()
            await asyncio.wait_for(engine.engine.cancelled.wait(), timeout=3)
            await wait_until(lambda: server.pool.engines[0].num_in_flight == 0)
            # The gateway still serves the next request.
            engine.engine.hang = False
            assert (await client.stub.Generate(GOOD)).text == "Hello world"

    run(body())


def test_client_deadline_is_relayed_and_cancels_the_engine_call(engine_streams) -> None:
    async def body() -> None:
        async with gateway_with_engine() as (_, client, engine):
            engine.engine.hang = True
            error = await rpc_error(client.stub.Generate(GOOD, timeout=0.5))
            assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            if engine_streams == "per-request":  # multiplexed: the gateway keeps deadlines
                remaining = engine.engine.time_remaining[0]
                assert remaining is not None and 0 < remaining <= 0.55  # clocks differ a bit
            await asyncio.wait_for(engine.engine.cancelled.wait(), timeout=3)

    run(body())


def test_client_deadline_cuts_a_slow_stream_and_cancels_the_engine_stream(
        engine_streams) -> None:
    async def body() -> None:
        async with gateway_with_engine() as (server, client, engine):
            engine.engine.hold_last = asyncio.Event()  # the last chunk never comes
            received, error = await stream_error(client.stub.GenerateStream(GOOD, timeout=0.5))
            assert [chunk.text for chunk in received] == ["Hel", "lo"]
            assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            if engine_streams == "per-request":
                remaining = engine.engine.time_remaining[0]
                assert remaining is not None and 0 < remaining <= 0.55
            await asyncio.wait_for(engine.engine.cancelled.wait(), timeout=3)
            await wait_until(lambda: server.pool.num_in_flight == 0)
            await wait_until(lambda: server.admission.num_in_flight == 0)

    run(body())


def test_default_timeout_applies_without_a_client_deadline(engine_streams) -> None:
    async def body() -> None:
        async with gateway_with_engine(default_timeout_s=0.3) as (_, client, engine):
            engine.engine.hang = True
            error = await rpc_error(client.stub.Generate(GOOD))
            assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            if engine_streams == "per-request":
                assert 0 < engine.engine.time_remaining[0] <= 0.35
            await asyncio.wait_for(engine.engine.cancelled.wait(), timeout=3)

    run(body())


def test_engine_errors_are_relayed_with_code_and_message() -> None:
    async def body() -> None:
        async with gateway_with_engine() as (_, client, engine):
            message = "prompt: 3000 tokens do not fit the context of 2048 tokens"
            engine.engine.error = (grpc.StatusCode.INVALID_ARGUMENT, message)
            error = await rpc_error(client.stub.Generate(GOOD))
            assert (error.code(), error.details()) == (grpc.StatusCode.INVALID_ARGUMENT, message)
            _, error = await stream_error(client.stub.GenerateStream(GOOD))
            assert (error.code(), error.details()) == (grpc.StatusCode.INVALID_ARGUMENT, message)
            engine.engine.error = (grpc.StatusCode.RESOURCE_EXHAUSTED, "queue is full")
            error = await rpc_error(client.stub.Tokenize(pb.TokenizeRequest(text="x")))
            assert (error.code(), error.details()) == (grpc.StatusCode.RESOURCE_EXHAUSTED,
                                                      "queue is full")

    run(body())


def test_health_follows_the_engine() -> None:
    async def body() -> None:
        async with gateway_with_engine(is_serving=False, wait_ready=False) as (_, client, engine):
            await asyncio.sleep(0.2)  # a few health polls
            assert await client.health_status("") == NOT_SERVING
            assert await client.health_status("tandem.v1.Generation") == NOT_SERVING
            await engine.set_serving(True)
            await wait_for_status(client, SERVING)
            assert await client.health_status("tandem.v1.Generation") == SERVING
            await engine.set_serving(False)
            await wait_for_status(client, NOT_SERVING, service="tandem.v1.Generation")
            error = await rpc_error(client.health_status("no.such.Service"))
            assert error.code() == grpc.StatusCode.NOT_FOUND

    run(body())


def test_no_engine_ready_is_unavailable() -> None:
    async def body() -> None:
        async with gateway_with_engine(is_serving=False, wait_ready=False) as (_, client, _e):
            expected = (grpc.StatusCode.UNAVAILABLE, "no engine is ready (model still loading?)")
            error = await rpc_error(client.stub.Generate(GOOD))
            assert (error.code(), error.details()) == expected
            _, error = await stream_error(client.stub.GenerateStream(GOOD))
            assert (error.code(), error.details()) == expected
            error = await rpc_error(client.stub.GetModelInfo(pb.GetModelInfoRequest()))
            assert (error.code(), error.details()) == expected

    run(body())


def test_unreachable_engine_is_unavailable() -> None:
    async def body() -> None:
        async with gateway_with_engine() as (server, client, engine):
            await engine.server.stop(0)  # dies between two health polls
            error = await rpc_error(client.stub.Generate(GOOD))
            assert error.code() == grpc.StatusCode.UNAVAILABLE
            await wait_for_status(client, NOT_SERVING)
            assert not server.pool.is_ready

    run(body())


def test_engine_marked_down_fails_its_streams_with_unavailable() -> None:
    async def body() -> None:
        async with gateway_with_engine() as (server, client, engine):
            engine.engine.hang = True
            call = client.stub.GenerateStream(GOOD)
            assert (await call.read()).text == "Hel"
            assert (await call.read()).text == "lo"
            server.pool.engines[0].mark_down("engine process exited with code -9")
            error = await rpc_error(call.read())
            assert error.code() == grpc.StatusCode.UNAVAILABLE
            assert "went away" in error.details() and "code -9" in error.details()
            await asyncio.wait_for(engine.engine.cancelled.wait(), timeout=3)

    run(body())


def test_reflection_lists_the_services() -> None:
    async def body() -> None:
        async with gateway_with_engine() as (_, client, _engine):
            stub = reflection_pb2_grpc.ServerReflectionStub(client.channel)
            request = reflection_pb2.ServerReflectionRequest(list_services="")
            responses = [r async for r in stub.ServerReflectionInfo(iter([request]))]
            names = {s.name for s in responses[0].list_services_response.service}
            assert {"tandem.v1.Generation", "grpc.health.v1.Health",
                    "grpc.reflection.v1alpha.ServerReflection"} <= names
            symbol = reflection_pb2.ServerReflectionRequest(
                file_containing_symbol="tandem.v1.Generation")
            responses = [r async for r in stub.ServerReflectionInfo(iter([symbol]))]
            assert responses[0].file_descriptor_response.file_descriptor_proto
            # v1, the same messages under the newer service name
            v1 = client.channel.stream_stream(
                "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
                request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
                response_deserializer=reflection_pb2.ServerReflectionResponse.FromString)
            responses = [r async for r in v1(iter([request]))]
            names = {s.name for s in responses[0].list_services_response.service}
            assert {"tandem.v1.Generation", "grpc.reflection.v1.ServerReflection"} <= names

    run(body())


def test_bad_input_is_invalid_argument_and_the_next_request_works() -> None:
    async def body() -> None:
        async with gateway_with_engine() as (_, client, engine):
            bad = pb.GenerateRequest(text="hi", sampling=pb.SamplingParams(top_p=1.5))
            error = await rpc_error(client.stub.Generate(bad))
            assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert error.details() == "sampling.top_p: must lie in (0, 1], got 1.5"
            bad_ids = pb.GenerateRequest(token_ids=pb.TokenIds(ids=[1, 1000]))
            _, error = await stream_error(client.stub.GenerateStream(bad_ids))
            assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert error.details().startswith("token_ids.ids[1]: token id 1000")
            assert engine.engine.requests == []  # never reached the engine
            assert (await client.stub.Generate(GOOD)).text == "Hello world"

    run(body())


def test_tokenize_and_model_info() -> None:
    async def body() -> None:
        async with gateway_with_engine() as (_, client, engine):
            response = await client.stub.Tokenize(pb.TokenizeRequest(text="hello"))
            assert list(response.token_ids) == [7, 8] and list(response.tokens) == ["he", "llo"]
            assert engine.engine.tokenize_requests[0].text == "hello"
            error = await rpc_error(client.stub.Tokenize(pb.TokenizeRequest()))
            assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert await client.stub.GetModelInfo(pb.GetModelInfoRequest()) == MODEL_INFO

    run(body())


def test_stream_without_finish_reason_is_internal(engine_streams) -> None:
    per_request_only(engine_streams)  # multiplexed: events end with a finish or an error

    async def body() -> None:
        async with gateway_with_engine() as (_, client, engine):
            engine.engine.chunks = engine.engine.chunks[:1]
            error = await rpc_error(client.stub.Generate(GOOD))
            assert error.code() == grpc.StatusCode.INTERNAL
            assert "without a finish_reason" in error.details()

    run(body())


def test_unexpected_errors_are_internal_with_a_short_message(monkeypatch) -> None:
    from gateway.relay import Relay

    def broken(self):
        raise KeyError("boom")

    monkeypatch.setattr(Relay, "model_info", broken)

    async def body() -> None:
        async with gateway_with_engine() as (_, client, _engine):
            error = await rpc_error(client.stub.GetModelInfo(pb.GetModelInfoRequest()))
            assert error.code() == grpc.StatusCode.INTERNAL
            assert error.details() == "internal error in the gateway (req_id=-)"
            assert "boom" not in error.details()

    run(body())


def test_requests_over_the_size_limit_are_refused() -> None:
    async def body() -> None:
        async with gateway_with_engine(max_request_bytes=1024) as (_, client, engine):
            error = await rpc_error(client.stub.Generate(pb.GenerateRequest(text="x" * 2000)))
            assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert engine.engine.requests == []
            assert (await client.stub.Generate(GOOD)).text == "Hello world"

    run(body())


def test_routes_to_the_least_loaded_ready_engine() -> None:
    async def body() -> None:
        first, second = await start_fake_engine(), await start_fake_engine()
        idle = await start_fake_engine(is_serving=False)
        addresses = (first.address, second.address, idle.address)
        try:
            async with running_gateway(fast_config(addresses)) as (server, client):
                await wait_until(lambda: sum(e.is_ready for e in server.pool.engines) == 2)
                first.engine.hang = second.engine.hang = True
                calls = [client.stub.GenerateStream(GOOD) for _ in range(4)]
                for call in calls:
                    await call.read()
                assert (len(first.engine.requests), len(second.engine.requests)) == (2, 2)
                assert idle.engine.requests == []
                for call in calls:
                    call.cancel()
                await wait_until(lambda: first.engine.num_active + second.engine.num_active == 0)
        finally:
            for engine in (first, second, idle):
                await engine.server.stop(0)

    run(body())


@pytest.mark.parametrize("routing", ["prefix", "least-loaded"])
def test_prefix_routing_keeps_a_shared_prompt_on_one_engine_within_a_load_margin(
        routing: str) -> None:
    system = "You are a careful assistant. " * 40  # ~1.2 KB: two whole 512-byte chunks

    def chat(user: str) -> pb.GenerateRequest:
        msgs = [pb.ChatMessage(role="system", content=system),
                pb.ChatMessage(role="user", content=user)]
        return pb.GenerateRequest(messages=pb.ChatMessages(messages=msgs))

    async def body() -> None:
        first, second = await start_fake_engine(), await start_fake_engine()
        try:
            config = fast_config((first.address, second.address), routing=routing)
            async with running_gateway(config) as (server, client):
                await wait_until(lambda: sum(e.is_ready for e in server.pool.engines) == 2)
                first.engine.hang = second.engine.hang = True
                calls = []
                for i in range(4):  # one at a time: each sees the loads the last one left
                    calls.append(client.stub.GenerateStream(chat(f"question {i}")))
                    await calls[-1].read()
                loads = sorted((len(first.engine.requests), len(second.engine.requests)))
                # prefix: the engine that has the prompt takes it until it is busier than
                # the other by more than the margin (2): 3 and 1; least-loaded: 2 and 2
                assert loads == ([1, 3] if routing == "prefix" else [2, 2])
                other = pb.GenerateRequest(text="A different long document. " * 40)
                calls.append(client.stub.GenerateStream(other))
                await calls[-1].read()
                assert sorted((len(first.engine.requests), len(second.engine.requests))) == \
                    ([2, 3] if routing == "prefix" else [2, 3])
                for call in calls:
                    call.cancel()
                await wait_until(lambda: first.engine.num_active + second.engine.num_active == 0)
        finally:
            for engine in (first, second):
                await engine.server.stop(0)

    run(body())


def test_a_port_in_use_is_an_error() -> None:
    async def body() -> None:
        async with gateway_with_engine(wait_ready=False) as (server, _client, engine):
            config = fast_config((engine.address,), listen=f"127.0.0.1:{server.port}")
            with pytest.raises(RuntimeError, match="cannot listen on 127.0.0.1"):
                await build_server(config)

    run(body())


def metric(server, method: str, code: str) -> float:
    return server.metrics.registry.get_sample_value(
        "tandem_gateway_requests_total", {"method": method, "code": code}) or 0.0


def test_default_timeout_ends_a_stream_whose_client_stopped_reading(engine_streams) -> None:
    async def body() -> None:
        async with gateway_with_engine(default_timeout_s=0.5) as (server, client, engine):
            big = pb.GenerateStreamResponse(text="y" * 65536, token_ids=[1])
            engine.engine.chunks = [big] * 2000 + default_chunks()[-1:]  # ~128 MiB
            engine.engine.chunk_delay_s = 0.001
            call = client.stub.GenerateStream(GOOD)
            await call.read()  # then it stops reading: the gateway's sends block
            # at the server's deadline: the engine stops, lease and admission are let go
            await wait_until(lambda: server.pool.num_in_flight == 0, timeout=3)
            await wait_until(lambda: server.admission.num_in_flight == 0, timeout=3)
            await wait_until(lambda: engine.engine.num_active == 0, timeout=3)
            if engine_streams == "multiplexed":  # per-request: its own deadline ends it
                assert engine.engine.cancelled.is_set()
            # the client reads what was on its way, then DEADLINE_EXCEEDED
            num_read = 0
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                while await call.read() is not grpc.aio.EOF:
                    num_read += 1
            assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            assert "request timeout (0.5 s)" in caught.value.details()
            assert num_read < 2000 and len(engine.engine.requests) == 1
            await wait_until(lambda: metric(server, "GenerateStream", "DEADLINE_EXCEEDED") == 1)

    run(body())


def exactly(num_bytes: int) -> pb.GenerateRequest:
    """A request of `num_bytes` on the wire (its text's tag and length take 4 of them)."""
    request = pb.GenerateRequest(text="x" * (num_bytes - 4))
    assert request.ByteSize() == num_bytes
    return request


def test_the_largest_request_the_gateway_accepts_fits_the_engine() -> None:
    async def body() -> None:
        limits = dict(max_request_bytes=MIB, max_engine_message_bytes=MIB + 64 * 1024)
        async with gateway_with_engine(engine_max_message_bytes=MIB + 64 * 1024,
                                       **limits) as (_, client, engine):
            assert (await client.stub.Generate(exactly(MIB))).text == "Hello world"
            error = await rpc_error(client.stub.Generate(exactly(MIB + 1)))
            assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED  # refused on arrival
            assert len(engine.engine.requests) == 1

    run(body())


def test_a_request_over_the_engine_message_limit_fails_alone(monkeypatch) -> None:
    import gateway.config

    monkeypatch.setattr(gateway.config, "ENGINE_MESSAGE_MARGIN", 0)  # no room to wrap it

    async def body() -> None:
        async with gateway_with_engine(max_request_bytes=MIB, max_engine_message_bytes=MIB,
                                       engine_max_message_bytes=MIB) as (server, client, engine):
            engine.engine.hang = True
            running = client.stub.GenerateStream(GOOD)
            assert (await running.read()).text == "Hel"
            error = await rpc_error(client.stub.Generate(exactly(MIB)))
            assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "over the gateway's --max-engine-message-bytes (1048576)" in error.details()
            assert (await running.read()).text == "lo"  # the other request goes on
            assert len(engine.engine.requests) == 1 and server.pool.num_in_flight == 1
            running.cancel()

    run(body())


def test_a_request_the_engine_refuses_names_the_engines_limit() -> None:
    async def body() -> None:  # an engine that accepts less than the gateway was told
        async with gateway_with_engine(max_request_bytes=MIB, engine_max_message_bytes=MIB) \
                as (_, client, engine):
            error = await rpc_error(client.stub.Generate(exactly(MIB)))
            assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert error.details().startswith("request larger than the engine accepts")
            assert "--max-response-bytes" not in error.details()
            assert engine.engine.requests == []

    run(body())
