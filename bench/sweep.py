"""``python -m bench.sweep``: the worker's decode step and prefill against the hardware.

Runs the worker's own model code and attention backend (what ``gpu_worker`` serves with)
directly, without slots or processes, so that each number is the device's time alone:

- **decode**: one decode step (forward, and greedy sampling of the logits) at each batch
  size and context length, replayed as a CUDA graph and timed with CUDA events, against the
  memory-bandwidth floor (weights read once, plus each sequence's KV cache read once, over
  the device-to-device copy bandwidth measured here). Points whose KV cache does not fit in
  the device's memory are reported as such. Each point also records the card's state
  right after it (SM and memory clocks, temperature, power, why the clocks are below
  their maximum: NVML), so that runs on one card can be told apart.
- **prefill**: ``prefill_rows`` prompts of ``prefill_tokens`` tokens in one forward, against
  the bf16 matrix-product rate measured here (an 8192³ product).

Prints JSON on the last line of stdout (``python -m bench`` runs it in a subprocess and
adds it to its report). Without a GPU it runs a tiny version whose numbers mean nothing.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from dataclasses import asdict, dataclass

import torch

from bench import analysis
from bench.device import device_state, measure_bandwidth, pci_bus_id, tool_parser
from gpu_worker.attention import AttentionMetadata, KVCache, make_attention
from gpu_worker.config import KERNELS
from gpu_worker.model import LlamaModel, load_config
from gpu_worker.ops import make_ops
from tandem import models

log = logging.getLogger("bench.sweep")
GPU_BATCHES = (1, 8, 32, 64, 128, 256)
GPU_CONTEXTS = (1024, 4096, 8192)
CPU_BATCHES, CPU_CONTEXTS = (1, 4), (64, 128)
BLOCK_SIZE = 16
TIMED_STEPS = 20
MEMORY_MARGIN = 6 << 30  # activations, logits, graphs


@dataclass(frozen=True)
class SweepConfig:
    model: str
    batches: tuple[int, ...]
    contexts: tuple[int, ...]
    prefill_rows: int
    prefill_tokens: int
    device: torch.device
    dtype: torch.dtype
    kernels: str  # auto (Triton on CUDA), triton or torch: as the worker's --kernels
    profile: tuple[tuple[int, int], ...] = ()  # (batch, context) points to profile (CUDA)
    fuse_silu: bool | None = None  # Triton ops: gate/up + SiLU in one launch (None: default)
    fold_norms: bool | None = None  # Triton ops: norms folded into the products (None: default)
    attention_stages: int | None = None  # Triton decode attention's pipeline (None: default)
    whole_k: bool | None = None  # split-K kernel: deep K steps, no split (None: default)


def build_model(cfg: SweepConfig) -> tuple[LlamaModel, analysis.ModelShape]:
    source = models.resolve_model(cfg.model, models.default_cache_dir())
    config = load_config(source.folder)
    weights = models.random_state_dict(config, cfg.dtype, cfg.device, seed=0)
    shape = analysis.ModelShape.from_hf_config(config.to_dict())
    ops = make_ops(cfg.device, cfg.kernels)
    if cfg.fuse_silu is not None and hasattr(ops, "fuse_silu"):
        ops.fuse_silu = cfg.fuse_silu
    if cfg.fold_norms is not None and hasattr(ops, "fold_norms"):
        ops.fold_norms = cfg.fold_norms
    if cfg.whole_k is not None and hasattr(ops, "whole_k"):
        ops.whole_k = cfg.whole_k
    return LlamaModel(config, weights, cfg.dtype, cfg.device, ops=ops), shape


def kv_tokens_that_fit(cfg: SweepConfig, shape: analysis.ModelShape) -> int:
    """How many tokens of KV cache the sweep allocates: its largest point, or what fits."""
    want = max(b * c for b in cfg.batches for c in cfg.contexts)
    want = max(want, cfg.prefill_rows * cfg.prefill_tokens)
    if cfg.device.type != "cuda":
        return want
    free, _ = torch.cuda.mem_get_info(cfg.device)
    per_token = shape.kv_bytes_per_token(cfg.dtype.itemsize)
    return min(want, max(0, free - MEMORY_MARGIN) // per_token)


def decode_metadata(batch: int, context: int, device) -> AttentionMetadata:
    """Row r decodes its token ``context`` - 1 over its own blocks (rows share no block)."""
    num_blocks = -(-context // BLOCK_SIZE)
    tables = torch.arange(batch * num_blocks, device=device).view(batch, num_blocks)
    positions = torch.full((batch,), context - 1, device=device)
    last_block = tables[:, (context - 1) // BLOCK_SIZE]
    rows = torch.arange(batch, device=device)
    return AttentionMetadata(
        positions=positions, slot_mapping=last_block * BLOCK_SIZE + (context - 1) % BLOCK_SIZE,
        query_start=torch.arange(batch + 1, device=device),
        context_lens=torch.full((batch,), context, device=device), block_tables=tables,
        token_rows=rows, max_query_len=1, max_context_len=context)


def prefill_metadata(rows: int, tokens: int, device) -> AttentionMetadata:
    num_blocks = -(-tokens // BLOCK_SIZE)
    tables = torch.arange(rows * num_blocks, device=device).view(rows, num_blocks)
    positions = torch.arange(tokens, device=device).repeat(rows)
    token_rows = torch.arange(rows, device=device).repeat_interleave(tokens)
    slots = tables[token_rows, positions // BLOCK_SIZE] * BLOCK_SIZE + positions % BLOCK_SIZE
    return AttentionMetadata(
        positions=positions, slot_mapping=slots,
        query_start=torch.arange(rows + 1, device=device) * tokens,
        context_lens=torch.full((rows,), tokens, device=device), block_tables=tables,
        token_rows=token_rows, max_query_len=tokens, max_context_len=tokens)


class Timer:
    """Median milliseconds of a callable on the current stream (CUDA events), or wall time."""

    def __init__(self, device: torch.device) -> None:
        self.is_cuda = device.type == "cuda"

    def median_ms(self, fn, repeats: int) -> float:
        times = []
        for _ in range(repeats):
            if self.is_cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(
                    enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end))
            else:
                began = time.perf_counter()
                fn()
                times.append((time.perf_counter() - began) * 1e3)
        return sorted(times)[len(times) // 2]


def decode_step_fn(model, attention, batch: int, context: int, device):
    """The step to time: forward over one token per row, then greedy sampling."""
    meta = decode_metadata(batch, context, device)
    ids = torch.randint(0, model.shape.vocab, (batch,), device=device)
    sampled = torch.empty(batch, dtype=torch.int32, device=device)

    def step():
        return model.ops.argmax_into(model.forward(ids, meta, attention, None), sampled)

    if device.type != "cuda":
        return step
    step()  # warm-up: compiles kernels outside the graph
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return graph.replay


def profile_decode(cfg, model, attention, batch: int, context: int) -> list[dict]:
    """Where one decode step's time goes: device time per kernel name over 10 replays."""
    from torch.profiler import ProfilerActivity, profile

    step = decode_step_fn(model, attention, batch, context, cfg.device)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(10):
            step()
        torch.cuda.synchronize()
    totals: dict[str, list[float]] = {}
    for event in prof.events():
        if event.device_type.name == "CUDA":
            entry = totals.setdefault(event.name, [0.0, 0])
            entry[0] += event.device_time / 10 / 1e3  # ms per step
            entry[1] += 1 / 10
    rows = [{"kernel": name[:90], "ms_per_step": ms, "launches_per_step": n}
            for name, (ms, n) in totals.items()]
    rows.sort(key=lambda r: -r["ms_per_step"])
    for r in rows[:25]:
        log.info("profile b%d c%d: %7.3f ms %5.0fx %s", batch, context, r["ms_per_step"],
                 r["launches_per_step"], r["kernel"])
    return rows


