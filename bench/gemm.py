"""``python -m bench.gemm``: a decode step's matrix products, Tandem's kernel against cuBLAS.

For each product of a Llama layer (fused QKV, O, fused gate/up, down) at each batch size,
a CUDA graph runs the product over enough distinct copies of the weight that they do not
fit in L2, back to back as in a model, and CUDA events time its replays. Each row gives
microseconds per product and the fraction of the measured copy bandwidth that reading the
weight once achieves, for ``F.linear`` (cuBLAS) and for
:func:`gpu_worker.kernels.linear.linear` with its default config. ``gate_up_silu`` is the
gate/up product followed by SiLU-and-mul: cuBLAS and the SiLU kernel, against
:func:`gpu_worker.kernels.linear.gate_up_silu` (both in one launch).
``lm_head`` is the LM head (once a step). ``o_add_norm`` and ``normed_qkv`` time the folded
norm (``gpu_worker.ops.FOLD_NORMS``): the O product adding into the residual (and leaving
its sums of squares) and the QKV product finishing the norm, against cuBLAS with the
add_rms_norm or rms_norm kernel beside it; ``normed_qkv_prescaled`` is the latter with the
norm's weight already in the QKV weight, so x goes into the product unscaled, and
``normed_gate_up_silu`` the gate/up product with SiLU finishing the MLP norm, as the model
runs it (the norm's weight in the gate/up weight).
``--search`` also times a grid of configs and reports the fastest per product, which is
how the default configs are chosen. Prints JSON on the last line of stdout. CUDA only.
"""

from __future__ import annotations

import itertools
import json
import logging
import sys

import torch
import torch.nn.functional as F

from bench.device import measure_bandwidth, tool_parser
from gpu_worker.kernels import fused, num_sms, shared_memory
from gpu_worker.kernels import linear as lin

log = logging.getLogger("bench.gemm")
# (name, N, K) of one Llama-3-8B layer, and its LM head (1 GB: once a step, ~5% of it)
LLAMA3_8B = (("qkv", 6144, 4096), ("o", 4096, 4096), ("gate_up", 28672, 4096),
             ("down", 4096, 14336), ("gate_up_silu", 28672, 4096), ("lm_head", 128256, 4096),
             ("o_add_norm", 4096, 4096), ("normed_qkv", 6144, 4096),
             ("normed_qkv_prescaled", 6144, 4096), ("normed_gate_up_silu", 28672, 4096))
GATED = ("gate_up_silu", "normed_gate_up_silu")  # SiLU-and-mul in the product's epilogue
DEFAULT_PRODUCTS = "qkv,o,gate_up,down,lm_head"
COPIES_BYTES = 2 << 30  # weight copies per graph: well past the 50-60 MB of L2
REPLAYS = 10


