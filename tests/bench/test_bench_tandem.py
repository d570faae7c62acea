"""The Tandem modes' client against a stand-in engine: directly, and through a real gateway
process (``python -m gateway --engine ...``) as ``tandem-gateway`` runs it. Both reach the
engine over GenerateMany."""

import asyncio
import threading
from concurrent import futures

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from bench import tandem_run
from bench.device import NvmlSampler
from bench.services import ENGINE_SERVICE, GatewayProcess
from gateway.__main__ import config_from_args
from tandem.internal.v1 import engine_pb2, engine_pb2_grpc
from tandem.v1 import generation_pb2 as pb

VOCAB = 1000
PROMPTS = [[1, 2, 3], [4, 5], [6], [7, 8, 9, 10]]
WARM = [[11], [12]]
NEW_TOKENS = 5


class GreedyEngine(engine_pb2_grpc.EngineServicer):
    """Token k of a request is (sum(prompt) + k) % VOCAB, one per chunk; no trace RPCs."""

    def __init__(self) -> None:
        self.requests: list[engine_pb2.EngineRequest] = []
        self.lock = threading.Lock()

    def Generate(self, request, context):
        with self.lock:
            self.requests.append(request)
        prompt, n = list(request.request.token_ids.ids), request.request.sampling.max_tokens
        for k in range(n):
            last = k == n - 1
            yield pb.GenerateStreamResponse(
                token_ids=[(sum(prompt) + k) % VOCAB],
                finish_reason=pb.FINISH_REASON_LENGTH if last else pb.FINISH_REASON_UNSPECIFIED,
                usage=pb.Usage(prompt_tokens=len(prompt), completion_tokens=n) if last else None)

    def GenerateMany(self, calls, context):
        """Each started request as Generate runs it, one event a message (no cancels)."""
        for call in calls:
            rid = call.start.request_id
            for chunk in self.Generate(call.start, context):
                yield engine_pb2.EngineEvents(events=[
                    engine_pb2.EngineEvent(request_id=rid, output=chunk)])

    def GetModelInfo(self, request, context):
        return pb.ModelInfo(model="greedy", vocab_size=VOCAB, max_context_tokens=64,
                            default_max_tokens=8, device="cpu", dtype="float32", mode="async")

    def GetStats(self, request, context):
        with self.lock:
            return engine_pb2.EngineStats(num_batches=len(self.requests))


@pytest.fixture
def engine():
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=32))
    servicer, checker = GreedyEngine(), health.HealthServicer()
    engine_pb2_grpc.add_EngineServicer_to_server(servicer, server)
    health_pb2_grpc.add_HealthServicer_to_server(checker, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    checker.set(ENGINE_SERVICE, health_pb2.HealthCheckResponse.SERVING)
    yield servicer, f"127.0.0.1:{port}"
    server.stop(0)


def _measure(engine_address, gateway_address, tmp_path, http_url=None) -> tandem_run.Measured:
    tandem_run.OUTPUTS.clear()
    return asyncio.run(tandem_run.measure(engine_address, gateway_address, PROMPTS, WARM,
                                          NEW_TOKENS, tmp_path / "trace.json",
                                          NvmlSampler(False, None), http_url=http_url))


def _as_sent(requests: list[engine_pb2.EngineRequest]) -> list[bytes]:
    """What the engine got, less the request ids (the gateway makes up its own)."""
    sent = []
    for request in requests:
        inner = pb.GenerateRequest()
        inner.CopyFrom(request.request)
        inner.request_id = ""
        sent.append(inner.SerializeToString(deterministic=True))
    return sorted(sent)


def test_through_the_gateway_the_engine_gets_the_same_requests_and_outputs(engine, tmp_path):
    servicer, address = engine
    direct = _measure(address, None, tmp_path)
    direct_digest, direct_sent = tandem_run.outputs_digest("bench"), _as_sent(servicer.requests)
    servicer.requests.clear()
    with GatewayProcess(address, tmp_path / "gateway.log") as gateway:
        via = _measure(address, gateway.address, tmp_path)
    assert tandem_run.outputs_digest("bench") == direct_digest
    assert _as_sent(servicer.requests) == direct_sent
    assert len(direct_sent) == len(WARM) + len(PROMPTS)
    for measured in (direct, via):
        assert [sum(n for _, n in chunks) for chunks in measured.arrivals] == \
            [NEW_TOKENS] * len(PROMPTS)
        assert measured.trace is None and "StartTrace" in measured.notes[0]
        assert measured.engine_stats["num_batches"] == len(PROMPTS)


def test_through_the_http_api_the_engine_gets_the_same_requests_and_outputs(engine, tmp_path):
    pytest.importorskip("aiohttp")
    servicer, address = engine
    _measure(address, None, tmp_path)
    direct_digest, direct_sent = tandem_run.outputs_digest("bench"), _as_sent(servicer.requests)
    servicer.requests.clear()
    with GatewayProcess(address, tmp_path / "gateway.log", http=True) as gateway:
        via = _measure(address, gateway.address, tmp_path, http_url=gateway.http_url)
    assert tandem_run.outputs_digest("bench") == direct_digest
    assert _as_sent(servicer.requests) == direct_sent  # token ids, greedy, EOS ignored
    assert [sum(n for _, n in chunks) for chunks in via.arrivals] == [NEW_TOKENS] * len(PROMPTS)


def test_the_request_is_greedy_token_ids_with_eos_ignored():
    request = tandem_run.generate_request([5, 6], 7, "bench-0")
    assert request.token_ids.ids == [5, 6] and request.request_id == "bench-0"
    assert request.sampling == pb.SamplingParams(max_tokens=7, temperature=0.0,
                                                 ignore_eos=True)


def test_the_gateway_routes_to_the_given_engine_and_spawns_none(tmp_path):
    gateway = GatewayProcess("unix:///tmp/engine.sock", tmp_path / "gateway.log")
    assert gateway.argv[1:3] == ["-m", "gateway"]
    config, _ = config_from_args(gateway.argv[3:])
    assert config.spawn is None and config.engine_addresses == ("unix:///tmp/engine.sock",)
    assert config.listen == gateway.address and gateway.address.startswith("127.0.0.1:")
