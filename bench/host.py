"""``python -m bench.host``: tokenizer_svc's CPU time per decode step.

The engine loop (apply the last batch's tokens: detokenize, stop rules, stream deltas;
schedule the next; write it into the slot) runs against an in-process stand-in for the
worker that answers at once with random tokens, for ``--rows`` greedy requests of 256
prompt tokens each, in async mode. No GPU, no gRPC. The result is the smallest GPU step
the engine can keep busy with that many requests, before the gRPC streaming of the deltas
(which runs on another thread) is counted. Prints JSON on the last line of stdout.
"""

from __future__ import annotations

import json
import sys
import time

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


class InstantWorker:
    """Finishes every batch as it is submitted: random samples in the slot's outputs."""

    num_blocks = NUM_BLOCKS

    def __init__(self, segment: S.SlotSegment, seed: int = 0) -> None:
        self.segment = segment
        self.rng = np.random.default_rng(seed)

    def submit(self, slot: int, seq: int) -> None:
        view = self.segment.slots[slot]
        rows = int(view.header[S.H_NUM_ROWS])
        view.sampled_ids[:rows] = self.rng.integers(1000, 100_000, rows)
        view.out_header[S.O_SEQ], view.out_header[S.O_NUM_ROWS] = seq, rows

    def wait(self, seq: int, slot: int) -> None:
        return None

    def wait_inputs_copied(self, slot: int) -> None:
        pass


def step_ms(tok: ModelTokenizer, rows: int, steps: int) -> float:
    """Milliseconds of engine work per decode step with ``rows`` requests decoding."""
    cfg = EngineConfig(listen="unused", cache=CacheConfig(num_blocks=NUM_BLOCKS),
                       scheduler=SchedulerConfig(max_num_seqs=rows,
                                                 max_num_batched_tokens=rows * PROMPT_TOKENS))
    segment = S.SlotSegment(slot_layout(cfg, tok.max_context), create=True)
    try:
        engine = build_engine(cfg, tok, InstantWorker(segment), segment, EngineMetrics())
        rng = np.random.default_rng(1)
        options = SamplingOptions(max_tokens=steps + 16, temperature=0.0, ignore_eos=True)
        for i in range(rows):
            prompt = rng.integers(1000, 100_000, PROMPT_TOKENS).tolist()
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


def main(argv: list[str] | None = None) -> int:
    p = tool_parser("bench.host", __doc__)
    p.add_argument("--model", default="random:llama3-8b", help="whose tokenizer to use")
    p.add_argument("--rows", default="1,32,128", help="comma-separated request counts")
    p.add_argument("--steps", type=int, default=200, help="timed steps per row count")
    args = p.parse_args(argv)
    source = models.resolve_model(args.model, models.default_cache_dir())
    tok = ModelTokenizer(source.folder, None)
    result = {"model": args.model, "steps": args.steps, "points": []}
    for rows in (int(x) for x in args.rows.split(",") if x):
        ms = step_ms(tok, rows, args.steps)
        print(f"{rows:5d} requests: {ms:.3f} ms of engine CPU per step", file=sys.stderr)
        result["points"].append({"rows": rows, "ms_per_step": ms})
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