def graph_us(fn, copies: int) -> float:
    """Median microseconds per product of ``fn(i)`` for i in range(copies), in one graph."""
    for i in range(min(copies, 2)):
        fn(i)  # compile outside the graph
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(copies):
            fn(i)
    graph.replay()
    times = []
    for _ in range(REPLAYS):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / copies)
    del graph
    return sorted(times)[len(times) // 2]


def candidates(n: int, k: int, num_sms: int, gated: bool, rows: int,
               shared: int) -> list[lin.LinearConfig]:
    """Configs to search; gated tiles hold half their rows from each half of the weight,
    so they may be twice as tall. From half a program per SM (one wave of whole-K tiles,
    ``linear.WHOLE_K``) to eight, within ``shared`` bytes of shared memory."""
    out = []
    block_m = lin._block_m(rows)  # the x tile's rows, as the kernel pads them
    for bn, bk, split, stages in itertools.product(
            (32, 64, 128) + ((256,) if gated else ()), (64, 128, 256), (1, 2, 4, 8), (3, 4, 5)):
        programs = -(-n // bn) * split
        fits = (bn + block_m) * bk * 2 * stages <= shared - lin.SPARE_SHARED
        if k % (split * bk) or not num_sms // 2 <= programs <= 8 * num_sms or not fits:
            continue
        out.append(lin.LinearConfig(bn, bk, split, 8 if bn >= 128 else 4, stages))
    return out


def products(name: str, x: torch.Tensor, weights: list[torch.Tensor], counters: torch.Tensor):
    """``cublas(i)`` and ``tandem(config)(i)``: product ``name`` of x [rows, K] by
    ``weights[i]`` [N, K], as the model would run it unfused and with Tandem's kernel.
    The folded norm (``gpu_worker.ops.FOLD_NORMS``): ``o_add_norm`` is the O product with
    the residual add and the next norm, ``normed_qkv`` (``_prescaled``: the norm's weight in
    the product's) and ``normed_gate_up_silu`` (prescaled) the products of that norm's
    output; their cuBLAS side is the unfolded pair (cuBLAS and the add_rms_norm or rms_norm
    kernel)."""
    gated = name in GATED
    rows, (n, k) = x.shape[0], weights[0].shape
    residual = torch.randn(rows, n if name == "o_add_norm" else k, device=x.device,
                           dtype=x.dtype)
    norm_weight = torch.ones(residual.shape[1], device=x.device, dtype=x.dtype)
    # a normed product's input as an O product of 32-column tiles would leave its sums
    sums = residual.float().pow(2).view(rows, -1, 32).sum(-1).T.contiguous()

    def cublas(i):
        if name == "o_add_norm":
            return fused.add_rms_norm(F.linear(x, weights[i]), residual, norm_weight, 1e-5)
        if name.startswith("normed_qkv"):
            return F.linear(fused.rms_norm(residual, norm_weight, 1e-5), weights[i])
        if name == "normed_gate_up_silu":
            return fused.silu_and_mul(F.linear(fused.rms_norm(residual, None, 1e-5),
                                               weights[i]))
        y = F.linear(x, weights[i])
        return fused.silu_and_mul(y) if gated else y

    def tandem(cfg):
        if name == "o_add_norm":
            return lambda i: lin.linear_add(x, weights[i], residual, counters=counters,
                                            config=cfg)
        if name.startswith("normed_qkv"):
            scale = None if name == "normed_qkv_prescaled" else norm_weight
            return lambda i: lin.normed_linear(residual, sums, scale, 1e-5, weights[i],
                                               counters=counters, config=cfg)
        if name == "normed_gate_up_silu":
            return lambda i: lin.normed_gate_up_silu(residual, sums, None, 1e-5, weights[i],
                                                     counters=counters, config=cfg)
        kernel = lin.gate_up_silu if gated else lin.linear
        return lambda i: kernel(x, weights[i], counters=counters, config=cfg)

    return cublas, tandem


def measure(name, n, k, rows, bandwidth, search) -> dict:
    dev, dtype = torch.device("cuda"), torch.bfloat16
    copies = max(4, COPIES_BYTES // (n * k * 2))
    weights = [torch.randn(n, k, device=dev, dtype=dtype) / 64 for _ in range(copies)]
    x = torch.randn(rows, k, device=dev, dtype=dtype)
    counters = lin.new_counters(dev)
    floor_us = n * k * 2 / bandwidth * 1e6

    cublas, tandem = products(name, x, weights, counters)
    row = {"product": name, "n": n, "k": k, "rows": rows, "floor_us": floor_us,
           "cublas_us": graph_us(cublas, copies)}
    sms, shared, gated = num_sms(dev), shared_memory(dev), name in GATED
    default = lin.default_config(rows, n, k, sms, shared, gated)  # as the launcher picks
    row["tandem_us"] = graph_us(tandem(default), copies)
    row["tandem_config"] = vars(default)

    if search:
        best = None
        for cfg in candidates(n, k, sms, gated, rows, shared):
            try:
                us = graph_us(tandem(cfg), copies)
            except Exception as exc:  # noqa: BLE001 - a config that does not compile
                log.warning("%s %s: %s", name, cfg, str(exc)[:200])
                continue
            if best is None or us < best[0]:
                best = (us, cfg)
        if best:
            row["best_us"], row["best_config"] = best[0], vars(best[1])
    for key in ("cublas_us", "tandem_us", "best_us"):
        if key in row:
            row[key.replace("_us", "_of_floor")] = floor_us / row[key]
    log.info("%-9s rows %3d: floor %6.1f us, cuBLAS %6.1f (%.0f%%), tandem %6.1f (%.0f%%)%s",
             name, rows, floor_us, row["cublas_us"], 100 * row["cublas_of_floor"],
             row["tandem_us"], 100 * row["tandem_of_floor"],
             f", best {row['best_us']:.1f} ({100 * row['best_of_floor']:.0f}%) "
             f"{row['best_config']}" if "best_us" in row else "")
    return row


def main(argv: list[str] | None = None) -> int:
    p = tool_parser("bench.gemm", __doc__)
    p.add_argument("--rows", default="1,8,32,64", help="batch sizes, comma-separated")
    p.add_argument("--search", default="", help="batch sizes to search configs at (e.g. 32)")
    p.add_argument("--products", default=DEFAULT_PRODUCTS,
                   help=f"comma-separated, of {', '.join(p[0] for p in LLAMA3_8B)} "
                        f"(default {DEFAULT_PRODUCTS})")
    a = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench.gemm needs a CUDA GPU", file=sys.stderr)
        return 2
    bandwidth = measure_bandwidth("cuda", nbytes=2 << 30, iters=50)
    search = {int(r) for r in a.search.split(",") if r}
    wanted = set(a.products.split(","))
    rows = []
    for r in (int(r) for r in a.rows.split(",") if r):
        for name, n, k in LLAMA3_8B:
            if name in wanted:
                rows.append(measure(name, n, k, r, bandwidth, r in search))
                torch.cuda.empty_cache()  # the weight copies of the last product
    print(json.dumps({"bandwidth_bytes_per_s": bandwidth, "products": rows}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
