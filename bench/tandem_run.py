"""One Tandem mode: start an engine (and a gateway), warm up, trace the measured window, stop.

``tandem-sync`` and ``tandem-async`` drive the engine over its internal API
(``tandem.internal.v1.Engine``), without a gateway, so that the numbers are the engine's own:
every request on one ``GenerateMany`` stream, as a gateway sends them by default.
``tandem-gateway`` sends the same requests as ``GenerateStream`` calls of the public API
(``tandem.v1.Generation``) to a gateway in front of the same kind of engine, and
``tandem-http`` as streamed ``POST /v1/completions`` of that gateway's OpenAI-compatible HTTP
API. The trace and the engine's statistics always come from the engine's internal API.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, ExitStack
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import grpc

from bench import analysis
from bench.device import NvmlSampler, result_dict
from bench.services import EngineProcess, EngineSpec, GatewayProcess
from tandem.internal.v1 import engine_pb2, engine_pb2_grpc
from tandem.v1 import generation_pb2 as pb
from tandem.v1 import generation_pb2_grpc

log = logging.getLogger("bench.tandem")
WARMUP_NEW_TOKENS = 8
RPC_TIMEOUT_S = 6 * 3600.0


# --- the client -----------------------------------------------------------------------

Arrivals = list[tuple[float, int]]  # (perf_counter time, tokens in the chunk)
OUTPUTS: dict[str, list[int]] = {}  # request id -> generated ids, of the latest mode run


def _outputs(tag: str) -> list[list[int]]:
    """The generated ids of the requests tagged ``tag``, in request order."""
    return [OUTPUTS[k] for k in sorted(OUTPUTS, key=lambda k: int(k.rsplit("-", 1)[1]))
            if k.startswith(f"{tag}-")]


def outputs_digest(tag: str, outputs: list[list[int]] | None = None) -> str:
    """sha256 over the generated ids of the requests tagged ``tag`` (or over ``outputs``,
    already collected), in request order."""
    ids = _outputs(tag) if outputs is None else outputs
    return hashlib.sha256(json.dumps(ids).encode()).hexdigest()


Send = Callable[[str, list[int], int], AsyncIterator[pb.GenerateStreamResponse]]
"""Starts one streaming generation: (request id, prompt, max_tokens) -> its replies."""


def generate_request(prompt: list[int], max_tokens: int, req_id: str = "") -> pb.GenerateRequest:
    """What every Tandem mode asks for: token ids in, greedy, exactly ``max_tokens`` out."""
    return pb.GenerateRequest(
        token_ids=pb.TokenIds(ids=prompt), request_id=req_id,
        sampling=pb.SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True))


def engine_send(channel: grpc.aio.Channel) -> Send:
    """``Generate`` of the engine's internal API."""
    stub = engine_pb2_grpc.EngineStub(channel)
    return lambda req_id, prompt, max_tokens: stub.Generate(
        engine_pb2.EngineRequest(request_id=req_id,
                                 request=generate_request(prompt, max_tokens)),
        timeout=RPC_TIMEOUT_S)


def engine_mux_send(channel: grpc.aio.Channel, closing: AsyncExitStack) -> Send:
    """``GenerateMany`` of the engine's internal API: every request on one stream, as a
    gateway sends them (``--engine-streams multiplexed``, its default). The stream is
    closed with ``closing``."""
    from gateway.mux import EngineMux

    mux = EngineMux(engine_pb2_grpc.EngineStub(channel), "bench")
    closing.push_async_callback(mux.close)
    return lambda req_id, prompt, max_tokens: mux.start(
        engine_pb2.EngineRequest(request_id=req_id,
                                 request=generate_request(prompt, max_tokens)),
        RPC_TIMEOUT_S)


def gateway_send(channel: grpc.aio.Channel) -> Send:
    """``GenerateStream`` of the public API (the gateway's)."""
    stub = generation_pb2_grpc.GenerationStub(channel)
    return lambda req_id, prompt, max_tokens: stub.GenerateStream(
        generate_request(prompt, max_tokens, req_id), timeout=RPC_TIMEOUT_S)


def http_send(session, base_url: str) -> Send:
    """Streamed ``POST /v1/completions`` of the OpenAI-compatible HTTP API (``session``: an
    aiohttp one), with the token ids asked back (``return_token_ids``)."""
    def send(req_id: str, prompt: list[int], max_tokens: int) -> AsyncIterator:
        body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0,
                "ignore_eos": True, "stream": True, "return_token_ids": True}
        return _sse_replies(session, f"{base_url}/completions", body, req_id)
    return send


async def _sse_replies(session, url: str, body: dict, req_id: str) -> AsyncIterator:
    """Each server-sent chunk as a reply with the ``token_ids`` it carries."""
    async with session.post(url, json=body, headers={"X-Request-Id": req_id}) as response:
        if response.status != 200:
            raise RuntimeError(f"{url}: HTTP {response.status}: {await response.text()}")
        async for line in response.content:
            if not line.startswith(b"data: {"):
                continue
            event = json.loads(line[len(b"data: "):])
            if "error" in event:
                raise RuntimeError(f"{url}: {event['error']}")
            for choice in event["choices"]:
                yield SimpleNamespace(token_ids=choice["token_ids"])


async def _http_session(stack: AsyncExitStack):
    import aiohttp  # only the tandem-http mode needs it

    return await stack.enter_async_context(aiohttp.ClientSession(
        timeout=aiohttp.ClientTimeout(total=RPC_TIMEOUT_S),
        connector=aiohttp.TCPConnector(limit=0)))  # a connection per request


