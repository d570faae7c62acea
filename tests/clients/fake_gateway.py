"""An in-process FAKE gateway: `tandem.v1.Generation` and health on a free loopback port,
answering with canned streams and errors and recording what clients send."""

from __future__ import annotations

import threading
import time
from concurrent import futures

import grpc
from grpc_health.v1 import health as grpc_health
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tandem.v1 import generation_pb2 as pb
from tandem.v1 import generation_pb2_grpc

MODEL_INFO = pb.ModelInfo(
    model="fake-model", vocab_size=1000, max_context_tokens=2048, default_max_tokens=256,
    eos_token_ids=[2], max_top_logprobs=5, device="cpu", dtype="float32", mode="async",
    kv_block_size=16, kv_num_blocks=128,
)
TIMING = pb.Timing(queue_seconds=0.25, first_token_seconds=0.5, total_seconds=1.5)


def canned_chunks() -> list[pb.GenerateStreamResponse]:
    """Three deltas, "Hel" + "lo" + " world"; the last carries finish_reason, usage and timing."""
    return [
        pb.GenerateStreamResponse(text="Hel", token_ids=[11],
                                  logprobs=[pb.TokenLogprob(token_id=11, logprob=-0.5,
                                                            token="Hel")]),
        pb.GenerateStreamResponse(text="lo", token_ids=[12, 13]),
        pb.GenerateStreamResponse(text=" world", token_ids=[14],
                                  finish_reason=pb.FINISH_REASON_LENGTH,
                                  usage=pb.Usage(prompt_tokens=5, completion_tokens=4,
                                                 cached_prompt_tokens=2),
                                  timing=TIMING),
    ]


class FakeGeneration(generation_pb2_grpc.GenerationServicer):
    """Streams `chunks` (Generate returns them merged), or aborts with `error` = (code,
    message): at once, or in a stream after `error_after` chunks. With `hang`, a stream stays
    open after its chunks until the client cancels it, then sets `cancelled`. Records each
    request and its metadata."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.chunks = canned_chunks()
        self.error: tuple[grpc.StatusCode, str] | None = None
        self.error_after: int | None = None
        self.hang = False
        self.cancelled = threading.Event()
        self.requests: list = []
        self.metadata: list[dict[str, str]] = []

    def _record(self, request, context) -> None:
        self.requests.append(request)
        self.metadata.append(dict(context.invocation_metadata()))
        if self.error and self.error_after is None:
            context.abort(*self.error)

    def Generate(self, request, context):
        self._record(request, context)
        whole = pb.GenerateResponse(request_id=request.request_id or "fake-1")
        for chunk in self.chunks:
            whole.text += chunk.text
            whole.token_ids.extend(chunk.token_ids)
            whole.logprobs.extend(chunk.logprobs)
            if chunk.finish_reason:
                whole.finish_reason = chunk.finish_reason
                whole.usage.CopyFrom(chunk.usage)
                whole.timing.CopyFrom(chunk.timing)
        return whole

    def GenerateStream(self, request, context):
        self._record(request, context)
        if self.hang:  # such a stream ends only when the client cancels it; the server may
            context.add_callback(self.cancelled.set)  # then drop this generator unresumed
        for i, chunk in enumerate(self.chunks):
            if self.error and i == self.error_after:
                context.abort(*self.error)
            out = pb.GenerateStreamResponse()
            out.CopyFrom(chunk)
            out.request_id = request.request_id or "fake-1"
            yield out
        while self.hang and context.is_active():
            time.sleep(0.01)

    def Tokenize(self, request, context):
        self._record(request, context)
        return pb.TokenizeResponse(token_ids=[1, 9906, 1917], tokens=["<s>", "Hello", "Ġworld"])

    def GetModelInfo(self, request, context):
        self._record(request, context)
        return MODEL_INFO


class FakeGateway:
    """The fake servicer and a health servicer ("" is SERVING) on 127.0.0.1:<free port>."""

    def __init__(self) -> None:
        self.generation = FakeGeneration()
        self.health = grpc_health.HealthServicer()
        self.health.set("", health_pb2.HealthCheckResponse.SERVING)
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        generation_pb2_grpc.add_GenerationServicer_to_server(self.generation, self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        self.address = f"127.0.0.1:{self.server.add_insecure_port('127.0.0.1:0')}"
        self.server.start()

    def stop(self) -> None:
        self.server.stop(grace=None)
