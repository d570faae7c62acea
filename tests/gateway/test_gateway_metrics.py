"""The gateway's Prometheus metrics: every public call counted once, with the status code it
ended with, whichever side refused it."""

from __future__ import annotations

import asyncio
import urllib.request

import grpc
import pytest
from gateway_fakes import gateway_with_engine, rpc_error, run, wait_until

from tandem.v1 import generation_pb2 as pb

pytestmark = pytest.mark.timeout(30)

GOOD = pb.GenerateRequest(text="Say hello")


def count(server, method: str, code: str) -> float:
    return server.metrics.registry.get_sample_value(
        "tandem_gateway_requests_total", {"method": method, "code": code}) or 0.0


def in_flight(server, method: str) -> float:
    return server.metrics.registry.get_sample_value(
        "tandem_gateway_requests_in_flight", {"method": method}) or 0.0


def test_calls_are_counted_with_their_status_code() -> None:
    async def body() -> None:
        async with gateway_with_engine(metrics_port=0) as (server, client, engine):
            await client.stub.Generate(GOOD)
            async for _ in client.stub.GenerateStream(GOOD):
                pass
            await rpc_error(client.stub.Generate(pb.GenerateRequest(text="")))  # the gateway's
            engine.engine.error = (grpc.StatusCode.RESOURCE_EXHAUSTED, "queue is full")
            await rpc_error(client.stub.Generate(GOOD))  # the engine's refusal
            engine.engine.error = None
            engine.engine.hang = True
            call = client.stub.GenerateStream(GOOD)
            await call.read()
            assert in_flight(server, "GenerateStream") == 1
            call.cancel()
            await wait_until(lambda: count(server, "GenerateStream", "CANCELLED") == 1)
            assert count(server, "Generate", "OK") == 1
            assert count(server, "GenerateStream", "OK") == 1
            assert count(server, "Generate", "INVALID_ARGUMENT") == 1
            assert count(server, "Generate", "RESOURCE_EXHAUSTED") == 1
            assert in_flight(server, "Generate") == in_flight(server, "GenerateStream") == 0
            url = f"http://127.0.0.1:{server.metrics_port}/metrics"
            text = await asyncio.to_thread(
                lambda: urllib.request.urlopen(url, timeout=5).read().decode())
            assert 'tandem_gateway_requests_total{code="INVALID_ARGUMENT",method="Generate"} 1.0' \
                in text

    run(body())
