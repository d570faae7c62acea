"""`tandem.v1.Generation`: a thin layer over `Relay`; errors are mapped by `gateway.errors`."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc

from gateway.errors import stream_errors, unary_errors
from gateway.metrics import GatewayMetrics
from gateway.relay import Relay
from tandem.v1 import generation_pb2 as pb
from tandem.v1 import generation_pb2_grpc


class GenerationServicer(generation_pb2_grpc.GenerationServicer):
    def __init__(self, relay: Relay, metrics: GatewayMetrics | None = None) -> None:
        self._relay = relay
        self.metrics = metrics  # counted by the error wrappers, with each call's status code

    @unary_errors
    async def Generate(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> pb.GenerateResponse:
        return await self._relay.generate(request, context)

    @stream_errors
    def GenerateStream(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.GenerateStreamResponse]:
        return self._relay.stream(request, context)

    @unary_errors
    async def Tokenize(
        self, request: pb.TokenizeRequest, context: grpc.aio.ServicerContext
    ) -> pb.TokenizeResponse:
        return await self._relay.tokenize(request, context)

    @unary_errors
    async def GetModelInfo(
        self, request: pb.GetModelInfoRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelInfo:
        return self._relay.model_info()