def sweep_decode(cfg, model, shape, attention, kv_tokens, bandwidth, timer) -> list[dict]:
    points = []
    is_cuda = cfg.device.type == "cuda"
    bus = pci_bus_id(torch.cuda.get_device_properties(cfg.device)) if is_cuda else None
    for batch in cfg.batches:
        for context in cfg.contexts:
            floor = analysis.decode_floor(shape, cfg.dtype.itemsize, batch, context, bandwidth)
            point = {"batch": batch, "context": context, "floor_ms": floor.seconds * 1e3}
            if batch * (-(-context // BLOCK_SIZE)) * BLOCK_SIZE > kv_tokens:
                points.append(point | {"status": "does not fit"})
                continue
            step = decode_step_fn(model, attention, batch, context, cfg.device)
            step_ms = timer.median_ms(step, TIMED_STEPS)
            state = device_state(bus) if is_cuda else None  # as the card ran them
            del step
            points.append(point | {
                "status": "ok", "step_ms": step_ms, "tokens_per_s": batch / step_ms * 1e3,
                "floor_over_step": floor.seconds * 1e3 / step_ms, "device_state": state})
            log.info("decode batch %d context %d: %.2f ms (floor %.2f ms, %.0f%%)%s", batch,
                     context, step_ms, floor.seconds * 1e3, 100 * points[-1]["floor_over_step"],
                     describe_state(state))
    return points


def describe_state(state: dict | None) -> str:
    """`` (SM 1980 MHz, memory 3201 MHz, 52 C, 610 W; power cap)`` or nothing."""
    if not state:
        return ""
    units = (("sm_mhz", "SM %d MHz"), ("mem_mhz", "memory %d MHz"), ("temp_c", "%d C"),
             ("power_w", "%.0f W"))
    parts = ", ".join(form % state[key] for key, form in units if key in state)
    reasons = "; " + ", ".join(state["clock_reasons"]) if state.get("clock_reasons") else ""
    return f" ({parts}{reasons})"


def prefill_flops(shape: analysis.ModelShape, rows: int, tokens: int) -> float:
    """Matrix-product FLOPs of a causal prefill (LM head on each row's last token only)."""
    h, q, kv = shape.hidden_size, shape.num_heads * shape.head_dim, \
        shape.num_kv_heads * shape.head_dim
    per_token = shape.num_layers * (h * (q + 2 * kv) + q * h + 3 * h * shape.intermediate_size)
    causal_pairs = rows * tokens * (tokens + 1) / 2  # query-key pairs
    attention = shape.num_layers * shape.num_heads * shape.head_dim * causal_pairs * 2
    return 2 * per_token * rows * tokens + attention + 2 * rows * h * shape.vocab_size


def measure_prefill(cfg, model, shape, attention, matmul_flops, timer) -> dict:
    rows, tokens = cfg.prefill_rows, cfg.prefill_tokens
    meta = prefill_metadata(rows, tokens, cfg.device)
    ids = torch.randint(0, shape.vocab_size, (rows * tokens,), device=cfg.device)
    last = torch.arange(1, rows + 1, device=cfg.device) * tokens - 1
    model.forward(ids, meta, attention, last)  # warm-up
    ms = timer.median_ms(lambda: model.forward(ids, meta, attention, last), 5)
    flops = prefill_flops(shape, rows, tokens)
    rate = flops / (ms / 1e3)
    return {"rows": rows, "tokens": tokens, "ms": ms, "tokens_per_s": rows * tokens / ms * 1e3,
            "flops_per_s": rate, "matmul_flops_per_s": matmul_flops,
            "over_matmul": rate / matmul_flops if matmul_flops else None}


def measure_matmul(device: torch.device, dtype: torch.dtype, timer: Timer) -> float:
    n = 8192 if device.type == "cuda" else 512
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    for _ in range(3):
        a @ b
    ms = timer.median_ms(lambda: a @ b, 10)
    return 2 * n**3 / (ms / 1e3)


def run(cfg: SweepConfig) -> dict:
    timer = Timer(cfg.device)
    is_cuda = cfg.device.type == "cuda"
    bandwidth = measure_bandwidth(str(cfg.device), nbytes=(2 << 30) if is_cuda else 64 << 20,
                                  iters=50 if is_cuda else 4)
    matmul = measure_matmul(cfg.device, cfg.dtype, timer)
    model, shape = build_model(cfg)
    kv_tokens = kv_tokens_that_fit(cfg, shape)
    num_blocks = -(-kv_tokens // BLOCK_SIZE)
    cache = KVCache(shape.num_layers, num_blocks, BLOCK_SIZE, shape.num_kv_heads,
                    shape.head_dim, cfg.dtype, cfg.device)
    cache.data.normal_()
    attention = make_attention(cache, shape.head_dim**-0.5, cfg.device, cfg.kernels)
    if cfg.attention_stages and hasattr(attention, "num_stages"):
        # each launch reads them; a depth given holds for every batch (no few-pair tiles)
        attention.num_stages, attention.few_pairs = cfg.attention_stages, None
    log.info("KV cache %d tokens (%.1f GiB); attention %s", num_blocks * BLOCK_SIZE,
             cache.data.numel() * cfg.dtype.itemsize / 2**30, type(attention).__name__)
    profiles = {}
    for b, c in cfg.profile if is_cuda else ():
        try:
            profiles[f"{b}x{c}"] = profile_decode(cfg, model, attention, b, c)
        except Exception as exc:  # noqa: BLE001 - a profile is a diagnosis, not a result
            log.warning("profiling %dx%d failed: %s", b, c, exc)
    decode = sweep_decode(cfg, model, shape, attention, num_blocks * BLOCK_SIZE, bandwidth,
                          timer)
    prefill = measure_prefill(cfg, model, shape, attention, matmul, timer)
    return {"model": cfg.model, "dtype": str(cfg.dtype).removeprefix("torch."),
            "meaningful": is_cuda, "bandwidth_bytes_per_s": bandwidth,
            "matmul_flops_per_s": matmul,
            "attention": f"{type(attention).__name__}, {model.ops.name} ops",
            "kv_cache_tokens": num_blocks * BLOCK_SIZE, "decode": decode, "prefill": prefill,
            "profiles": profiles,
            "config": asdict(cfg) | {"device": str(cfg.device), "dtype": str(cfg.dtype)}}


def make_config(args: argparse.Namespace) -> SweepConfig:
    is_cuda = torch.cuda.is_available() and args.device != "cpu"
    device = torch.device("cuda" if is_cuda else "cpu")

    def pick(given, gpu, cpu):
        return given or (gpu if is_cuda else cpu)

    return SweepConfig(
        model=pick(args.model, "random:llama3-8b", "random:tiny-llama"),
        batches=tuple(pick(args.batches, GPU_BATCHES, CPU_BATCHES)),
        contexts=tuple(pick(args.contexts, GPU_CONTEXTS, CPU_CONTEXTS)),
        prefill_rows=pick(args.prefill_rows, 8, 2),
        prefill_tokens=pick(args.prefill_tokens, 1024, 64),
        device=device, dtype=torch.bfloat16 if is_cuda else torch.float32, kernels=args.kernels,
        profile=tuple(tuple(ints(point.replace("x", ","))) for point in args.profile),
        fuse_silu=on_off(args.fuse_silu), fold_norms=on_off(args.fold_norms),
        attention_stages=args.attention_stages, whole_k=on_off(args.whole_k))


def on_off(text: str | None) -> bool | None:
    """A flag's ``on``/``off`` (None: not given, the default holds)."""
    return {"on": True, "off": False}.get(text)


def ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def main(argv: list[str] | None = None) -> int:
    p = tool_parser("bench.sweep", __doc__)
    p.add_argument("--model", help="random:llama3-8b on a GPU, random:tiny-llama on the CPU")
    p.add_argument("--batches", type=ints, help="comma-separated (1,8,32,64,128,256)")
    p.add_argument("--contexts", type=ints, help="comma-separated (1024,4096,8192)")
    p.add_argument("--prefill-rows", type=int, help="prompts in the prefill (8)")
    p.add_argument("--prefill-tokens", type=int, help="tokens per prompt (1024)")
    p.add_argument("--device", default="auto", help="auto, cuda or cpu")
    p.add_argument("--kernels", default="auto", choices=KERNELS,
                   help="as the worker's --kernels (auto: Triton on CUDA)")
    p.add_argument("--profile", action="append", default=[], metavar="BATCHxCONTEXT",
                   help="log the kernels of one decode step at this point (repeatable; CUDA)")
    p.add_argument("--fuse-silu", choices=("on", "off"),
                   help="Triton ops: gate/up product and SiLU-and-mul in one launch for "
                        "decode-sized batches (default: gpu_worker.ops.FUSE_SILU)")
    p.add_argument("--attention-stages", type=int, metavar="N",
                   help="Triton decode attention: K/V tiles in flight per program, at every "
                        "batch size (default: 4 where shared memory allows, 2 with the "
                        "longer tiles of small batches; see bench.attention --search)")
    p.add_argument("--whole-k", choices=("on", "off"),
                   help="Triton ops: plain decode products without split-K, in 256-deep K "
                        "steps (default: gpu_worker.kernels.linear.WHOLE_K)")
    p.add_argument("--fold-norms", choices=("on", "off"),
                   help="Triton ops: each residual add + RMSNorm folded into the products "
                        "around it for decode-sized batches (default: "
                        "gpu_worker.ops.FOLD_NORMS)")
    torch.backends.cuda.matmul.allow_tf32 = False
    with torch.inference_mode():
        result = run(make_config(p.parse_args(argv)))
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
