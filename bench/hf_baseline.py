"""``python -m bench.hf_baseline``: the workload through Transformers' continuous batching.

One mode per process (so the GPU memory is freed when it exits): ``generate_batch`` with
``ContinuousBatchingConfig(use_async_batching=False)`` (sync) or ``True`` (async, which
needs CUDA). The manager is built for the real workload, warmed up on other prompts and
kept, so the measured ``generate_batch`` call reuses it. On a GPU, torch.profiler records
the kernels of the measured call; its JSON row has the same fields as a Tandem mode's.

``--cb tuned`` (default) sizes Transformers for the workload instead of for the GPU:
``paged|sdpa`` needs a dense additive mask of ``max_batch_tokens x (cache pages +
max_batch_tokens)`` per IO buffer, which the memory-filling defaults make ~11 GiB on an
H200, and async batching copies that whole buffer host-to-device on every step. With the
cache sized to the requests (and a 2048-token prefill budget) the mask is ~0.2 GiB, which
also makes CUDA graphs (off by default when a mask is needed) affordable; a full-shape
warm-up captures them outside the measured call. ``--cb defaults`` keeps Transformers'
own defaults (the numbers of earlier runs).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from bench import analysis
from bench.device import NvmlSampler, pci_bus_id, result_dict
from bench.workload import ModelInfo, Workload, make_prompts, warmup_prompts
from tandem import models

log = logging.getLogger("bench.hf")
WARMUP_REQUESTS, WARMUP_NEW_TOKENS = 2, 8
CPU_CACHE_BYTES = 2 << 30  # Transformers cannot size its cache from CPU memory
CB_PRESETS = ("tuned", "defaults")
CB_BLOCK_SIZE = 256  # Transformers' default block size
CB_PREFILL_TOKENS = 2048  # tuned max_batch_tokens cap: the sdpa mask is M x (pages + M)
CB_Q_PADDING = 32  # CUDA graph padding of the query tokens (decode of 32 requests: none)
CB_KV_PADDING = 4096  # CUDA graph padding of the tokens read from the cache


@dataclass(frozen=True)
class HfRunConfig:
    model: str
    is_async: bool
    workload: Workload
    device: str  # "cuda" or "cpu"
    attn: str  # Transformers attention implementation, e.g. "sdpa"
    slice_us: float
    out: Path
    trace: bool = True  # record the kernel timeline (CUDA); its overhead slows Transformers
    cb: str = "tuned"  # "tuned": sized for the workload, CUDA graphs; "defaults": Transformers'
    compile_level: int = 0  # ContinuousBatchingConfig.default_compile_level (tuned only)

    @property
    def is_cuda(self) -> bool:
        return self.device.startswith("cuda")

    @property
    def full_warmup(self) -> bool:
        """Warm up on the workload's shape, so every CUDA graph is captured before timing."""
        return self.is_cuda and self.cb == "tuned"


