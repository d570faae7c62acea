"""``python -m tokenizer_svc --listen ADDR [options]``: one engine.

Tokenizes, schedules and streams; starts and supervises its gpu_worker. Serves
``tandem.internal.v1.Engine`` (for gateways) and health, NOT_SERVING until the
worker has warmed up. Exits 1 if the worker dies, so that its own supervisor
(the gateway, or Kubernetes) can restart the pair.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import logging
import signal
import sys
from pathlib import Path

from tandem import LOG_FORMAT, models
from tandem import slots as S
from tokenizer_svc.block_manager import BlockManager
from tokenizer_svc.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from tokenizer_svc.engine import Engine
from tokenizer_svc.metrics import EngineMetrics
from tokenizer_svc.output_processor import OutputProcessor
from tokenizer_svc.scheduler import Scheduler, SchedulerLimits
from tokenizer_svc.server import EngineServicer, set_health, start_server
from tokenizer_svc.tokenization import ModelTokenizer
from tokenizer_svc.worker_client import WorkerClient, WorkerFailed

GIL_SWITCH_INTERVAL_S = 2e-4

log = logging.getLogger("tokenizer_svc")


def parse_args(argv: list[str]) -> EngineConfig:
    p = argparse.ArgumentParser(prog="tokenizer_svc", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--listen", required=True, metavar="ADDR",
                   help="address to serve on: unix:///path.sock or host:port")
    p.add_argument("--model", default="embedded",
                   help="'embedded' (default), 'random:<preset>' or a Hugging Face folder")
    p.add_argument("--cache-dir", type=Path, default=None, metavar="DIR",
                   help="converted models (default: $TANDEM_CACHE or ~/.cache/tandem)")
    p.add_argument("--device", default="auto",
                   help="worker device: auto (default: cuda if there is one), cpu, cuda, cuda:N")
    p.add_argument("--dtype", default="auto",
                   help="auto (default: bfloat16 on a GPU, float32 on the CPU), bfloat16, "
                        "float16, float32")
    p.add_argument("--seed", type=int, default=0,
                   help="weights of random presets (default %(default)s)")
    p.add_argument("--kernels", default="auto",
                   help="worker kernels: auto (Triton on CUDA, torch on the CPU), triton, torch")
    p.add_argument("--sync", action="store_true", help="no overlap: the benchmark baseline")
    p.add_argument("--block-size", type=int, default=16, metavar="N",
                   help="tokens per KV cache block (default %(default)s)")
    p.add_argument("--num-kv-blocks", type=int, default=None, metavar="N",
                   help="KV cache blocks (default: from --kv-cache-gib)")
    p.add_argument("--kv-cache-gib", type=float, default=None, metavar="GIB",
                   help="KV cache size (default: 1 GiB on the CPU; on a GPU what "
                        "--gpu-memory-utilization leaves)")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.85, metavar="F",
                   help="fraction of the GPU's memory the worker may fill, weights and KV "
                        "cache included (default %(default)s)")
    p.add_argument("--no-prefix-caching", dest="prefix_caching", action="store_false",
                   help="compute every prompt in full, even where a cached block holds the "
                        "same prefix")
    p.add_argument("--max-num-seqs", type=int, default=64, metavar="N",
                   help="requests in a batch at most (default %(default)s)")
    p.add_argument("--max-num-batched-tokens", type=int, default=2048, metavar="N",
                   help="tokens in a batch at most; longer prompts are prefilled in chunks "
                        "(default %(default)s)")
    p.add_argument("--max-model-len", type=int, default=None, metavar="N",
                   help="context length, prompt plus output (default: the model's, at most "
                        "8192)")
    p.add_argument("--default-max-tokens", type=int, default=256, metavar="N",
                   help="max_tokens of a request that sets none (default %(default)s)")
    p.add_argument("--batch-wait-ms", type=float, default=0.0, metavar="MS",
                   help="when idle, gather requests this long before the first batch "
                        "(default %(default)s)")
    p.add_argument("--max-waiting-requests", type=int, default=1024, metavar="N",
                   help="queued requests beyond which new ones get RESOURCE_EXHAUSTED "
                        "(default %(default)s)")
    p.add_argument("--max-waiting-tokens", type=int, default=1 << 20, metavar="N",
                   help="queued prompt tokens beyond which new requests get RESOURCE_EXHAUSTED "
                        "(default %(default)s)")
    p.add_argument("--grace-period", type=float, default=30.0, metavar="S",
                   help="on SIGTERM, seconds in-flight requests get to finish "
                        "(default %(default)s)")
    p.add_argument("--stall-timeout", type=float, default=120.0, metavar="S",
                   help="seconds a batch may stay in flight before health says NOT_SERVING "
                        "(default %(default)s)")
    p.add_argument("--metrics-port", type=int, default=None, metavar="PORT",
                   help="serve Prometheus metrics on this port (0: any free port; default: "
                        "off)")
    p.add_argument("--metrics-host", default="127.0.0.1", metavar="HOST",
                   help="address of the metrics endpoint (default %(default)s; 0.0.0.0 to "
                        "expose it)")
    a = p.parse_args(argv)
    try:
        return _config(a)
    except ValueError as exc:  # a flag's value out of range: a usage error (exit 2)
        p.error(str(exc))


def _config(a: argparse.Namespace) -> EngineConfig:
    return EngineConfig(
        listen=a.listen,
        model=ModelConfig(a.model, a.cache_dir or models.default_cache_dir(), a.device, a.dtype,
                          a.seed, a.kernels),
        cache=CacheConfig(a.block_size, a.num_kv_blocks, a.kv_cache_gib,
                          a.gpu_memory_utilization, a.prefix_caching),
        scheduler=SchedulerConfig(a.max_num_seqs, a.max_num_batched_tokens, a.max_model_len,
                                  a.default_max_tokens, overlap=not a.sync,
                                  batch_wait_ms=a.batch_wait_ms,
                                  max_waiting_requests=a.max_waiting_requests,
                                  max_waiting_tokens=a.max_waiting_tokens),
        grace_period=a.grace_period,
        metrics_port=a.metrics_port,
        metrics_host=a.metrics_host,
        stall_timeout=a.stall_timeout,
    )


def slot_layout(cfg: EngineConfig, max_context: int) -> S.SlotLayout:
    sched = cfg.scheduler
    shape = S.SlotShape(max_num_tokens=sched.max_num_batched_tokens,
                        max_num_rows=sched.max_num_seqs,
                        max_blocks_per_row=-(-max_context // cfg.cache.block_size),
                        max_top_logprobs=sched.max_top_logprobs,
                        block_size=cfg.cache.block_size)
    return S.SlotLayout(shape, cfg.num_slots)


def build_engine(cfg: EngineConfig, tok: ModelTokenizer, worker: WorkerClient,
                 segment: S.SlotSegment, metrics: EngineMetrics) -> Engine:
    sched = cfg.scheduler
    blocks = BlockManager(worker.num_blocks, cfg.cache.block_size, cfg.cache.prefix_caching)
    scheduler = Scheduler(SchedulerLimits(sched.max_num_seqs, sched.max_num_batched_tokens),
                          blocks)
    outputs = OutputProcessor(tok.tokenizer, tok.eos_token_ids, tok.max_context)
    return Engine(scheduler, outputs, worker, segment, overlap=sched.overlap,
                  batch_wait=sched.batch_wait_ms / 1000, metrics=metrics)


async def serve(cfg: EngineConfig) -> int:
    source = models.resolve_model(cfg.model.spec, cfg.model.cache_dir)
    tok = ModelTokenizer(source.folder, cfg.scheduler.max_model_len)
    metrics = EngineMetrics()
    servicer = EngineServicer(cfg, tok, source.name, metrics)
    server, health_servicer = await start_server(cfg, servicer)
    if cfg.metrics_port is not None:
        port = metrics.serve(cfg.metrics_port, cfg.metrics_host)
        log.info("metrics on http://%s:%d/metrics", cfg.metrics_host, port)
    segment = S.SlotSegment(slot_layout(cfg, tok.max_context), create=True)
    worker = WorkerClient(cfg, segment)
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    engine = None
    try:
        if not await start_worker(loop, worker, stopping):
            log.info("stopped while the worker was starting")
            return 0
        engine = build_engine(cfg, tok, worker, segment, metrics)
        engine.on_fatal = lambda exc: loop.call_soon_threadsafe(stopping.set)
        servicer.engine, servicer.device, servicer.dtype = engine, worker.device, worker.dtype
        gc.collect()
        gc.freeze()  # start-up objects leave the collector's view: shorter pauses per step
        # The engine thread shares the GIL with the gRPC loop, which streams every step's
        # tokens. Python hands a contended GIL over only every switch interval (5 ms by
        # default): long enough for the engine to miss the GPU's next step.
        sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)
        engine.start()
        await set_health(health_servicer, True)
        log.info("serving %s (%s mode)", source.name, "async" if cfg.scheduler.overlap else "sync")
        watchdog = asyncio.create_task(
            watch(engine, health_servicer, cfg.stall_timeout, stopping.set))
        await stopping.wait()
        watchdog.cancel()
        if engine.fatal is not None:
            return 1
        await drain(servicer, health_servicer, engine, cfg.grace_period)
        return 0
    finally:
        await set_health(health_servicer, False)
        await server.stop(grace=1.0)
        if engine is not None:
            engine.stop()
        worker.stop()
        segment.close()


async def start_worker(loop, worker: WorkerClient, stopping: asyncio.Event) -> bool:
    """Start the worker and wait until it is ready; False (the worker stopped) if a signal
    comes first: loading and warming up can take minutes, longer than a supervisor waits."""
    starting = loop.run_in_executor(None, worker.start)
    stop = asyncio.ensure_future(stopping.wait())
    await asyncio.wait((starting, stop), return_when=asyncio.FIRST_COMPLETED)
    stop.cancel()
    if starting.done():
        starting.result()  # WorkerFailed: the engine exits 1
        return True
    worker.cancel_start()
    with contextlib.suppress(WorkerFailed):
        await starting
    return False


async def watch(engine: Engine, health_servicer, stall_timeout: float,
                on_worker_exit) -> None:
    """Supervise the worker and make health mean something: exit when the worker has
    died (even while idle), NOT_SERVING while the device makes no progress."""
    serving = True
    while True:
        await asyncio.sleep(0.5)
        code = engine.worker.proc.poll()
        if code is not None:
            log.error("the gpu_worker exited with code %s", code)
            engine.fatal = engine.fatal or RuntimeError(f"gpu_worker exited with code {code}")
            await set_health(health_servicer, False)
            on_worker_exit()
            return
        ok = engine.stalled_for() < stall_timeout
        if ok != serving:
            log.warning("engine %s", "progressing again" if ok else
                        f"stalled: no batch finished for {engine.stalled_for():.0f} s")
            await set_health(health_servicer, ok)
            serving = ok


async def drain(servicer: EngineServicer, health_servicer, engine: Engine, grace: float) -> None:
    """SIGTERM: NOT_SERVING, refuse new requests, let the running ones finish and their
    calls send their last output (a request leaves the engine before its call has sent
    it)."""
    servicer.draining = True
    await set_health(health_servicer, False)
    deadline = asyncio.get_running_loop().time() + grace
    while (engine.requests or servicer.num_calls) and \
            asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(0.05)
    if engine.requests or servicer.num_calls:
        log.warning("grace period over: %d requests cut off, %d calls still open",
                    len(engine.requests), servicer.num_calls)
    log.info("drained; shutting down")


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
    cfg = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        return asyncio.run(serve(cfg))
    except Exception:  # noqa: BLE001 - any fatal error: report and exit non-zero
        log.exception("tokenizer_svc failed")
        return 1


if __name__ == "__main__":
    sys.exit(main())
