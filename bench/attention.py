"""``python -m bench.attention``: decode attention against its KV-cache floor.

For each (batch, context) point, a CUDA graph runs the Triton attention backend's decode
step (RoPE with the cache write of the new token, then the attention) over every layer of a
Llama-3-8B-shaped paged cache (so the keys and values come from memory, not L2), and CUDA
events time its replays; ``other_rope_us`` times the same step with RoPE fused into the
attention launch or not, whichever the default is not. The floor is the bytes of K and V
each row reads over the measured copy bandwidth. With ``--search`` it also times a grid of kernel
settings (keys per tile, pipeline stages, warps, programs per SM) and reports the fastest
per point, which is how the defaults in ``gpu_worker.kernels.paged_attention`` are chosen.
Prints JSON on the last line of stdout. CUDA only.
"""

from __future__ import annotations

import itertools
import json
import logging
import sys

import torch

from bench.device import measure_bandwidth, tool_parser
from bench.gemm import graph_us
from bench.sweep import BLOCK_SIZE, decode_metadata
from gpu_worker.attention import KVCache
from gpu_worker.kernels.paged_attention import TritonPagedAttention

log = logging.getLogger("bench.attention")
LAYERS, HEADS, KV_HEADS, HEAD_DIM = 32, 32, 8, 128  # Llama-3-8B


class _Rope:
    def __init__(self, positions: int, device) -> None:
        self.cos = torch.ones(positions, HEAD_DIM, dtype=torch.bfloat16, device=device)
        self.signed_sin = torch.zeros_like(self.cos)


def settings() -> list[dict]:
    grid = [(32, 2, 4), (32, 3, 4), (32, 4, 4), (64, 2, 4), (64, 3, 4), (64, 4, 4),
            (64, 3, 8), (128, 2, 4), (128, 2, 8), (128, 3, 8)]
    # waves 1: one program a (row, kv head) where that fills the machine (batch 32 x 8 kv
    # heads: 256 programs of 512 KB each at 1K, against 512 of 256 KB at the default 2)
    return [{"block_n": bn, "num_stages": st, "num_warps": w, "waves": waves}
            for (bn, st, w), waves in itertools.product(grid, (1, 2, 4, 8))]


def measure(batch: int, context: int, bandwidth: float, search: bool) -> dict:
    dev = torch.device("cuda")
    blocks = batch * -(-context // BLOCK_SIZE) + 1
    cache = KVCache(LAYERS, blocks, BLOCK_SIZE, KV_HEADS, HEAD_DIM, torch.bfloat16, dev)
    cache.data.normal_()
    meta = decode_metadata(batch, context, dev)
    q = torch.randn(batch, HEADS, HEAD_DIM, dtype=torch.bfloat16, device=dev)
    k = torch.randn(batch, KV_HEADS, HEAD_DIM, dtype=torch.bfloat16, device=dev)
    v = torch.randn_like(k)
    rope = _Rope(context + 1, dev)
    floor_us = batch * context * 2 * KV_HEADS * HEAD_DIM * 2 / bandwidth * 1e6  # one layer

    def time(opts: dict) -> float:
        backend = TritonPagedAttention(cache, HEAD_DIM**-0.5, **opts)
        return graph_us(lambda i: backend.forward(i, q, k, v, meta, rope), LAYERS)

    default = TritonPagedAttention(cache, HEAD_DIM**-0.5)
    row = {"batch": batch, "context": context, "floor_us": floor_us, "default_us": time({}),
           "default": {"block_n": default.block_n, "num_stages": default.num_stages,
                       "num_warps": default.num_warps, "waves": default.waves,
                       "fuse_rope": default.fuse_rope},
           "other_rope_us": time({"fuse_rope": not default.fuse_rope})}
    if search:
        results = []
        for opts in settings():
            try:
                results.append((time(opts), opts))
            except Exception as exc:  # noqa: BLE001 - a setting that does not compile
                log.warning("%s: %s", opts, str(exc)[:200])
        if not results:
            raise RuntimeError(f"no setting ran at batch {batch}, context {context}")
        results.sort(key=lambda r: r[0])
        row["best_us"], row["best"] = results[0]
        row["top"] = [{"us": us, **opts} for us, opts in results[:8]]
    log.info("batch %d context %d: floor %.1f us/layer, default %.1f (%.0f%%), RoPE %s: "
             "%.1f%s", batch, context, floor_us, row["default_us"],
             100 * floor_us / row["default_us"],
             "unfused" if default.fuse_rope else "fused", row["other_rope_us"],
             f", best {row['best_us']:.1f} ({100 * floor_us / row['best_us']:.0f}%) "
             f"{row['best']}" if search else "")
    return row


def main(argv: list[str] | None = None) -> int:
    p = tool_parser("bench.attention", __doc__)
    p.add_argument("--points", default="32x1024,32x4096,128x1024,8x4096",
                   help="BATCHxCONTEXT, comma-separated")
    p.add_argument("--search", action="store_true", help="time the grid of settings too")
    a = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench.attention needs a CUDA GPU", file=sys.stderr)
        return 2
    bandwidth = measure_bandwidth("cuda", nbytes=2 << 30, iters=50)
    rows = []
    for point in a.points.split(","):
        batch, context = (int(x) for x in point.split("x"))
        rows.append(measure(batch, context, bandwidth, a.search))
        torch.cuda.empty_cache()
    print(json.dumps({"bandwidth_bytes_per_s": bandwidth, "points": rows}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
