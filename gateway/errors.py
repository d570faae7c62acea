"""The gateway's error types and the one place where errors become gRPC status codes.

Every servicer method is wrapped in `unary_errors` or `stream_errors`; nothing else aborts an
RPC, but for the API-key check (`gateway.security`), which refuses a call with UNAUTHENTICATED
before it reaches a servicer. `status_for` is the mapping itself (pure, unit-tested):

- `InvalidRequest` -> INVALID_ARGUMENT, "<field>: <what is wrong and the limit>"
- `NoEngineReady` -> UNAVAILABLE
- `EngineLost` (the engine died with the request in flight) -> UNAVAILABLE
- `ShuttingDown` (a new request while draining, or one cut off at the end of the grace
  period) -> UNAVAILABLE
- `RequestTooLarge` (a request that would not fit one message to an engine) ->
  RESOURCE_EXHAUSTED naming --max-engine-message-bytes
- an engine's `AioRpcError` -> its own code and details (UNAVAILABLE when the connection fails,
  DEADLINE_EXCEEDED when the deadline we relayed to it ran out, RESOURCE_EXHAUSTED naming the
  limit when a message was too large: an engine's answer over --max-response-bytes, a request
  over --max-engine-message-bytes, or a request over what the engine itself accepts)
- `EngineProtocolError` (the engine broke the internal API) -> INTERNAL
- anything else -> INTERNAL with a short message; the traceback goes to the log.

`ServerDeadline` is the one other place that ends an RPC: at the gateway's own deadline
(--request-timeout), with DEADLINE_EXCEEDED, whatever the handler is doing.
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


class RequestTooLarge(GatewayError):
    """A request that, wrapped for the engine, would be over the largest message the
    gateway sends to an engine: sent anyway, it would fail the stream it travels on (with
    multiplexed engine streams, every request on that engine)."""

    def __init__(self, num_bytes: int, limit: int) -> None:
        super().__init__(f"request too large for the engine: {num_bytes} bytes once wrapped "
                         f"for it, over the gateway's --max-engine-message-bytes ({limit})")


def status_for(exc: BaseException, req_id: str = "-") -> tuple[grpc.StatusCode, str]:
    """The gRPC status code and message a client gets for `exc`."""
    if isinstance(exc, InvalidRequest):
        return grpc.StatusCode.INVALID_ARGUMENT, str(exc)
    if isinstance(exc, (NoEngineReady, EngineLost, ShuttingDown)):
        return grpc.StatusCode.UNAVAILABLE, str(exc)
    if isinstance(exc, RequestTooLarge):
        return grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc)
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
        return code, _too_large(details)
    return code, details or code.name.lower()


def _too_large(details: str) -> str:
    """Which side refused which message, from gRPC's own words: "SERVER: Received message
    larger than max" (the engine refused the request), "CLIENT: Sent ..." (the gateway's
    channel refused to send it), "CLIENT: Received ..." or no side named (the gateway
    refused the engine's answer)."""
    if "SERVER:" in details and "Received message" in details:
        return (f"request larger than the engine accepts ({details}; its limit is below the "
                "gateway's --max-engine-message-bytes)")
    if "SERVER:" in details:
        return f"response larger than the engine may send ({details})"
    if "Sent message" in details:
        return f"request larger than the gateway's --max-engine-message-bytes ({details})"
    return f"response larger than the gateway's --max-response-bytes ({details})"


class ServerDeadline:
    """The gateway's own deadline on a call whose client set none (--request-timeout).

    gRPC enforces a client's deadline in its core, cancelling the call whatever the handler
    is doing. This one the gateway relays to the engine call, but a handler blocked sending
    to a client that stopped reading never sees that call fail, and would keep its lease
    and admission until the client went away. So at the deadline this sends
    DEADLINE_EXCEEDED (unless a status is on its way already; the client reads it after the
    messages already sent) and cancels the handler task, whose done callbacks release the
    lease and admission. It is disarmed when the call is done.
    """

    def __init__(self, context: grpc.aio.ServicerContext, timeout_s: float, req_id: str) -> None:
        self._context = context
        self._timeout_s, self._req_id = timeout_s, req_id
        self._handler = asyncio.current_task()
        self._timer = asyncio.get_running_loop().call_later(timeout_s, self._expire)
        self._sending: asyncio.Task[None] | None = None  # referenced until the call is done
        context.add_done_callback(self._disarm)

    def _expire(self) -> None:
        if self._handler.done():
            return
        if not self._context.done():  # no status sent yet
            # the code now, not in the task that sends it: the handler may see its
            # cancellation first, and the metrics read the code then
            self._context.set_code(grpc.StatusCode.DEADLINE_EXCEEDED)
            self._sending = asyncio.ensure_future(self._send_status())
        self._handler.cancel()

    async def _send_status(self) -> None:
        message = f"deadline exceeded: the server's request timeout ({self._timeout_s:g} s) " \
            "passed"
        logger.info("req_id=%s rejected: DEADLINE_EXCEEDED %s", self._req_id, message)
        try:
            await self._context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, message)
        except grpc.aio.AbortError:
            pass  # sent
        except Exception as exc:  # noqa: BLE001 - the connection is gone: nothing to tell
            logger.debug("req_id=%s deadline status not sent: %r", self._req_id, exc)

    def _disarm(self, _context: object) -> None:
        self._timer.cancel()


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
    except (asyncio.CancelledError, GeneratorExit):  # the client went away, or ServerDeadline
        code = context.code() or grpc.StatusCode.CANCELLED
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
