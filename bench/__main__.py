"""``python -m bench``: Tandem ``--sync`` vs async (alone and behind the gateway) vs
Transformers' continuous batching.

Modes, run in this order by default:

- ``tandem-sync``, ``tandem-async``: one engine (``python -m tokenizer_svc``, with ``--sync``
  or not), driven over its internal gRPC API: the engine's own throughput;
- ``tandem-gateway``: tandem-async's engine with a gateway (``python -m gateway``) in front;
  the same requests go as concurrent ``GenerateStream`` calls of the public API, so the
  summary's ``gateway_over_engine`` is what the gateway keeps of the engine's throughput;
- ``tandem-http``: the same through the gateway's OpenAI-compatible HTTP API (streamed
  ``POST /v1/completions``, one connection per request; ``http_over_engine``);
- ``hf-sync``, ``hf-async``: Transformers' ``generate_batch`` (async needs CUDA).

On a GPU (defaults): a random-weight Llama-3-8B-shaped model, 32 requests of 256 prompt
tokens, 1024 new tokens each (EOS ignored); ``--new-tokens 8192`` for the long version.
Without a GPU: a smoke run on the embedded model whose numbers mean nothing.

Each mode runs alone on the device (one engine or one Transformers process at a time).
Writes ``OUT/bench.json``, ``OUT/bench.png`` (if matplotlib is installed) and the
processes' logs in ``OUT/logs/``, and prints the table.
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bench import analysis, report
from bench.device import NvmlSampler
from bench.services import REPO, EngineSpec
from bench.tandem_run import run_mode
from bench.workload import (
    GATEWAY_MODE,
    HTTP_MODE,
    MODES,
    ModelInfo,
    Workload,
    make_prompts,
    warmup_prompts,
)
from tandem import models

log = logging.getLogger("bench")
GPU_DEFAULTS = {"model": "random:llama3-8b", "num_requests": 32, "prompt_tokens": 256,
                "new_tokens": 1024}
CPU_DEFAULTS = {"model": "embedded", "num_requests": 4, "prompt_tokens": 32, "new_tokens": 16}
WARMUP_REQUESTS = 2


@dataclass(frozen=True)
class BenchConfig:
    model: str
    workload: Workload
    modes: tuple[str, ...]
    out_dir: Path
    timeline_ms: float
    engine_args: tuple[str, ...]
    hf_attn: str
    keep_traces: bool
    sweep: bool
    hf_trace: bool
    hf_timeout_s: float
    hf_cb: str = "tuned"  # Transformers' ContinuousBatchingConfig: tuned or its defaults
    gateway_args: tuple[str, ...] = ()  # extra arguments of the gateway modes' gateway
    trace: bool = True  # Tandem modes: the kernel profiler in the worker while measuring

    def __post_init__(self) -> None:
        unknown = [m for m in self.modes if m not in MODES]
        if unknown or not self.modes:
            raise ValueError(f"--modes: unknown {unknown or 'none given'}; "
                             f"choose among {', '.join(MODES)}")
        if self.timeline_ms <= 0:
            raise ValueError("--timeline-ms must be positive")


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="random:llama3-8b on a GPU, embedded on the CPU")
    p.add_argument("--num-requests", type=int, help="32 on a GPU, 4 on the CPU")
    p.add_argument("--prompt-tokens", type=int, help="256 on a GPU, 32 on the CPU")
    p.add_argument("--new-tokens", type=int, help="1024 on a GPU (8192: long run), 16 on CPU")
    p.add_argument("--modes", default=",".join(MODES), help="comma-separated, run in order")
    p.add_argument("--out", type=Path, default=Path("bench_results"), help="output folder")
    p.add_argument("--timeline-ms", type=float, default=30.0, help="timeline slice in the PNG")
    p.add_argument("--device", default="auto", help="auto, cuda or cpu")
    p.add_argument("--seed", type=int, default=0, help="of the random prompts")
    p.add_argument("--engine-arg", action="append", default=[], metavar="ARG",
                   help="extra tokenizer_svc argument (repeat), e.g. --engine-arg=--block-size=32")
    p.add_argument("--gateway-arg", action="append", default=[], metavar="ARG",
                   help="extra gateway argument (repeat), e.g. "
                   "--gateway-arg=--engine-streams=multiplexed")
    p.add_argument("--hf-attn", default="sdpa", help="Transformers attention implementation")
    p.add_argument("--keep-traces", action="store_true", help="keep the workers' trace files")
    p.add_argument("--no-hf-trace", dest="hf_trace", action="store_false",
                   help="run Transformers without the kernel profiler (its overhead slows "
                   "Transformers' host loop; busy%% then comes from NVML only)")
    p.add_argument("--hf-timeout", type=float, default=1800.0, metavar="S",
                   help="give up on a Transformers mode after this long (default 1800)")
    p.add_argument("--hf-cb", choices=("tuned", "defaults"), default="tuned",
                   help="Transformers' continuous batching: tuned (cache sized for the "
                   "workload, CUDA graphs; default) or its own defaults (see bench.hf_baseline)")
    p.add_argument("--no-trace", dest="trace", action="store_false",
                   help="run Tandem's modes without the kernel profiler in the worker (busy%% "
                   "then comes from NVML only; for profiling the host side, or long runs)")
    p.add_argument("--no-sweep", dest="sweep", action="store_false",
                   help="skip the decode/prefill sweep against the floor (bench.sweep)")
    return p.parse_args(argv)


def make_config(args: argparse.Namespace, is_gpu: bool) -> BenchConfig:
    defaults = GPU_DEFAULTS if is_gpu else CPU_DEFAULTS
    pick = {k: getattr(args, k) if getattr(args, k) is not None else v
            for k, v in defaults.items()}
    workload = Workload(pick["num_requests"], pick["prompt_tokens"], pick["new_tokens"],
                        args.seed)
    return BenchConfig(pick["model"], workload, tuple(m for m in args.modes.split(",") if m),
                       args.out, args.timeline_ms, tuple(args.engine_arg), args.hf_attn,
                       args.keep_traces, args.sweep, args.hf_trace, args.hf_timeout,
                       args.hf_cb, tuple(args.gateway_arg), args.trace)


def probe_device(device: str) -> dict[str, Any]:
    """Device name and bandwidth, from a subprocess: this process never touches CUDA."""
    done = subprocess.run([sys.executable, "-m", "bench.device", "--device", device],
                          cwd=REPO, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"the device probe failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def run_sweep(cfg: BenchConfig, device: dict[str, Any], log_dir: Path) -> dict[str, Any]:
    """The decode/prefill sweep in its own process (its GPU memory goes with it)."""
    argv = [sys.executable, "-m", "bench.sweep", "--device", device["kind"]]
    with open(log_dir / "sweep.log", "w") as log_file:
        done = subprocess.run(argv, cwd=REPO, stdout=subprocess.PIPE, stderr=log_file,
                              text=True, check=False)
    if done.returncode != 0:
        return {"status": "failed", "note": f"exit code {done.returncode}; see sweep.log"}
    return {"status": "ok"} | json.loads(done.stdout.strip().splitlines()[-1])


def engine_spec(cfg: BenchConfig, mode: str, is_gpu: bool) -> EngineSpec:
    wl = cfg.workload
    batched = wl.batch_tokens(8192)
    return EngineSpec(cfg.model, is_sync=mode == "tandem-sync",
                      is_gpu=is_gpu, max_num_seqs=wl.num_requests,
                      max_num_batched_tokens=batched,
                      max_model_len=wl.prompt_tokens + wl.new_tokens + 16,
                      extra_args=cfg.engine_args)


def run_hf(cfg: BenchConfig, mode: str, device: dict[str, Any], log_dir: Path) -> dict:
    """One Transformers mode in its own process (its GPU memory goes with it)."""
    wl, out = cfg.workload, log_dir / f"{mode}.json"
    argv = [sys.executable, "-m", "bench.hf_baseline", "--model", cfg.model,
            "--mode", mode.removeprefix("hf-"), "--num-requests", str(wl.num_requests),
            "--prompt-tokens", str(wl.prompt_tokens), "--new-tokens", str(wl.new_tokens),
            "--seed", str(wl.seed), "--device", device["kind"], "--attn", cfg.hf_attn,
            "--timeline-ms", str(cfg.timeline_ms), "--out", str(out.resolve()),
            "--cb", cfg.hf_cb]
    if not cfg.hf_trace:
        argv.append("--no-trace")
    with open(log_dir / f"{mode}.log", "w") as log_file:
        try:
            done = subprocess.run(argv, cwd=REPO, stdout=log_file, stderr=subprocess.STDOUT,
                                  check=False, timeout=cfg.hf_timeout_s)
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"no result within {cfg.hf_timeout_s:g} s (--hf-timeout); "
                               f"see {log_dir / f'{mode}.log'}") from None
    if done.returncode != 0:
        raise RuntimeError(f"exit code {done.returncode}; see {log_dir / f'{mode}.log'}")
    return json.loads(out.read_text())


def run_one(cfg: BenchConfig, mode: str, device: dict[str, Any], model: ModelInfo,
            log_dir: Path) -> dict:
    is_gpu = device["kind"] == "cuda"
    if mode == "hf-async" and not is_gpu:
        return analysis.skipped_row(mode, "skipped", "Transformers' async batching needs CUDA")
    log.info("running %s", mode)
    if mode.startswith("hf-"):
        return run_hf(cfg, mode, device, log_dir)
    wl = cfg.workload
    sampler = NvmlSampler(is_gpu, device.get("pci_bus_id"))
    return run_mode(mode, engine_spec(cfg, mode, is_gpu), make_prompts(wl, model),
                    warmup_prompts(wl, model, WARMUP_REQUESTS), wl.new_tokens, sampler,
                    cfg.timeline_ms * 1e3, log_dir, cfg.keep_traces,
                    via_gateway=mode == GATEWAY_MODE, gateway_args=cfg.gateway_args,
                    trace=cfg.trace, via_http=mode == HTTP_MODE)


def add_floor(rows: list[dict], floor: analysis.Floor) -> None:
    for row in rows:
        if row["status"] == "ok":
            row["floor_ms"] = floor.seconds * 1e3
            row["floor_over_step"] = analysis.ratio(row["floor_ms"], row.get("step_ms"))


def assemble(cfg: BenchConfig, device: dict, model: ModelInfo, rows: list[dict],
             started: float) -> dict[str, Any]:
    is_gpu, wl = device["kind"] == "cuda", cfg.workload
    floor = analysis.decode_floor(model.shape, 2 if is_gpu else 4, wl.num_requests,
                                  wl.avg_context, device["bandwidth_bytes_per_s"])
    add_floor(rows, floor)
    return {
        "schema": "tandem-bench/1", "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "meaningful": is_gpu, "warning": None if is_gpu else report.NOT_MEANINGFUL,
        "device": device, "total_s": time.monotonic() - started,
        "model": {"spec": model.spec, "dtype": "bfloat16" if is_gpu else "float32",
                  "shape": asdict(model.shape)},
        "workload": asdict(wl) | {"avg_context": wl.avg_context},
        "floor": asdict(floor) | {"avg_context": wl.avg_context, "batch": wl.num_requests,
                                  "ms": floor.seconds * 1e3},
        "modes": rows, "summary": report.summarize(rows),
    }


def run(cfg: BenchConfig, device: dict[str, Any], started: float) -> dict[str, Any]:
    source = models.resolve_model(cfg.model, models.default_cache_dir())
    model = ModelInfo.load(cfg.model, source.folder, source.random_weights)
    log_dir = cfg.out_dir / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    sweep = None
    if cfg.sweep:
        log.info("running the decode/prefill sweep")
        sweep = run_sweep(cfg, device, log_dir)
    rows, result = [], {}
    for mode in cfg.modes:
        try:
            rows.append(run_one(cfg, mode, device, model, log_dir))
        except Exception as exc:  # one broken mode must not lose the others
            log.exception("%s failed", mode)
            rows.append(analysis.skipped_row(mode, "failed", f"{type(exc).__name__}: {exc}"))
        # Written after every mode: what is done survives a run that is cut short.
        result = assemble(cfg, device, model, rows, started) | {"sweep": sweep}
        report.write_json(result, cfg.out_dir / "bench.json")
    return result


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    started = time.monotonic()
    args = parse_args(sys.argv[1:] if argv is None else argv)
    device = probe_device(args.device)
    try:
        cfg = make_config(args, device["kind"] == "cuda")
    except ValueError as exc:
        print(f"python -m bench: {exc}", file=sys.stderr)
        return 2
    log.info("device: %s; model %s; %s", device["name"], cfg.model, cfg.workload)
    result = run(cfg, device, started)  # bench.json is written as the modes finish
    why_not = report.draw_png(result, cfg.out_dir / "bench.png")
    print(report.format_table(result))
    print(f"wrote {cfg.out_dir / 'bench.json'}"
          + (f"; {why_not}" if why_not else f" and {cfg.out_dir / 'bench.png'}"))
    return 0 if all(row["status"] != "failed" for row in result["modes"]) else 1


if __name__ == "__main__":
    sys.exit(main())
