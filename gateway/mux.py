"""Many requests to one engine over one stream (``--engine-streams multiplexed``).

With a stream per request, an engine step that advances N requests costs the engine N
gRPC messages, and their CPU (most of it in the process that also plans the next batch)
grows with the batch. Over ``Engine.GenerateMany`` a step costs one message that carries
every request's news. :class:`EngineMux` keeps one such stream per engine, opened on first
use and again after it ends, and hands each request a :class:`MuxCall` that behaves like
the per-request call it replaces: iterate it for the request's outputs, ``cancel()`` it,
and it fails with the status code the per-request call would have had (an engine's refusal
with its own code, DEADLINE_EXCEEDED when the timeout passes, UNAVAILABLE when the stream
breaks).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import grpc

from tandem.internal.v1 import engine_pb2
from tandem.v1 import generation_pb2 as pb

_CODES = {code.value[0]: code for code in grpc.StatusCode}
_CANCELLED = object()


def rpc_error(code: grpc.StatusCode, details: str) -> grpc.aio.AioRpcError:
    """The error a failed gRPC call raises, for a request the stream ends."""
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details)


class MuxCall:
    """One request on a multiplexed stream: ``async for`` its outputs; ``cancel()``."""

    def __init__(self, stream: _Stream, request_id: str, timeout: float | None) -> None:
        self._stream, self.request_id = stream, request_id
        self._items: asyncio.Queue = asyncio.Queue()
        self._done = False
        # The deadline is a timer, not a timeout on reading: it must fire even while nobody
        # reads (the relay blocked sending to a client that stopped reading) and while
        # outputs are queued (a read that does not wait never times out).
        self._timer = None if timeout is None else \
            asyncio.get_running_loop().call_later(timeout, self._expire)

    def done(self) -> bool:
        return self._done

    def cancel(self) -> bool:
        """Tells the engine to drop the request; an iteration in progress raises
        CancelledError, as a cancelled gRPC call's does."""
        if self._done:
            return False
        self._stop(_CANCELLED)
        return True

    def _expire(self) -> None:
        if not self._done:
            self._stop(rpc_error(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded"))

    def _stop(self, last: object) -> None:
        """Cancels the request on the engine and ends the iteration with `last`, ahead of
        the outputs still queued (they are dropped)."""
        self._finish()
        self._stream.send_cancel(self.request_id)
        while not self._items.empty():
            self._items.get_nowait()
        self._items.put_nowait(last)

    def deliver(self, item: engine_pb2.EngineEvent | grpc.aio.AioRpcError) -> None:
        if not self._done:
            self._items.put_nowait(item)

    def __aiter__(self) -> AsyncIterator[pb.GenerateStreamResponse]:
        return self._outputs()

    async def _outputs(self) -> AsyncIterator[pb.GenerateStreamResponse]:
        while True:
            item = await self._items.get()
            if item is _CANCELLED:
                raise asyncio.CancelledError()
            if isinstance(item, grpc.aio.AioRpcError):
                self._finish()
                raise item
            if item.error_code:
                self._finish()
                code = _CODES.get(item.error_code, grpc.StatusCode.UNKNOWN)
                raise rpc_error(code, item.error_message)
            yield item.output
            if item.output.finish_reason != pb.FINISH_REASON_UNSPECIFIED:
                self._finish()
                return

    def _finish(self) -> None:
        self._done = True
        if self._timer is not None:
            self._timer.cancel()
        self._stream.forget(self.request_id)


class _Stream:
    """One open GenerateMany call and the requests on it."""

    def __init__(self, stub, address: str) -> None:
        self.address = address
        self.calls: dict[str, MuxCall] = {}
        self.closed = False
        self._outgoing: asyncio.Queue = asyncio.Queue()
        self._call = stub.GenerateMany(self._requests())
        self._reader = asyncio.create_task(self._read(), name=f"mux {address}")

    def start(self, request: engine_pb2.EngineRequest, timeout: float | None) -> MuxCall:
        call = MuxCall(self, request.request_id, timeout)
        self.calls[request.request_id] = call
        self._outgoing.put_nowait(engine_pb2.EngineCall(start=request))
        return call

    def send_cancel(self, request_id: str) -> None:
        if not self.closed:
            self._outgoing.put_nowait(engine_pb2.EngineCall(cancel=request_id))

    def forget(self, request_id: str) -> None:
        self.calls.pop(request_id, None)

    async def close(self) -> None:
        self._call.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._reader

    async def _requests(self):
        while (call := await self._outgoing.get()) is not None:
            yield call

    async def _read(self) -> None:
        error = rpc_error(grpc.StatusCode.UNAVAILABLE,
                          f"engine {self.address} ended the multiplexed stream")
        try:
            async for events in self._call:
                for event in events.events:
                    call = self.calls.get(event.request_id)
                    if call is not None:
                        call.deliver(event)
        except grpc.aio.AioRpcError as exc:
            error = exc
        except asyncio.CancelledError:
            pass
        finally:
            self.closed = True
            self._outgoing.put_nowait(None)
            for call in list(self.calls.values()):
                call.deliver(error)
            self.calls.clear()


class EngineMux:
    """The multiplexed stream to one engine, opened when needed."""

    def __init__(self, stub, address: str) -> None:
        self._stub, self._address = stub, address
        self._stream: _Stream | None = None

    def start(self, request: engine_pb2.EngineRequest, timeout: float | None) -> MuxCall:
        if self._stream is None or self._stream.closed:
            self._stream = _Stream(self._stub, self._address)
        return self._stream.start(request, timeout)

    async def close(self) -> None:
        if self._stream is not None:
            await self._stream.close()
