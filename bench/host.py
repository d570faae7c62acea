"""``python -m bench.host``: whether tokenizer_svc keeps up with the GPU.

Two measurements, for ``--rows`` greedy requests of 256 prompt tokens each, in async mode,
against an in-process stand-in for the worker that writes random tokens:

- **engine**: the engine loop alone (apply the last batch's tokens: detokenize, stop
  rules, deltas; schedule the next; write it into the slot), with a worker that answers at
  once. CPU milliseconds per step: the smallest GPU step the engine can keep busy.
- **served** (``--step-ms``): the whole tokenizer_svc process minus the worker: the engine
  thread and the gRPC server, streaming every request's tokens to a client in another
  process, with a worker whose batches take ``--step-ms`` each (slept, as a wait on the
  GPU's event is). Tokens per second against the ideal ``rows / step``, and the serving
  process's CPU time per step (all its threads; the client's is not counted).
- **multiplexed**: the same, with every request on one ``GenerateMany`` stream, as a
  gateway sends them (``--engine-streams multiplexed``, its default).

No GPU. Prints JSON on the last line of stdout.
"""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import os
import signal
import sys
import tempfile
import time
from contextlib import AsyncExitStack
from pathlib import Path

import numpy as np

from bench.device import tool_parser
from tandem import models
from tandem import slots as S
from tokenizer_svc.__main__ import build_engine, slot_layout
from tokenizer_svc.config import CacheConfig, EngineConfig, SchedulerConfig
from tokenizer_svc.metrics import EngineMetrics
from tokenizer_svc.request import Request, SamplingOptions
from tokenizer_svc.tokenization import ModelTokenizer

PROMPT_TOKENS = 256
NUM_BLOCKS = 1 << 16
TOKEN_RANGE = (100, 20_000)  # valid ids in every vocabulary the presets use


class InstantWorker:
    """Random samples in the slot's outputs as each batch is submitted; a batch is done
    ``step_s`` after the one before it was (a GPU running them back to back)."""

    num_blocks = NUM_BLOCKS

    def __init__(self, segment: S.SlotSegment, step_s: float = 0.0, seed: int = 0) -> None:
        self.segment = segment
        self.step_s = step_s
        self.rng = np.random.default_rng(seed)
        self.done_at: dict[int, float] = {}
        self.last_done = 0.0

    def submit(self, slot: int, seq: int) -> None:
        view = self.segment.slots[slot]
        rows = int(view.header[S.H_NUM_ROWS])
        view.sampled_ids[:rows] = self.rng.integers(*TOKEN_RANGE, rows)
        view.out_header[S.O_SEQ], view.out_header[S.O_NUM_ROWS] = seq, rows
        self.last_done = max(self.last_done, time.perf_counter()) + self.step_s
        self.done_at[seq] = self.last_done

    def wait(self, seq: int, slot: int) -> None:
        delay = self.done_at.pop(seq, 0.0) - time.perf_counter()
        if delay > 0:
            time.sleep(delay)

    def wait_inputs_copied(self, slot: int) -> None:
        pass


def step_ms(tok: ModelTokenizer, rows: int, steps: int) -> float:
    """Milliseconds of engine work per decode step with ``rows`` requests decoding."""
    cfg = engine_config(rows)
    segment = S.SlotSegment(slot_layout(cfg, tok.max_context), create=True)
    try:
        engine = build_engine(cfg, tok, InstantWorker(segment), segment, EngineMetrics())
        rng = np.random.default_rng(1)
        options = SamplingOptions(max_tokens=steps + 16, temperature=0.0, ignore_eos=True)
        for i in range(rows):
            prompt = rng.integers(*TOKEN_RANGE, PROMPT_TOKENS).tolist()
            engine.add_request(Request(f"r{i}", prompt, options, time.monotonic()),
                               lambda out: None)
        engine._drain_inbox(block=False)
        for _ in range(4):  # prefill, then decoding with a placeholder in every row
            engine._step()
        first, started = engine.num_batches, time.perf_counter()
        for _ in range(steps):
            engine._step()
        return (time.perf_counter() - started) * 1e3 / (engine.num_batches - first)
    finally:
        segment.close()