async def _stream(send: Send, req_id: str, prompt: list[int], max_tokens: int) -> Arrivals:
    chunks: Arrivals = []
    token_ids: list[int] = []
    async for reply in send(req_id, prompt, max_tokens):
        if reply.token_ids:
            chunks.append((time.perf_counter(), len(reply.token_ids)))
            token_ids += reply.token_ids
    OUTPUTS.setdefault(req_id, token_ids)
    return chunks


async def generate_all(send: Send, prompts: list[list[int]], max_tokens: int,
                       tag: str) -> list[Arrivals]:
    """Send every prompt at once; each request's chunk arrival times."""
    return list(await asyncio.gather(*(
        _stream(send, f"{tag}-{i}", prompt, max_tokens) for i, prompt in enumerate(prompts))))


def _unimplemented(exc: grpc.aio.AioRpcError, rpc: str) -> str:
    if exc.code() != grpc.StatusCode.UNIMPLEMENTED:
        raise exc
    return f"engine has no {rpc} (UNIMPLEMENTED): no kernel timeline"


async def _start_trace(stub) -> str | None:
    """None once tracing has started, else why not."""
    try:
        await stub.StartTrace(engine_pb2.StartTraceRequest(), timeout=120)
        return None
    except grpc.aio.AioRpcError as exc:
        return _unimplemented(exc, "StartTrace")


async def _stop_trace(stub, path: Path) -> tuple[dict | None, str | None]:
    """The worker's timeline file, read back, or why there is none."""
    try:
        reply = await stub.StopTrace(engine_pb2.StopTraceRequest(path=str(path)), timeout=1800)
    except grpc.aio.AioRpcError as exc:
        return None, _unimplemented(exc, "StopTrace")
    written = Path(reply.path or path)
    return json.loads(written.read_text()), None


def _stats_diff(before, after) -> dict[str, int]:
    names = ("num_batches", "num_tokens", "num_sampled", "num_preemptions")
    return {name: getattr(after, name) - getattr(before, name) for name in names}


@dataclass
class Measured:
    wall_s: float
    arrivals: list[Arrivals]
    trace: dict | None
    notes: list[str]
    engine_stats: dict[str, int]


async def measure(engine_address: str, gateway_address: str | None,
                  prompts: list[list[int]], warm: list[list[int]], new_tokens: int,
                  trace_path: Path, sampler: NvmlSampler, trace: bool = True,
                  http_url: str | None = None) -> Measured:
    """Warm up, then trace and time all prompts sent at once: through the gateway's HTTP
    API at ``http_url``, or its gRPC API, when there is one, else to the engine directly."""
    async with AsyncExitStack() as stack:
        channel = await stack.enter_async_context(grpc.aio.insecure_channel(engine_address))
        stub = engine_pb2_grpc.EngineStub(channel)
        if http_url is not None:
            send = http_send(await _http_session(stack), http_url)
        elif gateway_address is None:
            send = engine_mux_send(channel, stack)
        else:
            send = gateway_send(await stack.enter_async_context(
                grpc.aio.insecure_channel(gateway_address)))
        await generate_all(send, warm, WARMUP_NEW_TOKENS, "warmup")
        notes = ["kernel trace off (--no-trace)"] if not trace else \
            [note] if (note := await _start_trace(stub)) else []
        before = await stub.GetStats(engine_pb2.GetStatsRequest(), timeout=30)
        with sampler:
            started = time.perf_counter()
            arrivals = await generate_all(send, prompts, new_tokens, "bench")
            wall_s = time.perf_counter() - started
        trace = None
        if not notes:
            trace, note = await _stop_trace(stub, trace_path)
            notes += [note] if note else []
        after = await stub.GetStats(engine_pb2.GetStatsRequest(), timeout=30)
    return Measured(wall_s, arrivals, trace, notes, _stats_diff(before, after))


def run_mode(mode: str, spec: EngineSpec, prompts: list[list[int]], warm: list[list[int]],
             new_tokens: int, sampler: NvmlSampler, slice_us: float, run_dir: Path,
             keep_trace: bool, via_gateway: bool = False,
             gateway_args: tuple[str, ...] = (), trace: bool = True,
             via_http: bool = False) -> dict:
    """One Tandem mode, start to stop: its table row (without the floor)."""
    trace_path = (run_dir / f"trace-{mode}.json").resolve()
    OUTPUTS.clear()
    with ExitStack() as processes:  # on exit: the gateway stops first, then the engine
        engine = processes.enter_context(EngineProcess(spec, run_dir / f"{mode}.log"))
        gateway = None
        if via_gateway or via_http:
            gateway = processes.enter_context(
                GatewayProcess(engine.address, run_dir / f"{mode}-gateway.log", gateway_args,
                               http=via_http))
        log.info("%s: %s SERVING, measuring", mode, "gateway" if gateway else "engine")
        got = asyncio.run(measure(engine.address, gateway.address if gateway else None,
                                  prompts, warm, new_tokens, trace_path, sampler, trace,
                                  http_url=gateway.http_url if gateway else None))
    timeline = analysis.analyse_timeline(got.trace, slice_us) if got.trace else None
    if timeline is not None and timeline["busy"] is None:
        got.notes.append(f"trace on {timeline['device'] or 'the device'} holds no kernels")
    if trace_path.exists() and not keep_trace:
        trace_path.unlink()
    outputs = _outputs("bench")
    return analysis.mode_row(mode, got.wall_s, got.arrivals, timeline, result_dict(sampler),
                             got.notes, expected_tokens=len(prompts) * new_tokens,
                             extra={"engine_stats": got.engine_stats,
                                    "outputs_sha256": outputs_digest("bench", outputs),
                                    "output_blocks": analysis.output_blocks(outputs)})
