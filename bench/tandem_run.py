"""One Tandem mode: start an engine, warm it up, trace the measured window, stop it.

The engine is driven over its internal API (``tandem.internal.v1.Engine``), without a
gateway, so that the numbers are the engine's own.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Self

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bench import analysis
from bench.device import NvmlSampler, result_dict
from tandem.internal.v1 import engine_pb2, engine_pb2_grpc
from tandem.v1 import generation_pb2 as pb

log = logging.getLogger("bench.tandem")
REPO = Path(__file__).resolve().parents[1]
ENGINE_SERVICE = "tandem.internal.v1.Engine"
WARMUP_NEW_TOKENS = 8
RPC_TIMEOUT_S = 6 * 3600.0


@dataclass(frozen=True)
class EngineSpec:
    """How to start one engine for the benchmark."""

    model: str
    is_sync: bool
    is_gpu: bool
    max_num_seqs: int
    max_num_batched_tokens: int
    max_model_len: int
    extra_args: tuple[str, ...] = ()
    start_timeout_s: float = 900.0

    def argv(self, listen: str) -> list[str]:
        args = [sys.executable, "-m", "tokenizer_svc", "--listen", listen, "--model", self.model,
                "--max-num-seqs", str(self.max_num_seqs),
                "--max-num-batched-tokens", str(self.max_num_batched_tokens),
                "--max-model-len", str(self.max_model_len)]
        if not self.is_gpu:
            args += ["--device", "cpu", "--dtype", "float32"]
        if self.is_sync:
            args.append("--sync")
        # The 32 requests land in one first batch in both modes, so both modes run the same
        # batches and greedy outputs can be compared token for token.
        args += ["--batch-wait-ms", "50"]
        return args + list(self.extra_args)


class EngineProcess:
    """An engine subprocess on a Unix socket; SERVING on enter, stopped on exit."""

    def __init__(self, spec: EngineSpec, log_path: Path) -> None:
        self.spec, self.log_path = spec, log_path
        self.tmp = tempfile.TemporaryDirectory(prefix="tandem-bench-")
        self.address = f"unix://{self.tmp.name}/engine.sock"
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> Self:
        path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
        env = dict(os.environ, PYTHONPATH=path, PYTHONUNBUFFERED="1")
        with open(self.log_path, "w") as log_file:
            self.proc = subprocess.Popen(self.spec.argv(self.address), cwd=REPO, env=env,
                                         stdout=log_file, stderr=subprocess.STDOUT)
        try:
            self._wait_serving()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def _wait_serving(self) -> None:
        deadline = time.monotonic() + self.spec.start_timeout_s
        with grpc.insecure_channel(self.address) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"the engine exited early; see {self.log_path}")
                try:
                    reply = health.Check(health_pb2.HealthCheckRequest(service=ENGINE_SERVICE),
                                         timeout=2)
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                except grpc.RpcError:
                    pass
                time.sleep(0.5)
        raise TimeoutError(f"engine not SERVING after {self.spec.start_timeout_s} s; "
                           f"see {self.log_path}")

    def stop(self) -> None:
        """SIGTERM, then wait (the GPU must be free before the next mode starts)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.tmp.cleanup()


# --- the client -----------------------------------------------------------------------

Arrivals = list[tuple[float, int]]  # (perf_counter time, tokens in the chunk)
OUTPUTS: dict[str, list[int]] = {}  # request id -> generated ids, of the latest mode run


def outputs_digest(tag: str) -> str:
    """sha256 over the generated ids of the requests tagged ``tag``, in request order."""
    ids = [OUTPUTS[k] for k in sorted(OUTPUTS, key=lambda k: int(k.rsplit("-", 1)[1]))
           if k.startswith(f"{tag}-")]
    return hashlib.sha256(json.dumps(ids).encode()).hexdigest()


async def _stream(stub, req_id: str, prompt: list[int], max_tokens: int) -> Arrivals:
    request = engine_pb2.EngineRequest(request_id=req_id, request=pb.GenerateRequest(
        token_ids=pb.TokenIds(ids=prompt),
        sampling=pb.SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)))
    chunks: Arrivals = []
    token_ids: list[int] = []
    async for reply in stub.Generate(request, timeout=RPC_TIMEOUT_S):
        if reply.token_ids:
            chunks.append((time.perf_counter(), len(reply.token_ids)))
            token_ids += reply.token_ids
    OUTPUTS.setdefault(req_id, token_ids)
    return chunks


async def generate_all(stub, prompts: list[list[int]], max_tokens: int,
                       tag: str) -> list[Arrivals]:
    """Send every prompt at once; each request's chunk arrival times."""
    return list(await asyncio.gather(*(
        _stream(stub, f"{tag}-{i}", prompt, max_tokens) for i, prompt in enumerate(prompts))))


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


async def measure(address: str, prompts: list[list[int]], warm: list[list[int]],
                  new_tokens: int, trace_path: Path, sampler: NvmlSampler) -> Measured:
    """Warm up, then trace and time all prompts sent at once."""
    async with grpc.aio.insecure_channel(address) as channel:
        stub = engine_pb2_grpc.EngineStub(channel)
        await generate_all(stub, warm, WARMUP_NEW_TOKENS, "warmup")
        notes = [note] if (note := await _start_trace(stub)) else []
        before = await stub.GetStats(engine_pb2.GetStatsRequest(), timeout=30)
        with sampler:
            started = time.perf_counter()
            arrivals = await generate_all(stub, prompts, new_tokens, "bench")
            wall_s = time.perf_counter() - started
        trace = None
        if not notes:
            trace, note = await _stop_trace(stub, trace_path)
            notes += [note] if note else []
        after = await stub.GetStats(engine_pb2.GetStatsRequest(), timeout=30)
    return Measured(wall_s, arrivals, trace, notes, _stats_diff(before, after))


def run_mode(mode: str, spec: EngineSpec, prompts: list[list[int]], warm: list[list[int]],
             new_tokens: int, sampler: NvmlSampler, slice_us: float, run_dir: Path,
             keep_trace: bool) -> dict:
    """One Tandem mode, start to stop: its table row (without the floor)."""
    trace_path = (run_dir / f"trace-{mode}.json").resolve()
    OUTPUTS.clear()
    with EngineProcess(spec, run_dir / f"{mode}.log") as engine:
        log.info("%s: engine SERVING, measuring", mode)
        got = asyncio.run(measure(engine.address, prompts, warm, new_tokens, trace_path,
                                  sampler))
    timeline = analysis.analyse_timeline(got.trace, slice_us) if got.trace else None
    if timeline is not None and timeline["busy"] is None:
        got.notes.append(f"trace on {timeline['device'] or 'the device'} holds no kernels")
    if trace_path.exists() and not keep_trace:
        trace_path.unlink()
    return analysis.mode_row(mode, got.wall_s, got.arrivals, timeline, result_dict(sampler),
                             got.notes, expected_tokens=len(prompts) * new_tokens,
                             extra={"engine_stats": got.engine_stats,
                                    "outputs_sha256": outputs_digest("bench")})
