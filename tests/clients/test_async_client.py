"""tandem.client.AsyncClient against the fake gateway: the same requests and answers as the
blocking client, as coroutines and async iterators."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from grpc_health.v1 import health_pb2

from tandem.client import AsyncClient, Completion, TandemError, Timing, TokenLogprob
from tandem.v1 import generation_pb2 as pb

pytestmark = pytest.mark.timeout(60)


def run(fake, body, **kwargs):
    async def main():
        async with AsyncClient(fake.address, timeout=10, **kwargs) as client:
            return await body(client)
    return asyncio.run(main())


def test_generate_and_stream(fake):
    async def body(client):
        out = await client.generate("Hello", max_tokens=8, temperature=0, request_id="r-1",
                                    priority=2, stop="END")
        request = fake.generation.requests[-1]
        assert (request.text, request.request_id, request.priority) == ("Hello", "r-1", 2)
        assert request.sampling.HasField("temperature") and list(request.sampling.stop) == [
            "END"]
        assert out == Completion(
            text="Hello world", token_ids=[11, 12, 13, 14], finish_reason="length",
            prompt_tokens=5, completion_tokens=4, logprobs=[TokenLogprob(11, -0.5, [], "Hel")],
            request_id="r-1", timing=Timing(0.25, 0.5, 1.5), cached_prompt_tokens=2)
        deltas = [d async for d in client.stream(messages=[("user", "Hi")], max_tokens=3)]
        assert [d.text for d in deltas] == ["Hel", "lo", " world"]
        assert (deltas[-1].finish_reason, deltas[-1].completion_tokens) == ("length", 4)
        assert fake.generation.requests[-1].messages.messages[0].content == "Hi"
    run(fake, body)


def test_leaving_a_stream_early_cancels_it(fake):
    fake.generation.chunks = fake.generation.chunks[:1]
    fake.generation.hang = True

    async def body(client):
        deltas = client.stream("Hello")
        assert (await anext(deltas)).text == "Hel"
        await deltas.aclose()
    run(fake, body)
    assert fake.generation.cancelled.wait(10)


def test_errors_become_tandem_errors_and_bad_arguments_stay_local(fake):
    async def body(client):
        with pytest.raises(TypeError, match="temprature"):
            await client.generate("Hello", temprature=0)
        with pytest.raises(ValueError, match="exactly one"):
            client.stream()
        assert fake.generation.requests == []
        fake.generation.error = (grpc.StatusCode.INVALID_ARGUMENT, "sampling.top_p: bad")
        with pytest.raises(TandemError) as info:
            await client.generate("Hello", top_p=1.5)
        assert (info.value.code, info.value.message) == (grpc.StatusCode.INVALID_ARGUMENT,
                                                         "sampling.top_p: bad")
        fake.generation.error = (grpc.StatusCode.RESOURCE_EXHAUSTED, "queue full")
        fake.generation.error_after = 1
        got = []
        with pytest.raises(TandemError) as info:
            async for delta in client.stream("Hello"):
                got.append(delta.text)
        assert got == ["Hel"] and info.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    run(fake, body)


def test_api_key_tokenize_model_info_health(fake):
    async def body(client):
        tokens = await client.tokenize("Hello world")
        assert tokens.tokens == ["<s>", "Hello", "Ġworld"]
        assert fake.generation.requests[-1] == pb.TokenizeRequest(text="Hello world")
        assert (await client.model_info()).model == "fake-model"
        assert await client.health() == "SERVING"
        fake.health.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
        assert await client.health() == "NOT_SERVING"
    run(fake, body, api_key="s3cret")
    assert fake.generation.metadata[-1]["authorization"] == "Bearer s3cret"
