"""The internal gRPC face of an engine (``tandem.internal.v1.Engine``). Thin: it
converts, hands requests to the engine thread, and relays outputs."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import logging
import threading
import time
from collections.abc import Callable

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from tandem.internal.v1 import engine_pb2, engine_pb2_grpc
from tandem.link import ENGINE_MAX_MESSAGE_BYTES
from tandem.v1 import generation_pb2 as pb
from tokenizer_svc import convert
from tokenizer_svc.config import EngineConfig
from tokenizer_svc.engine import Engine
from tokenizer_svc.metrics import EngineMetrics
from tokenizer_svc.request import Request, RequestOutput
from tokenizer_svc.tokenization import ModelTokenizer

log = logging.getLogger("tokenizer_svc.server")
SERVICE = "tandem.internal.v1.Engine"
MUX_POLL_S = 0.5  # a GenerateMany stream with nothing to send rechecks for its end this often
MUX_MESSAGE_BYTES = 1 << 20  # EngineEvents messages are cut at about this size


class OutputBridge:
    """Hands outputs from the engine thread to the event loop (a request's queue, or its
    multiplexed stream) with one wake-up per burst (a step's outputs for every request),
    not one per output: each wake-up is a write to the loop's self-pipe, and the loop then
    contends for the GIL with the engine thread, which is still applying the step."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._lock = threading.Lock()
        self._pending: list[tuple[Callable[[RequestOutput], None], RequestOutput]] = []
        self._ready = 0  # leading pending outputs that no open burst holds back
        self._scheduled = False  # a _deliver is on its way to the loop
        self._held = 0  # bursts open

    def post(self, deliver: Callable[[RequestOutput], None], out: RequestOutput) -> None:
        """Any thread: ``deliver(out)`` on the loop, in the order of posting."""
        with self._lock:
            self._pending.append((deliver, out))
            wake = self._release()
        if wake:
            self.loop.call_soon_threadsafe(self._deliver)

    @contextlib.contextmanager
    def burst(self):
        """Engine thread, around a step's outputs: they reach the loop together, with one
        wake-up at the end. A loop woken at the first output takes the GIL while the rest
        are still being made, and a multiplexed stream then sends one step in several
        messages (~3 at 128 requests, measured)."""
        with self._lock:
            self._held += 1
        try:
            yield
        finally:
            with self._lock:
                self._held -= 1
                wake = self._release()
            if wake:
                self.loop.call_soon_threadsafe(self._deliver)

    def _release(self) -> bool:
        """Under the lock: all that waits is ready unless a burst is open; True if the loop
        must be woken for it."""
        if self._held:
            return False
        self._ready = len(self._pending)
        wake = bool(self._ready) and not self._scheduled
        self._scheduled |= wake
        return wake

    def _deliver(self) -> None:
        with self._lock:
            ready, self._pending = self._pending[:self._ready], self._pending[self._ready:]
            self._ready, self._scheduled = 0, False
        for deliver, out in ready:
            deliver(out)


async def _deltas(outputs: asyncio.Queue):
    """A request's outputs up to its last: those already waiting when one is taken go out
    with it, as one delta (a stream that has fallen behind catches up in fewer messages).
    An error output is never merged: it ends the stream on its own."""
    held = None
    while True:
        out, held = held or await outputs.get(), None
        while out.finish_reason is None and out.error is None and not outputs.empty():
            later = outputs.get_nowait()
            if later.error is not None:
                held = later
                break
            out.extend(later)
        yield out
        if out.finish_reason is not None or out.error is not None:
            return


class Refused(Exception):
    """A request the engine will not run: the status code and message its caller gets."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message


class _Muxed:
    """One ``GenerateMany`` stream's state: the requests it runs and the events that wait
    to be sent. Touched on the event loop only (outputs arrive through the OutputBridge)."""

    def __init__(self, token_text: Callable[[int], str] | None = None) -> None:
        self.token_text = token_text  # names the tokens of logprobs
        self.active: dict[str, str] = {}  # caller's request id -> engine's request id
        self.accepting: set[str] = set()  # started, still being checked and tokenized
        self.cancelled: set[str] = set()  # cancelled while being accepted
        self.is_closed = False  # the stream has ended: requests still being accepted drop
        self.pending: list[tuple[str, RequestOutput | Refused]] = []
        self.wake = asyncio.Event()

    def push(self, rid: str, item: RequestOutput | Refused) -> None:
        if isinstance(item, Refused) or item.error is not None or item.finish_reason is not None:
            self.active.pop(rid, None)
        self.pending.append((rid, item))
        self.wake.set()

    async def take(self, timeout: float) -> engine_pb2.EngineEvents:
        """The waiting events (after at most ``timeout`` s); a request's outputs that
        queued up go out as one, as on a stream of its own."""
        if not self.pending:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.wake.wait(), timeout)
        self.wake.clear()
        pending, self.pending = self.pending, []
        merged: dict[str, RequestOutput] = {}
        order: list[tuple[str, RequestOutput | Refused]] = []
        for rid, item in pending:
            if isinstance(item, RequestOutput) and item.error is None:
                earlier = merged.get(rid)
                if earlier is not None and earlier.finish_reason is None:
                    earlier.extend(item)
                    continue
                merged[rid] = item
            order.append((rid, item))
        message = engine_pb2.EngineEvents()
        for rid, item in order:  # filled in place: a field passed to a constructor is copied
            _fill_event(message.events.add(), rid, item, self.token_text)
        return message


def _retrieve(task: asyncio.Task) -> None:
    if not task.cancelled():
        task.exception()


def _fill_event(event: engine_pb2.EngineEvent, rid: str, item: RequestOutput | Refused,
                token_text: Callable[[int], str] | None) -> None:
    event.request_id = rid
    if isinstance(item, Refused):
        event.error_code, event.error_message = item.code.value[0], item.message
    elif item.error is not None:
        event.error_code = grpc.StatusCode[item.error_code].value[0]
        event.error_message = item.error
    else:
        convert.output_to_pb(item, rid, event.output, token_text)


def _batches(message: engine_pb2.EngineEvents, limit: int):
    """``message`` as EngineEvents messages of at most ~``limit`` bytes each (itself, unless
    it is larger: measured once, not event by event); none if it holds no events."""
    if not message.events:
        return
    if message.ByteSize() <= limit:
        yield message
        return
    batch, size = [], 0
    for event in message.events:
        n = event.ByteSize()
        if batch and size + n > limit:
            yield engine_pb2.EngineEvents(events=batch)
            batch, size = [], 0
        batch.append(event)
        size += n
    if batch:
        yield engine_pb2.EngineEvents(events=batch)


class EngineServicer(engine_pb2_grpc.EngineServicer):
    def __init__(self, cfg: EngineConfig, tok: ModelTokenizer, model_name: str,
                 metrics: EngineMetrics) -> None:
        self.cfg = cfg
        self.tok = tok
        self.model_name = model_name
        self.metrics = metrics
        self.draining = False  # SIGTERM: refuse new requests, finish the running ones
        self.engine: Engine | None = None  # set once the worker is ready
        self.device = ""  # where the worker runs the model, and in which dtype
        self.dtype = ""
        self.bridge: OutputBridge | None = None  # outputs from the engine thread, made on first use
        self._num_requests = itertools.count()  # makes every engine-side request id unique
        self.num_calls = 0  # Generate and GenerateMany calls still sending: drain waits for them

    async def Generate(self, request: engine_pb2.EngineRequest, context):
        try:
            engine, req = await self._accept(request)
        except Refused as exc:
            await context.abort(exc.code, exc.message)
        outputs: asyncio.Queue = asyncio.Queue()
        engine.add_request(req, functools.partial(self._bridge(engine).post, outputs.put_nowait))
        finished = False
        self.num_calls += 1
        try:
            async for out in _deltas(outputs):
                if out.error is not None:
                    await context.abort(grpc.StatusCode[out.error_code], out.error)
                finished = out.finish_reason is not None
                yield convert.output_to_pb(out, request.request.request_id or request.request_id,
                                           token_text=self.tok.token_text)
        finally:
            self.num_calls -= 1
            if not finished:  # the caller went away (or we failed): free its blocks
                engine.abort(req.req_id)

    async def GenerateMany(self, calls, context):
        muxed = _Muxed(self.tok.token_text)
        reader = asyncio.create_task(self._read_calls(calls, muxed))
        reader.add_done_callback(_retrieve)  # a caller that broke off: nothing to report
        self.num_calls += 1
        try:
            while True:
                for message in _batches(await muxed.take(MUX_POLL_S), MUX_MESSAGE_BYTES):
                    yield message
                if (reader.done() or self.draining) and not muxed.active and \
                        not muxed.accepting and not muxed.pending:
                    return  # half-closed, or draining, with nothing left to send
        finally:
            self.num_calls -= 1
            muxed.is_closed = True  # those still being tokenized never reach the engine
            reader.cancel()
            for req_id in muxed.active.values():  # the caller went away: free their blocks
                self.engine.abort(req_id)

    async def _read_calls(self, calls, muxed: _Muxed) -> None:
        starts: set[asyncio.Task] = set()
        async for call in calls:
            if call.WhichOneof("call") == "start":
                task = asyncio.create_task(self._start_muxed(call.start, muxed))
                starts.add(task)
                task.add_done_callback(starts.discard)
            elif call.WhichOneof("call") == "cancel":
                req_id = muxed.active.pop(call.cancel, None)
                if req_id is not None:
                    self.engine.abort(req_id)
                elif call.cancel in muxed.accepting:
                    muxed.cancelled.add(call.cancel)
        await asyncio.gather(*starts)

    async def _start_muxed(self, request: engine_pb2.EngineRequest, muxed: _Muxed) -> None:
        rid = request.request_id
        muxed.accepting.add(rid)
        try:
            engine, req = await self._accept(request)
        except Exception as exc:  # noqa: BLE001 - ends this request alone, as Generate would
            if not isinstance(exc, Refused):
                log.exception("request %s could not start", rid)
                exc = Refused(grpc.StatusCode.INTERNAL, f"the engine could not start it: {exc}")
            if rid not in muxed.cancelled:
                muxed.push(rid, exc)
            return
        finally:
            muxed.accepting.discard(rid)
        if rid in muxed.cancelled or muxed.is_closed:  # the caller gave up (or went away)
            muxed.cancelled.discard(rid)  # while it was being tokenized
            return
        muxed.active[rid] = req.req_id
        engine.add_request(req, functools.partial(self._bridge(engine).post,
                                                  functools.partial(muxed.push, rid)))

    def _bridge(self, engine: Engine) -> OutputBridge:
        if self.bridge is None:
            self.bridge = OutputBridge(asyncio.get_running_loop())
            engine.output_burst = self.bridge.burst
        return self.bridge

    async def _accept(self, request: engine_pb2.EngineRequest) -> tuple[Engine, Request]:
        """The engine and the request, checked and tokenized; else raises Refused."""
        engine = self._ready_engine()
        if self.draining:
            raise Refused(grpc.StatusCode.UNAVAILABLE, "the engine is shutting down")
        req = await self._build(request)
        self._admit(engine, req)
        return engine, req

    def _ready_engine(self) -> Engine:
        if self.engine is None:
            raise Refused(grpc.StatusCode.UNAVAILABLE, "the engine is still warming up")
        if self.engine.fatal is not None:
            raise Refused(grpc.StatusCode.UNAVAILABLE, f"engine failed: {self.engine.fatal}")
        return self.engine

    async def _engine(self, context) -> Engine:
        try:
            return self._ready_engine()
        except Refused as exc:
            await context.abort(exc.code, exc.message)

    async def _build(self, request: engine_pb2.EngineRequest) -> Request:
        loop = asyncio.get_running_loop()
        try:
            ids = await loop.run_in_executor(None, convert.prompt_ids, request.request, self.tok)
            sched = self.cfg.scheduler
            options = convert.sampling_options(request.request.sampling, len(ids),
                                               self.tok.max_context, sched.default_max_tokens,
                                               self.tok.eos_token_ids, self._cache_tokens(),
                                               sched.max_top_logprobs)
        except convert.InvalidRequest as exc:
            self.metrics.rejected.labels("invalid").inc()
            raise Refused(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from None
        # unique on the engine even if a client reuses an id (the gateway never does)
        req_id = f"{request.request_id}.{next(self._num_requests)}"
        return Request(req_id, ids, options, arrival=time.monotonic(),
                       priority=request.request.priority)

    def _admit(self, engine: Engine, req: Request) -> None:
        """Refuse at once, with the limit named, when the waiting queue is full, unless
        waiting requests of lower priority can make way (`Engine.make_way`)."""
        sched = self.cfg.scheduler
        if engine.make_way(req, sched.max_waiting_requests, sched.max_waiting_tokens):
            return
        num_requests, num_tokens = engine.queued()
        if num_requests >= sched.max_waiting_requests:
            reason = (f"the engine's queue is full: {num_requests} requests waiting "
                      f"(--max-waiting-requests {sched.max_waiting_requests}); retry later")
        elif num_tokens + len(req.prompt_ids) > sched.max_waiting_tokens:
            reason = (f"the engine's queue is full: {num_tokens} prompt tokens waiting, "
                      f"{len(req.prompt_ids)} more would pass --max-waiting-tokens "
                      f"{sched.max_waiting_tokens}; retry later")
        else:
            return
        self.metrics.rejected.labels("queue_full").inc()
        raise Refused(grpc.StatusCode.RESOURCE_EXHAUSTED, reason)

    def _cache_tokens(self) -> int:
        """The most tokens' KV one request may hold: the cache less the watermark. The last
        sampled token is never fed back, so its KV is never written: a request holds at most
        prompt + max_tokens - 1 tokens' KV (and the scheduler never asks for more,
        recomputing or not)."""
        blocks = self.engine.scheduler.blocks
        usable = blocks.num_blocks - self.engine.scheduler.limits.watermark_blocks
        return usable * blocks.block_size

    async def Tokenize(self, request: pb.TokenizeRequest, context):
        try:
            ids = convert.prompt_ids(request, self.tok)
        except convert.InvalidRequest as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        return pb.TokenizeResponse(token_ids=ids, tokens=self.tok.token_strings(ids))

    async def GetModelInfo(self, request, context):
        engine = await self._engine(context)
        blocks, sched = engine.scheduler.blocks, self.cfg.scheduler
        return pb.ModelInfo(
            model=self.model_name, vocab_size=self.tok.vocab_size,
            max_context_tokens=self.tok.max_context, default_max_tokens=sched.default_max_tokens,
            eos_token_ids=sorted(self.tok.eos_token_ids), max_top_logprobs=sched.max_top_logprobs,
            device=self.device, dtype=self.dtype,
            mode="async" if sched.overlap else "sync",
            kv_block_size=blocks.block_size, kv_num_blocks=blocks.num_blocks)

    async def GetStats(self, request, context):
        engine = await self._engine(context)
        s = engine.scheduler
        return engine_pb2.EngineStats(
            num_running=len(s.running), num_waiting=len(s.waiting),
            kv_blocks_total=s.blocks.num_blocks, kv_blocks_free=s.blocks.num_free,
            num_preemptions=s.num_preemptions, num_batches=engine.num_batches,
            num_finished=engine.num_finished, num_tokens=engine.num_tokens,
            num_sampled=engine.num_sampled)

    async def StartTrace(self, request, context):
        summary = await self._trace(context, True, "")
        return engine_pb2.TraceReply(num_batches=summary.get("num_batches", 0))

    async def StopTrace(self, request, context):
        if not request.path:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "path: required")
        summary = await self._trace(context, False, request.path)
        return engine_pb2.TraceReply(path=summary.get("path", ""),
                                     num_kernels=summary.get("num_kernels", 0),
                                     num_batches=summary.get("num_batches", 0))

    async def _trace(self, context, start: bool, path: str) -> dict:
        engine = await self._engine(context)
        return await asyncio.wrap_future(engine.trace(start, path))


async def start_server(cfg: EngineConfig, servicer: EngineServicer):
    """Serve the Engine and health services; health says NOT_SERVING until ready."""
    server = grpc.aio.server(options=[
        ("grpc.max_receive_message_length", ENGINE_MAX_MESSAGE_BYTES),
        ("grpc.max_send_message_length", ENGINE_MAX_MESSAGE_BYTES),
    ])
    engine_pb2_grpc.add_EngineServicer_to_server(servicer, server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for name in ("", SERVICE):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    server.add_insecure_port(cfg.listen)
    await server.start()
    log.info("engine listening on %s", cfg.listen)
    return server, health_servicer


async def set_health(health_servicer, serving: bool) -> None:
    status = health_pb2.HealthCheckResponse.SERVING if serving else \
        health_pb2.HealthCheckResponse.NOT_SERVING
    for name in ("", SERVICE):
        await health_servicer.set(name, status)
