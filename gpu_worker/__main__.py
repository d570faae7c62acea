"""``python -m gpu_worker``: started by tokenizer_svc, never by hand.

Attaches to the slot segment and the doorbell socket that tokenizer_svc passes
in, loads the model, warms up, says READY, and runs batches until told to stop.
On a fatal error it tells its supervisor (FAILED, with the message) and exits 1.
"""

from __future__ import annotations

import argparse
import gc
import logging
import signal
import sys
import traceback
from pathlib import Path

from gpu_worker.config import KERNELS, WorkerConfig
from tandem import LOG_FORMAT
from tandem.link import Kind, Link, Message, PeerGone
from tandem.slots import SlotShape


def parse_args(argv: list[str]) -> WorkerConfig:
    p = argparse.ArgumentParser(prog="gpu_worker", description=__doc__)
    p.add_argument("--shm", required=True, help="name of the slot segment")
    p.add_argument("--link-fd", type=int, required=True)
    p.add_argument("--model", default="embedded")
    p.add_argument("--cache-dir", type=Path, required=True)
    p.add_argument("--max-num-tokens", type=int, required=True)
    p.add_argument("--max-num-rows", type=int, required=True)
    p.add_argument("--max-blocks-per-row", type=int, required=True)
    p.add_argument("--max-top-logprobs", type=int, default=20)
    p.add_argument("--num-slots", type=int, default=2)
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--num-blocks", type=int, default=None)
    p.add_argument("--kv-cache-gib", type=float, default=None)
    p.add_argument("--gpu-memory-utilization", type=float, default=0.85)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-cuda-graphs", action="store_true")
    p.add_argument("--kernels", default="auto", choices=KERNELS)
    a = p.parse_args(argv)
    shape = SlotShape(a.max_num_tokens, a.max_num_rows, a.max_blocks_per_row, a.max_top_logprobs,
                      a.block_size)
    return WorkerConfig(
        shm_name=a.shm, link_fd=a.link_fd, model=a.model, cache_dir=a.cache_dir,
        slot_shape=shape, num_slots=a.num_slots, device=a.device, dtype=a.dtype,
        block_size=a.block_size, num_blocks=a.num_blocks, kv_cache_gib=a.kv_cache_gib,
        gpu_memory_utilization=a.gpu_memory_utilization, seed=a.seed,
        cuda_graphs=not a.no_cuda_graphs, kernels=a.kernels,
    )


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
    cfg = parse_args(sys.argv[1:] if argv is None else argv)
    # Stopping is tokenizer_svc's call (SHUTDOWN, or the link closing): a Ctrl-C or a
    # SIGTERM sent to the whole process group must not kill the worker under the
    # requests that the engine is draining. The engine kills a worker that hangs.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    from gpu_worker.worker import Worker  # after arg parsing: imports torch

    worker = None
    try:
        worker = Worker(cfg)
        worker.warm_up()
        gc.collect()
        gc.freeze()  # the model's objects leave the collector's view: shorter pauses per step
        worker.serve()
        return 0
    except PeerGone:
        logging.getLogger("gpu_worker").info("tokenizer_svc went away; exiting")
        return 0
    except Exception as exc:  # noqa: BLE001 - report any fatal error to the supervisor
        traceback.print_exc()
        _report_failure(cfg.link_fd, worker, f"{type(exc).__name__}: {exc}")
        return 1
    finally:
        if worker is not None:
            worker.close()


def _report_failure(link_fd: int, worker, text: str) -> None:
    try:
        link = worker.link if worker is not None else Link.from_fd(link_fd)
        link.send(Message(Kind.FAILED, payload=text.encode()[:3000]))
    except OSError:
        pass


if __name__ == "__main__":
    sys.exit(main())
