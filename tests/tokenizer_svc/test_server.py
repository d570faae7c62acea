"""The engine's gRPC servicer around a fake engine: what it refuses, and what it hands
the engine when a multiplexed stream ends."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from tandem.internal.v1 import engine_pb2, engine_pb2_grpc
from tandem.link import ENGINE_MAX_MESSAGE_BYTES
from tandem.v1 import generation_pb2 as pb
from tokenizer_svc.block_manager import BlockManager
from tokenizer_svc.config import EngineConfig
from tokenizer_svc.metrics import EngineMetrics
from tokenizer_svc.scheduler import Scheduler, SchedulerLimits
from tokenizer_svc.server import EngineServicer, Refused, start_server


class FakeTokenizer:
    vocab_size, max_context, eos_token_ids = 100, 64, frozenset({2})

    def token_text(self, token_id: int) -> str:
        return f"<{token_id}>"


class FakeEngine:
    """Records what the servicer hands it; 4 KV blocks of 4 tokens, 1 kept free."""

    def __init__(self) -> None:
        self.added, self.aborted, self.fatal = [], [], None
        self.scheduler = Scheduler(SchedulerLimits(4, 16, watermark_blocks=1),
                                   BlockManager(num_blocks=4, block_size=4))

    def add_request(self, req, sink) -> None:
        self.added.append(req.req_id)

    def abort(self, req_id: str) -> None:
        self.aborted.append(req_id)

    def queued(self) -> tuple[int, int]:
        return 0, 0

    def make_way(self, req, max_requests: int, max_tokens: int) -> bool:
        return True  # an empty queue


def make_servicer(listen: str = "unused") -> EngineServicer:
    servicer = EngineServicer(EngineConfig(listen=listen), FakeTokenizer(), "m", EngineMetrics())
    servicer.engine = FakeEngine()
    return servicer


def engine_request(num_prompt: int, **sampling) -> engine_pb2.EngineRequest:
    return engine_pb2.EngineRequest(request_id="r", request=pb.GenerateRequest(
        token_ids=pb.TokenIds(ids=[5] * num_prompt), sampling=pb.SamplingParams(**sampling)))


def refusal(request: engine_pb2.EngineRequest) -> Refused | None:
    try:
        asyncio.run(make_servicer()._accept(request))
    except Refused as exc:
        return exc
    return None


def test_a_request_that_just_fits_the_kv_cache_is_accepted():
    # 3 usable blocks hold 12 tokens; the last sampled token takes no KV: 5 + 8 - 1 = 12
    assert refusal(engine_request(5, max_tokens=8)) is None
    refused = refusal(engine_request(5, max_tokens=9))
    assert refused.code == grpc.StatusCode.INVALID_ARGUMENT
    assert refused.message.startswith("sampling.max_tokens:") and "(12 tokens)" in refused.message


def test_min_tokens_with_more_ends_than_can_be_banned_is_invalid():
    stops = list(range(10, 42))  # with EOS: 33 distinct
    refused = refusal(engine_request(2, max_tokens=4, min_tokens=2, stop_token_ids=stops))
    assert refused.code == grpc.StatusCode.INVALID_ARGUMENT
    assert refused.message.startswith("sampling.stop_token_ids:")
    assert refusal(engine_request(2, max_tokens=4, stop_token_ids=stops)) is None


def test_a_request_still_tokenized_when_its_stream_ends_never_reaches_the_engine():
    async def main():
        servicer = make_servicer()
        accepting, release = asyncio.Event(), asyncio.Event()
        real_accept = servicer._accept

        async def slow_accept(request):  # tokenization, in an executor, takes a while
            accepting.set()
            await release.wait()
            return await real_accept(request)

        servicer._accept = slow_accept
        calls_open = asyncio.Event()

        async def calls():
            yield engine_pb2.EngineCall(start=engine_request(2, max_tokens=4))
            await calls_open.wait()  # the gateway keeps the stream open ...

        stream = servicer.GenerateMany(calls(), None)
        first = asyncio.ensure_future(stream.__anext__())
        await accepting.wait()
        first.cancel()  # ... and goes away while the request is tokenized
        with pytest.raises(asyncio.CancelledError):
            await first
        await stream.aclose()
        release.set()
        others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        await asyncio.gather(*others, return_exceptions=True)
        return servicer.engine

    engine = asyncio.run(main())
    assert engine.added == [] and engine.aborted == []


def test_the_engine_takes_requests_larger_than_grpcs_default_4_mib(tmp_path):
    text = "x" * (5 << 20)

    async def main():
        servicer = make_servicer(f"unix://{tmp_path}/engine.sock")
        seen = []

        async def accept(request):  # reached the servicer: refuse it, the stream goes on
            seen.append(len(request.request.text))
            raise Refused(grpc.StatusCode.INVALID_ARGUMENT, "seen")

        servicer._accept = accept
        server, _ = await start_server(servicer.cfg, servicer)
        options = [("grpc.max_send_message_length", ENGINE_MAX_MESSAGE_BYTES),
                   ("grpc.max_receive_message_length", ENGINE_MAX_MESSAGE_BYTES)]
        try:
            async with grpc.aio.insecure_channel(servicer.cfg.listen, options=options) as ch:
                call = engine_pb2.EngineCall(start=engine_pb2.EngineRequest(
                    request_id="big", request=pb.GenerateRequest(text=text)))
                stream = engine_pb2_grpc.EngineStub(ch).GenerateMany(iter([call]), timeout=30)
                events = [e async for m in stream for e in m.events]
        finally:
            await server.stop(None)
        return seen, events

    seen, events = asyncio.run(main())
    assert seen == [len(text)]
    assert [(e.request_id, e.error_message) for e in events] == [("big", "seen")]