def serve(folder: str, rows: int, step_s: float, listen: str, ready) -> None:
    """Child process: tokenizer_svc's server and engine over an :class:`InstantWorker`."""
    from tokenizer_svc.__main__ import GIL_SWITCH_INTERVAL_S
    from tokenizer_svc.server import EngineServicer, set_health, start_server

    async def run() -> None:
        tok = ModelTokenizer(folder, None)
        cfg = engine_config(rows, listen)
        metrics = EngineMetrics()
        servicer = EngineServicer(cfg, tok, "instant", metrics)
        _server, health = await start_server(cfg, servicer)
        segment = S.SlotSegment(slot_layout(cfg, tok.max_context), create=True)
        servicer.engine = build_engine(cfg, tok, InstantWorker(segment, step_s), segment,
                                       metrics)
        sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)  # as tokenizer_svc sets it
        servicer.engine.start()
        await set_health(health, True)
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        ready.set()
        await stop.wait()  # the parent is done
        servicer.engine.stop()
        segment.close()

    asyncio.run(run())


def _cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process ``pid``, all its threads (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def served(folder: str, rows: int, step_ms: float, new_tokens: int,
           multiplexed: bool = False) -> tuple[float, float]:
    """Tokens per second that a client in this process receives over gRPC, and the
    serving process's CPU milliseconds per step meanwhile (engine and gRPC threads: the
    smallest step it could keep up with if it had the cores to itself). ``multiplexed``:
    all requests on one GenerateMany stream (a gateway's ``--engine-streams
    multiplexed``), else a Generate stream each."""
    import grpc

    from bench.tandem_run import engine_mux_send, engine_send, generate_all

    context = multiprocessing.get_context("spawn")
    with tempfile.TemporaryDirectory() as tmp:
        listen, ready = f"unix://{tmp}/engine.sock", context.Event()
        child = context.Process(target=serve, args=(folder, rows, step_ms / 1e3, listen, ready),
                                daemon=True)
        child.start()
        try:
            if not ready.wait(120):
                raise RuntimeError("the served engine did not start")
            rng = np.random.default_rng(2)
            prompts = [rng.integers(*TOKEN_RANGE, PROMPT_TOKENS).tolist() for _ in range(rows)]

            async def client() -> float:
                async with AsyncExitStack() as stack:
                    channel = await stack.enter_async_context(
                        grpc.aio.insecure_channel(listen))
                    send = (engine_mux_send(channel, stack) if multiplexed
                            else engine_send(channel))
                    await generate_all(send, prompts[:1], 2, "warmup")
                    started, cpu = time.perf_counter(), _cpu_seconds(child.pid)
                    arrivals = await generate_all(send, prompts, new_tokens, "host")
                    cpu = _cpu_seconds(child.pid) - cpu
                    tokens = sum(n for chunks in arrivals for _, n in chunks)
                    return tokens / (time.perf_counter() - started), cpu * 1e3 / new_tokens

            return asyncio.run(client())
        finally:
            child.terminate()
            child.join(10)


def engine_config(rows: int, listen: str = "unused") -> EngineConfig:
    return EngineConfig(listen=listen, cache=CacheConfig(num_blocks=NUM_BLOCKS),
                        scheduler=SchedulerConfig(max_num_seqs=rows,
                                                  max_num_batched_tokens=rows * PROMPT_TOKENS))


def main(argv: list[str] | None = None) -> int:
    p = tool_parser("bench.host", __doc__)
    p.add_argument("--model", default="random:llama3-8b", help="whose tokenizer to use")
    p.add_argument("--rows", default="1,32,128", help="comma-separated request counts")
    p.add_argument("--steps", type=int, default=200, help="timed steps per row count")
    p.add_argument("--step-ms", type=float, default=None,
                   help="also serve over gRPC with batches of this many ms each")
    args = p.parse_args(argv)
    source = models.resolve_model(args.model, models.default_cache_dir())
    tok = ModelTokenizer(source.folder, None)
    result = {"model": args.model, "steps": args.steps, "step_ms": args.step_ms, "points": []}
    for rows in (int(x) for x in args.rows.split(",") if x):
        point = {"rows": rows, "ms_per_step": step_ms(tok, rows, args.steps)}
        line = f"{rows:5d} requests: engine {point['ms_per_step']:.3f} ms CPU per step"
        if args.step_ms is not None:
            ideal = rows / args.step_ms * 1e3
            point["ideal_tokens_per_s"] = ideal
            for key, multiplexed in (("served", False), ("multiplexed", True)):
                got, cpu_ms = served(str(source.folder), rows, args.step_ms, args.steps,
                                     multiplexed)
                point |= {f"{key}_tokens_per_s": got, f"{key}_cpu_ms_per_step": cpu_ms}
                line += (f"; {key} {got:,.0f} tokens/s of {ideal:,.0f} ({got / ideal:.0%}), "
                         f"{cpu_ms:.2f} ms of the server's CPU per step")
        print(line, file=sys.stderr)
        result["points"].append(point)
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
