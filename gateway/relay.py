"""The core of the gateway: route a request to an engine, relay its output, and cancel it
downstream when the client goes away.

`Generate` and `GenerateStream` share one code path: `stream` relays the engine's stream and
`generate` folds that same stream into one `GenerateResponse` (`accumulate`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any, Protocol

import grpc

from gateway.admission import Admission
from gateway.config import GatewayConfig
from gateway.engines import EnginePool, Lease
from gateway.errors import EngineProtocolError, RequestTooLarge, ServerDeadline
from gateway.mux import MuxCall
from gateway.validation import validate_generate_request, validate_tokenize_request
from tandem.internal.v1 import engine_pb2
from tandem.v1 import generation_pb2 as pb

logger = logging.getLogger(__name__)

# what a multiplexed stream adds around an EngineRequest (EngineCall's field tag and length)
ENGINE_CALL_FRAMING_BYTES = 16


class CallContext(Protocol):
    """What the relay needs from a server call (grpc.aio.ServicerContext has it all; `done`,
    `abort` and `set_code` are for `ServerDeadline`)."""

    def time_remaining(self) -> float | None: ...

    def add_done_callback(self, callback: Callable[[Any], None]) -> None: ...

    def done(self) -> bool: ...

    async def abort(self, code: grpc.StatusCode, details: str = "") -> None: ...

    def set_code(self, code: grpc.StatusCode) -> None: ...


def new_request_id() -> str:
    return uuid.uuid4().hex


async def accumulate(chunks: AsyncIterator[pb.GenerateStreamResponse]) -> pb.GenerateResponse:
    """Folds a stream into one response: text, token_ids and logprobs concatenated;
    finish_reason, usage, timing and request_id from the last message."""
    response = pb.GenerateResponse()
    texts: list[str] = []
    last: pb.GenerateStreamResponse | None = None
    async with contextlib.aclosing(chunks):
        async for chunk in chunks:
            texts.append(chunk.text)
            response.token_ids.extend(chunk.token_ids)
            response.logprobs.extend(chunk.logprobs)
            last = chunk
    response.text = "".join(texts)
    if last is not None:
        response.finish_reason = last.finish_reason
        response.request_id = last.request_id
        if last.HasField("usage"):
            response.usage.CopyFrom(last.usage)
        if last.HasField("timing"):
            response.timing.CopyFrom(last.timing)
    return response


class Relay:
    """Routes requests over the engine pool and relays the answers."""

    def __init__(self, pool: EnginePool, config: GatewayConfig, admission: Admission) -> None:
        self._pool = pool
        self._config = config
        self._admission = admission

    def model_info(self) -> pb.ModelInfo:
        return self._pool.model_info()

    async def generate(
        self, request: pb.GenerateRequest, context: CallContext
    ) -> pb.GenerateResponse:
        return await accumulate(self.stream(request, context))

    async def stream(
        self, request: pb.GenerateRequest, context: CallContext
    ) -> AsyncIterator[pb.GenerateStreamResponse]:
        """Admits and validates `request`, runs it on a ready engine (see
        `EnginePool.acquire`) and yields its output.

        The engine call is cancelled however this ends: normally, on error, when this
        generator is closed or cancelled, and when the server call is done (the client
        cancelled or disconnected, its deadline passed, or the server's: `ServerDeadline`).
        """
        if not request.request_id:
            request.request_id = new_request_id()
        req_id = request.request_id
        self._admission.admit(context)
        timeout = context.time_remaining()
        if timeout is None and self._config.default_timeout_s is not None:
            timeout = self._config.default_timeout_s
            ServerDeadline(context, timeout, req_id)  # armed until the call is done
        lease = self._pool.acquire(request)
        context.add_done_callback(lambda _: lease.release())
        try:
            validate_generate_request(request, lease.engine.model_info)
            engine_req_id = new_request_id()  # unique on the engine, whatever the client sent
            engine_request = engine_pb2.EngineRequest(request_id=engine_req_id, request=request)
            _check_size(engine_request, self._config.max_engine_message_bytes)
            call = lease.engine.generate(engine_request, timeout)
            lease.attach(call)
            logger.debug("req_id=%s -> engine %s as %s", req_id, lease.engine.address,
                         engine_req_id)
            async for chunk in _relay(call, lease, req_id):
                yield chunk
        finally:
            lease.release()

    async def tokenize(
        self, request: pb.TokenizeRequest, context: CallContext
    ) -> pb.TokenizeResponse:
        self._admission.admit(context)
        validate_tokenize_request(request)
        lease = self._pool.acquire()
        try:
            call = lease.engine.stub.Tokenize(
                request, timeout=_timeout(context, self._config.rpc_timeout_s)
            )
            lease.attach(call)
            try:
                return await call
            except (asyncio.CancelledError, grpc.aio.AioRpcError):
                lease.raise_if_aborted()
                raise
        finally:
            lease.release()


async def _relay(
    call: grpc.aio.UnaryStreamCall | MuxCall, lease: Lease, req_id: str
) -> AsyncIterator[pb.GenerateStreamResponse]:
    """Yields the engine's messages with the client's request id; checks the stream ended
    with a finish_reason; turns a call cut off by the engine's death into EngineLost."""
    last: pb.GenerateStreamResponse | None = None
    try:
        async for chunk in call:
            chunk.request_id = req_id
            last = chunk
            yield chunk
    except (asyncio.CancelledError, grpc.aio.AioRpcError):
        lease.raise_if_aborted()
        raise
    if last is None or last.finish_reason == pb.FINISH_REASON_UNSPECIFIED:
        raise EngineProtocolError(f"engine {lease.engine.address} ended the stream of "
                                  f"req_id={req_id} without a finish_reason")
    logger.info(
        "req_id=%s finished: %s, prompt_tokens=%d completion_tokens=%d in %.3f s",
        req_id, pb.FinishReason.Name(last.finish_reason), last.usage.prompt_tokens,
        last.usage.completion_tokens, last.timing.total_seconds,
    )


def _check_size(request: engine_pb2.EngineRequest, limit: int) -> None:
    """Refuses a request over the largest message the gateway sends to an engine, before it
    is sent: the engine (or the channel's own limit) would fail the whole stream."""
    num_bytes = request.ByteSize() + ENGINE_CALL_FRAMING_BYTES
    if num_bytes > limit:
        raise RequestTooLarge(num_bytes, limit)


def _timeout(context: CallContext, default: float | None) -> float | None:
    """The client's remaining time if it set a deadline, else the configured default."""
    remaining = context.time_remaining()
    return default if remaining is None else remaining