def cb_config(cfg: HfRunConfig):
    """The ``ContinuousBatchingConfig`` of the run; the same for sync and async but the flag.

    ``tuned``: a cache of ``num_requests`` x (blocks of prompt + new tokens, + 1 spare)
    blocks instead of ~90% of free GPU memory, a prefill budget of at most
    ``CB_PREFILL_TOKENS`` (whole prompts still fit), and CUDA graphs with padding intervals
    (Transformers turns them off for sdpa by default). The decode fast path stays off: it
    needs flash attention's ``flash_attn_with_kvcache``.
    """
    from transformers import ContinuousBatchingConfig

    if cfg.cb == "defaults":
        return ContinuousBatchingConfig(use_async_batching=cfg.is_async)
    wl = cfg.workload
    blocks_per_request = -(-(wl.prompt_tokens + wl.new_tokens) // CB_BLOCK_SIZE) + 1
    return ContinuousBatchingConfig(
        use_async_batching=cfg.is_async, block_size=CB_BLOCK_SIZE,
        num_blocks=wl.num_requests * blocks_per_request,
        max_batch_tokens=wl.batch_tokens(CB_PREFILL_TOKENS),
        max_requests_per_batch=wl.num_requests, use_cuda_graph=True,
        q_padding_interval_size=CB_Q_PADDING, kv_padding_interval_size=CB_KV_PADDING,
        default_compile_level=cfg.compile_level)


def build_model(model: ModelInfo, dtype, device: str, attn: str):
    """The model on ``device``; random presets get :func:`tandem.models.random_state_dict`
    directly on the device (no slow CPU initialisation)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    paged = f"paged|{attn}"  # pins the implementation: no switch to flash attention
    if not model.random_weights:
        hf = AutoModelForCausalLM.from_pretrained(model.folder, dtype=dtype,
                                                  attn_implementation=paged)
        return hf.to(device).eval()
    config = AutoConfig.from_pretrained(model.folder)
    with torch.device(device), no_init_weights():
        hf = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=paged)
    state = models.random_state_dict(config, dtype, device)
    loaded = hf.load_state_dict(state, strict=False, assign=True)
    allowed = {"lm_head.weight"} if config.tie_word_embeddings else set()
    if set(loaded.missing_keys) - allowed or loaded.unexpected_keys:
        raise RuntimeError(f"random weights do not fit: missing {loaded.missing_keys}, "
                           f"unexpected {loaded.unexpected_keys}")
    if config.tie_word_embeddings:
        hf.tie_weights()
    return hf.eval()


def _allow_cpu_cache() -> None:
    """CPU smoke only: give the cache sizer a fixed budget instead of device memory."""
    from transformers.generation.continuous_batching import cache

    cache.PagedAttentionMemoryHandler.get_available_memory = lambda self: CPU_CACHE_BYTES


def warm_up(hf, cfg: HfRunConfig, gen, cb, prompts: list[list[int]],
            new_tokens: int = WARMUP_NEW_TOKENS) -> dict:
    """Build the manager for the real workload, run ``prompts``, keep it for later; the
    settings Transformers resolved (see :func:`_resolved`)."""
    from transformers.generation.continuous_batching.utils import WorkloadHints

    wl = cfg.workload
    hints = WorkloadHints(max_prompt_length=wl.prompt_tokens,
                          max_generated_length=wl.new_tokens, num_requests=wl.num_requests)
    manager = hf.init_continuous_batching(generation_config=gen,
                                          continuous_batching_config=cb, workload_hints=hints)
    manager.warmup()
    manager.start()
    ids = manager.add_requests(inputs=prompts, max_new_tokens=new_tokens)
    finished = 0
    while finished < len(ids):
        result = manager.get_result(timeout=1)
        if result is not None and result.is_finished():
            finished += 1
        elif result is None and not manager.is_running():
            raise RuntimeError("the continuous batching thread died during warm-up")
    manager.stop(block=True, keep_for_next_session=True)
    return _resolved(manager.continuous_batching_config)


def _resolved(cb) -> dict:
    """The resolved ``ContinuousBatchingConfig`` fields that decide the speed."""
    keys = ("block_size", "num_blocks", "max_batch_tokens", "max_requests_per_batch",
            "max_blocks_per_request", "use_async_batching", "use_cuda_graph",
            "q_padding_interval_size", "kv_padding_interval_size", "default_compile_level",
            "max_memory_percent")
    row = {key: getattr(cb, key, None) for key in keys}
    row["use_cuda_graph"] = list(row["use_cuda_graph"] or ())
    return row


def _spin(device: str) -> None:
    """A short, recognisable kernel that marks a window edge on the device clock."""
    import torch

    torch.cuda.synchronize(device)
    torch.cuda._sleep(20_000)
    torch.cuda.synchronize(device)


@contextmanager
def kernel_trace(enabled: bool, device: str):
    """Profile the block's CUDA kernels; ``box["kernels_us"]`` / ``box["marks_us"]`` after."""
    box: dict = {}
    if not enabled:
        yield box
        return
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        _spin(device)
        yield box
        _spin(device)
    box["kernels_us"], box["marks_us"] = _kernels(prof)


def _kernels(prof) -> tuple[list[tuple[float, float]], list[tuple[float, float]]]:
    """Kernel intervals (no memcpy/memset) and the spin markers', in µs."""
    from torch.autograd import DeviceType

    kernels, marks = [], []
    for event in prof.profiler.kineto_results.events():
        if event.device_type() != DeviceType.CUDA:
            continue
        name = event.name()
        interval = (event.start_ns() / 1e3, event.end_ns() / 1e3)
        if "spin_kernel" in name:
            marks.append(interval)
        elif not name.startswith(("Memcpy", "Memset")):
            kernels.append(interval)
    return kernels, marks


def _timeline(box: dict, wall_s: float, cfg: HfRunConfig, notes: list[str]) -> dict | None:
    if "kernels_us" not in box:
        return None
    marks = sorted(box["marks_us"])
    if len(marks) >= 2:
        start = marks[0][1]  # the window starts as the first marker ends
    else:
        notes.append("no spin markers in the profile: window = first kernel onwards")
        start = min((s for s, _ in box["kernels_us"]), default=0.0)
    trace = {"device": "cuda", "window_us": [start, start + wall_s * 1e6],
             "kernels_us": box["kernels_us"], "steps_us": []}
    return analysis.analyse_timeline(trace, cfg.slice_us)


def measure(hf, model: ModelInfo, cfg: HfRunConfig) -> dict:
    """Warm up, then time and trace one ``generate_batch`` call: the mode's JSON row."""
    import torch
    from transformers import GenerationConfig

    wl = cfg.workload
    prompts = make_prompts(wl, model)
    gen = GenerationConfig(max_new_tokens=wl.new_tokens, do_sample=False, eos_token_id=-1)
    cb = cb_config(cfg)
    # a full warm-up has the measured call's shapes: its CUDA graphs get captured
    num, new = ((wl.num_requests, wl.new_tokens) if cfg.full_warmup
                else (WARMUP_REQUESTS, WARMUP_NEW_TOKENS))
    resolved = warm_up(hf, cfg, gen, cb, warmup_prompts(wl, model, num), new)
    log.info("continuous batching (%s): %s", cfg.cb, resolved)
    pci = pci_bus_id(torch.cuda.get_device_properties(cfg.device)) if cfg.is_cuda else None
    sampler = NvmlSampler(cfg.is_cuda, pci)
    with kernel_trace(cfg.is_cuda and cfg.trace, cfg.device) as box, sampler:
        started = time.perf_counter()
        outputs = hf.generate_batch(prompts, generation_config=gen,
                                    continuous_batching_config=cb, max_new_tokens=wl.new_tokens,
                                    persistent_manager=True, record_timestamps=True)
        call_s = time.perf_counter() - started
    hf.destroy_cached_continuous_batching_manager()
    arrivals = [[(t, 1) for t in (out.timestamps or [])] for out in outputs.values()]
    last = max((chunks[-1][0] for chunks in arrivals if chunks), default=started + call_s)
    wall_s, notes = last - started, []
    if len(outputs) != wl.num_requests:
        notes.append(f"{len(outputs)} of {wl.num_requests} requests came back")
    return analysis.mode_row(
        f"hf-{'async' if cfg.is_async else 'sync'}", wall_s, arrivals,
        _timeline(box, wall_s, cfg, notes), result_dict(sampler), notes,
        expected_tokens=wl.total_new_tokens,
        extra={"call_s": call_s, "attn_implementation": hf.config._attn_implementation,
               "cb": cfg.cb, "cb_config": resolved})


def _resolve(spec: str) -> tuple[Path, bool]:
    source = models.resolve_model(spec, models.default_cache_dir())
    return source.folder, source.random_weights


def run(cfg: HfRunConfig) -> dict:
    import torch

    if cfg.is_async and not cfg.is_cuda:
        raise ValueError("Transformers' async batching needs CUDA")
    if not cfg.is_cuda:
        _allow_cpu_cache()
    dtype = torch.bfloat16 if cfg.is_cuda else torch.float32
    model = ModelInfo.load(cfg.model, *_resolve(cfg.model))
    started = time.perf_counter()
    hf = build_model(model, dtype, cfg.device, cfg.attn)
    log.info("built %s on %s in %.1f s", cfg.model, cfg.device, time.perf_counter() - started)
    return measure(hf, model, cfg)


def parse_args(argv: list[str]) -> HfRunConfig:
    p = argparse.ArgumentParser(prog="python -m bench.hf_baseline", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="embedded")
    p.add_argument("--mode", choices=("sync", "async"), required=True)
    p.add_argument("--num-requests", type=int, default=4)
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--seed", type=int, default=0, help="of the prompts")
    p.add_argument("--device", default="cpu", help="cuda or cpu")
    p.add_argument("--attn", default="sdpa", help="Transformers attention implementation")
    p.add_argument("--timeline-ms", type=float, default=30.0)
    p.add_argument("--out", type=Path, required=True, help="where the JSON row goes")
    p.add_argument("--no-trace", dest="trace", action="store_false",
                   help="no kernel timeline (the profiler slows Transformers' host loop)")
    p.add_argument("--cb", choices=CB_PRESETS, default="tuned",
                   help="tuned: cache sized for the workload, CUDA graphs, full-shape warm-up; "
                   "defaults: Transformers' own ContinuousBatchingConfig defaults")
    p.add_argument("--compile-level", type=int, default=0, choices=range(4),
                   help="ContinuousBatchingConfig.default_compile_level with --cb tuned")
    a = p.parse_args(argv)
    return HfRunConfig(a.model, a.mode == "async",
                       Workload(a.num_requests, a.prompt_tokens, a.new_tokens, a.seed),
                       a.device, a.attn, a.timeline_ms * 1e3, a.out, a.trace, a.cb,
                       a.compile_level)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    cfg = parse_args(sys.argv[1:] if argv is None else argv)
    row = run(cfg)
    cfg.out.write_text(json.dumps(row))
    return 0


if __name__ == "__main__":
    sys.exit(main())
