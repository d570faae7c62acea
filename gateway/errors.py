"""The gateway's error types and the one place where errors become gRPC status codes.

Every servicer method is wrapped in `unary_errors` or `stream_errors`; nothing else aborts an
RPC, but for the API-key check (`gateway.security`), which refuses a call with UNAUTHENTICATED
before it reaches a servicer. `status_for` is the mapping itself (pure, unit-tested):

- `InvalidRequest` -> INVALID_ARGUMENT, "<field>: <what is wrong and the limit>"
- `NoEngineReady` -> UNAVAILABLE
- `EngineLost` (the engine died with the request in flight) -> UNAVAILABLE
- `ShuttingDown` (a new request while draining, or one cut off at the end of the grace
  period) -> UNAVAILABLE
- an engine's `AioRpcError` -> its own code and details (UNAVAILABLE when the connection fails,
  DEADLINE_EXCEEDED when the deadline we relayed to it ran out, RESOURCE_EXHAUSTED naming
  --max-response-bytes when an engine message was over that limit)
- `EngineProtocolError` (the engine broke the internal API) -> INTERNAL
- anything else -> INTERNAL with a short message; the traceback goes to the log.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc

logger = logging.getLogger(__name__)

NO_ENGINE_READY = "no engine is ready (model still loading?)"
# an engine's answers that say the request, not the service, was at fault: logged as INFO
CALLER_CODES = frozenset({grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.DEADLINE_EXCEEDED,
                          grpc.StatusCode.CANCELLED})
SHUTTING_DOWN = "server is shutting down"

Req = TypeVar("Req")
Resp = TypeVar("Resp")


class GatewayError(Exception):
    """A failure the gateway understands; `status_for` knows its code."""


class InvalidRequest(GatewayError):
    """A request that breaks a rule; `field` is its path, like `sampling.top_p`."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


class NoEngineReady(GatewayError):
    """No engine is SERVING with known model info."""

    def __init__(self) -> None:
        super().__init__(NO_ENGINE_READY)


class EngineLost(GatewayError):
    """The engine serving a request went away while it was in flight."""

    def __init__(self, engine: str, reason: str) -> None:
        super().__init__(f"engine {engine} went away mid-request ({reason}); retry")
        self.engine = engine
        self.reason = reason


class ShuttingDown(GatewayError):
    """The gateway is draining: it takes no new requests, and cuts off those still running
    when the grace period ends. Clients should retry on another gateway."""

    def __init__(self, detail: str = "") -> None:
        super().__init__(f"{SHUTTING_DOWN}: {detail}" if detail else SHUTTING_DOWN)


class EngineProtocolError(GatewayError):
    """The engine answered something the internal API does not allow."""


def status_for(exc: BaseException, req_id: str = "-") -> tuple[grpc.StatusCode, str]:
    """The gRPC status code and message a client gets for `exc`."""
    if isinstance(exc, InvalidRequest):
        return grpc.StatusCode.INVALID_ARGUMENT, str(exc)
    if isinstance(exc, (NoEngineReady, EngineLost, ShuttingDown)):
        return grpc.StatusCode.UNAVAILABLE, str(exc)
    if isinstance(exc, grpc.aio.AioRpcError):
        return _engine_status(exc)
    if isinstance(exc, EngineProtocolError):
        return grpc.StatusCode.INTERNAL, str(exc)
    if isinstance(exc, TimeoutError):
        return grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded"
    return grpc.StatusCode.INTERNAL, f"internal error in the gateway (req_id={req_id})"


def _engine_status(exc: grpc.aio.AioRpcError) -> tuple[grpc.StatusCode, str]:
    code, details = exc.code(), exc.details() or ""
    if code == grpc.StatusCode.UNAVAILABLE:
        return code, f"engine unavailable: {details}".rstrip(": ")
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return code, "deadline exceeded while the engine was working on the request"
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED and "larger than max" in details:
        return code, f"response larger than the gateway's --max-response-bytes ({details})"
    return code, details or code.name.lower()


def unary_errors(
    method: Callable[[Any, Req, grpc.aio.ServicerContext], Awaitable[Resp]],
) -> Callable[[Any, Req, grpc.aio.ServicerContext], Awaitable[Resp]]:
    """Wraps a unary servicer method so that its failures end the RPC with the right code."""

    @functools.wraps(method)
    async def wrapper(self: Any, request: Req, context: grpc.aio.ServicerContext) -> Resp:
        with _accounted(self, method.__name__, context):
            try:
                return await method(self, request, context)
            except grpc.aio.AbortError:
                raise
            except Exception as exc:  # noqa: BLE001 - this is the one place errors are mapped
                await _abort(context, exc, _req_id(request), method.__name__)
                raise AssertionError("unreachable: context.abort raises") from exc

    return wrapper


def stream_errors(
    method: Callable[[Any, Req, grpc.aio.ServicerContext], AsyncIterator[Resp]],
) -> Callable[[Any, Req, grpc.aio.ServicerContext], AsyncIterator[Resp]]:
    """Wraps a server-streaming servicer method (an async generator) likewise."""

    @functools.wraps(method)
    async def wrapper(
        self: Any, request: Req, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[Resp]:
        with _accounted(self, method.__name__, context):
            try:
                async for item in method(self, request, context):
                    yield item
            except grpc.aio.AbortError:
                raise
            except Exception as exc:  # noqa: BLE001 - this is the one place errors are mapped
                await _abort(context, exc, _req_id(request), method.__name__)

    return wrapper


@contextlib.contextmanager
def _accounted(servicer: Any, method: str, context: grpc.aio.ServicerContext):
    """Counts the call in ``servicer.metrics`` (a GatewayMetrics, if it has one) with the
    status code it ends with."""
    metrics = getattr(servicer, "metrics", None)
    if metrics is None:
        yield
        return
    start, code = time.monotonic(), grpc.StatusCode.OK
    metrics.started(method)
    try:
        yield
    except grpc.aio.AbortError:
        code = context.code() or grpc.StatusCode.UNKNOWN
        raise
    except (asyncio.CancelledError, GeneratorExit):  # the client went away
        code = grpc.StatusCode.CANCELLED
        raise
    except BaseException:
        code = grpc.StatusCode.UNKNOWN
        raise
    finally:
        metrics.finished(method, code, time.monotonic() - start)


async def _abort(
    context: grpc.aio.ServicerContext, exc: Exception, req_id: str, rpc: str
) -> None:
    code, message = status_for(exc, req_id)
    if not isinstance(exc, (GatewayError, grpc.aio.AioRpcError)):
        logger.exception("req_id=%s %s failed unexpectedly", req_id, rpc, exc_info=exc)
    elif isinstance(exc, InvalidRequest) or code in CALLER_CODES:
        logger.info("req_id=%s %s rejected: %s %s", req_id, rpc, code.name, message)
    elif isinstance(exc, ShuttingDown):
        logger.info("req_id=%s %s: %s", req_id, rpc, message)
    else:
        logger.warning("req_id=%s %s failed: %s %s", req_id, rpc, code.name, message)
    await context.abort(code, message)


def _req_id(request: object) -> str:
    return getattr(request, "request_id", "") or "-"
