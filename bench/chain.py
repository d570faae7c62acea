"""``python -m bench.chain``: a decode layer's O, gate/up + SiLU and down products, as three
launches of :mod:`gpu_worker.kernels.linear` against one of :mod:`gpu_worker.kernels.chain`.

Over enough copies of the Llama-3-8B layer's weights that they do not fit in L2, in one
CUDA graph, as in a model. Checks first that both give the same residual. ``--search``
times a grid of chain configs. Prints JSON on the last line of stdout. CUDA only.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import sys

import torch

from bench.device import measure_bandwidth, tool_parser
from bench.gemm import graph_us
from gpu_worker.kernels import chain, num_sms, shared_memory
from gpu_worker.kernels import linear as lin

log = logging.getLogger("bench.chain")
HIDDEN, INTER, EPS = 4096, 14336, 1e-5
COPIES_BYTES = 2 << 30


def configs(search: bool) -> list[chain.ChainConfig]:
    base = chain.ChainConfig()
    out = [base]
    if search:
        best = dataclasses.replace(base, gated_stages=4)
        out += [dataclasses.replace(best, sleep_ns=ns) for ns in (0, 50, 200, 1000)]
        out += [dataclasses.replace(best, sleep_ns=200, gated_stages=st) for st in (5, 6)]
        out += [dataclasses.replace(best, sleep_ns=200, programs_per_sm=2, stages=3,
                                    gated_stages=st) for st in (3, 4)]
        out += [dataclasses.replace(best, sleep_ns=200, phases=p) for p in (1, 2, 4)]
    return out


def run(rows: int, bandwidth: float, search: bool) -> dict:
    dev, dtype = torch.device("cuda"), torch.bfloat16
    layer_bytes = (HIDDEN * HIDDEN + 2 * INTER * HIDDEN + HIDDEN * INTER) * 2
    copies = max(4, COPIES_BYTES // layer_bytes)
    gen = torch.Generator(device=dev).manual_seed(0)

    def weight(n, k):
        return torch.randn(n, k, device=dev, dtype=dtype, generator=gen) / 64

    layers = [(weight(HIDDEN, HIDDEN), weight(2 * INTER, HIDDEN), weight(HIDDEN, INTER))
              for _ in range(copies)]
    attn = torch.randn(rows, HIDDEN, device=dev, dtype=dtype, generator=gen)
    start = torch.randn(rows, HIDDEN, device=dev, dtype=dtype, generator=gen)
    residual = start.clone()
    counters, state = lin.new_counters(dev), chain.new_state(dev)

    def three(i):
        o, gu, down = layers[i]
        sums = lin.linear_add(attn, o, residual, counters=counters)
        act = lin.normed_gate_up_silu(residual, sums, None, EPS, gu, counters=counters)
        return lin.linear_add(act, down, residual, counters=counters)

    def chained(cfg):
        return lambda i: chain.mlp_chain(attn, *layers[i][:1], residual, *layers[i][1:], EPS,
                                         state=state, config=cfg)

    residual.copy_(start)
    want_sums = three(0)
    act0 = torch.randn(rows, INTER, device=dev, dtype=dtype, generator=gen)
    want = residual.clone()
    row = {"rows": rows, "floor_us": layer_bytes / bandwidth * 1e6,
           "three_us": graph_us(three, copies), "configs": []}
    sums0 = want_sums
    row["alone_us"] = {
        "o": graph_us(lambda i: lin.linear_add(attn, layers[i][0], residual,
                                               counters=counters), copies),
        "gate_up": graph_us(lambda i: lin.normed_gate_up_silu(
            residual, sums0, None, EPS, layers[i][1], counters=counters), copies),
        "down": graph_us(lambda i: lin.linear_add(act0, layers[i][2], residual,
                                                  counters=counters), copies)}
    log.info("alone: %s", row["alone_us"])
    for cfg in configs(search):
        try:
            residual.copy_(start)
            sums = chained(cfg)(0)
            same = bool(torch.equal(residual, want))
            diff = (residual.float() - want.float()).abs().max().item()
            sums_diff = (sums - want_sums).abs().max().item()
            us = graph_us(chained(cfg), copies)
        except Exception as exc:  # noqa: BLE001 - a config that does not fit or compile
            log.warning("%s: %s", cfg, str(exc)[:200])
            continue
        row["configs"].append({"config": vars(cfg), "us": us, "equal": same,
                               "max_diff": diff, "sums_diff": sums_diff})
        log.info("rows %d %s: %.1f us (three launches %.1f, floor %.1f) equal %s diff %.3g",
                 rows, cfg, us, row["three_us"], row["floor_us"], same, diff)
    return row


def main(argv: list[str] | None = None) -> int:
    p = tool_parser("bench.chain", __doc__)
    p.add_argument("--rows", default="32")
    p.add_argument("--search", action="store_true")
    a = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench.chain needs a CUDA GPU", file=sys.stderr)
        return 2
    bandwidth = measure_bandwidth("cuda", nbytes=2 << 30, iters=50)
    log.info("%d SMs, %d B shared", num_sms(torch.device("cuda")),
             shared_memory(torch.device("cuda")))
    out = [run(int(r), bandwidth, a.search) for r in a.rows.split(",")]
    print(json.dumps({"bandwidth_bytes_per_s": bandwidth, "runs": out}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
