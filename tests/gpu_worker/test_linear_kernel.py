"""The skinny split-K matrix product against torch: values, bias, determinism, graphs.

Without a GPU the kernel runs in Triton's interpreter (float16; the interpreter rounds
bfloat16 by truncation, so bfloat16 is checked on the GPU). Its programs then run one
after another, so the last-arriving reduction is checked for its arithmetic, and on the
GPU for its synchronisation.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from gpu_worker.kernels import fused
from gpu_worker.kernels import linear as lin

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def reference(x, w, bias=None):
    y = x.float() @ w.float().T
    return y if bias is None else y + bias.float()


def check(actual, expected):
    assert actual.dtype != torch.float32
    torch.testing.assert_close(actual.float(), expected, rtol=2e-2, atol=2e-2)


def half(*shape, scale=1.0, device=DEVICE):
    return torch.randn(*shape, dtype=torch.float16, device=device) * scale


CONFIGS = [lin.LinearConfig(32, 64, 1), lin.LinearConfig(64, 64, 2),
           lin.LinearConfig(32, 32, 4, num_warps=2, num_stages=2),
           lin.LinearConfig(32, 256, 1, num_stages=3)]  # WHOLE_K's deep steps


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"n{c.block_n}k{c.block_k}s{c.split_k}")
@pytest.mark.parametrize("rows", [1, 5])
def test_linear_matches_torch(cfg, rows):
    x, w = half(rows, 256, scale=1 / 8), half(80, 256, scale=1 / 8)  # a partial last tile
    counters = lin.new_counters(x.device)
    check(lin.linear(x, w, counters=counters, config=cfg), reference(x, w))
    assert not counters.any()  # every tile's last program reset its counter


def test_bias_and_strided_rows():
    x = half(3, 512, scale=1 / 8)[:, 128:384]  # rows strided by 512: a view into an output
    w, bias = half(64, 256, scale=1 / 8), half(64)
    y = lin.linear(x, w, bias, counters=lin.new_counters(x.device),
                   config=lin.LinearConfig(32, 64, 2))
    check(y, reference(x, w, bias))


def test_split_k_reduction_is_deterministic():
    x, w = half(7, 512), half(96, 512, scale=1 / 16)
    cfg, counters = lin.LinearConfig(32, 64, 4), lin.new_counters(x.device)
    first = lin.linear(x, w, counters=counters, config=cfg)
    for _ in range(3):
        assert torch.equal(lin.linear(x, w, counters=counters, config=cfg), first)


def test_rejects_shapes_it_cannot_take():
    x, counters = half(2, 96), lin.new_counters(torch.device(DEVICE))
    with pytest.raises(ValueError, match="multiple"):
        lin.linear(x, half(32, 96), counters=counters, config=lin.LinearConfig(32, 64, 1))
    with pytest.raises(ValueError, match="does not fit"):
        lin.linear(x, half(32, 64), counters=counters)
    w = half(32, 96)
    assert lin.supports(x, w)
    assert not lin.supports(x.float(), w.float())
    assert not lin.supports(half(lin.MAX_ROWS + 1, 96), w)
    assert not lin.supports(half(96, 2).T, w)  # K not contiguous
    assert not lin.supports(x, w, half(64, 2)[:, 0])  # a strided bias
    assert not lin.supports(half(2, 100), half(32, 100))  # K not a multiple of 16


def test_default_config_fills_the_machine_within_its_shared_memory():
    hopper = 227 << 10  # the split-K rule (as up to 16 rows) for Llama-3-8B's down projection
    cfg = lin.default_config(32, 4096, 14336, 132, hopper, whole_k=False)
    assert 14336 % (cfg.split_k * cfg.block_k) == 0
    assert (4096 // cfg.block_n) * cfg.split_k >= 132
    assert cfg.num_stages == 4
    wide = lin.default_config(32, 28672, 4096, 132, hopper, whole_k=False)  # tiles enough
    assert wide.split_k == 1
    small = lin.default_config(64, 28672, 4096, 84, 99 << 10, whole_k=False)  # 100 KB a block
    assert (64 + 64) * 128 * 2 * small.num_stages <= (99 << 10) - lin.SPARE_SHARED


def test_plain_products_of_many_rows_take_whole_k_in_deep_steps():
    hopper = 227 << 10
    down = lin.default_config(32, 4096, 14336, 132, hopper)  # Llama-3-8B
    assert (down.split_k, down.block_k, down.num_stages) == (1, lin.WHOLE_K_DEPTH, 5)
    assert lin.default_config(32, 6144, 4096, 132, hopper).num_stages == 3  # QKV: wider tiles
    assert lin.default_config(16, 4096, 14336, 132, hopper).split_k > 1  # few rows: split-K
    small = lin.default_config(32, 4096, 4096, 84, 99 << 10)  # a 100 KB-per-block GPU
    assert (32 + 32) * 256 * 2 * small.num_stages <= (99 << 10) - lin.SPARE_SHARED
    assert lin.default_config(32, 1536, 576, 132, hopper).block_k < 256  # K=576: split-K rule
    assert lin.default_config(32, 28672, 4096, 132, hopper, gated=True).block_k == 64


def test_gated_default_config_is_the_searched_one_and_fits_smaller_gpus():
    hopper = 227 << 10
    for rows, block_k in ((1, 128), (32, 64)):  # the H200 search's best at 1 and 32 rows
        cfg = lin.default_config(rows, 28672, 4096, 132, hopper, gated=True)
        assert cfg == lin.LinearConfig(128, block_k, 1, num_warps=8, num_stages=3)
    small = lin.default_config(1, 28672, 4096, 84, 99 << 10, gated=True)
    assert (128 + 16) * small.block_k * 2 * small.num_stages <= (99 << 10) - lin.SPARE_SHARED
    narrow = lin.default_config(8, 2 * 1536, 576, 132, hopper, gated=True)  # SmolLM2-135M
    assert 576 % (narrow.split_k * narrow.block_k) == 0
    assert lin.default_config(8, 2 * 512, 4096, 132, hopper, gated=True).split_k == 32  # 8 tiles


def test_triton_ops_take_narrow_decode_products_and_leave_the_rest_to_torch(monkeypatch):
    from gpu_worker.ops import TritonOps

    ops, taken = TritonOps(torch.device(DEVICE)), []
    kernel = lin.linear
    monkeypatch.setattr(lin, "linear", lambda *a, **kw: taken.append(1) or kernel(*a, **kw))
    w = half(64, 128, scale=1 / 8)
    for x, weight, expect in [(half(4, 128), w, 1), (half(33, 128), w, 0),  # rows
                              (half(4, 128), half(4097, 128), 0),  # wide N: cuBLAS
                              (half(4, 100), half(64, 100), 0),  # K not a multiple of 16
                              (half(4, 128).float(), w.float(), 0)]:  # float32
        taken.clear()
        check(ops.linear(x, weight).to(torch.float16), reference(x, weight))
        assert len(taken) == expect


@pytest.mark.parametrize("whole_k", [False, True])
def test_triton_ops_whole_k_picks_the_plain_products_config(monkeypatch, whole_k):
    """TritonOps(whole_k=...) decides the config of the plain products it launches: from
    17 rows on, one K slice in 256-deep steps, or split-K; the same product either way."""
    from gpu_worker.ops import TritonOps

    ops, configs = TritonOps(torch.device(DEVICE), whole_k=whole_k), []
    kernel = lin.linear
    monkeypatch.setattr(lin, "linear", lambda *a, **kw: configs.append(kw["config"]) or
                        kernel(*a, **kw))
    x, w = half(24, 512, scale=1 / 8), half(64, 512, scale=1 / 8)
    check(ops.linear(x, w), reference(x, w))
    if whole_k:
        assert (configs[0].split_k, configs[0].block_k) == (1, lin.WHOLE_K_DEPTH)
    else:
        assert configs[0].block_k < lin.WHOLE_K_DEPTH


def gated_reference(x, gate_up):
    """silu(gate) * up as the unfused pair computes it: each product rounded to x's dtype."""
    from gpu_worker.ops import TorchOps

    return TorchOps.silu_and_mul(reference(x, gate_up).to(x.dtype)).float()


# gated tiles take half their rows from each half: up to 128 from each
GATED_CONFIGS = CONFIGS + [lin.LinearConfig(128, 64, 2, num_warps=8, num_stages=3),
                           lin.LinearConfig(256, 64, 1, num_warps=8, num_stages=3)]


@pytest.mark.parametrize("cfg", GATED_CONFIGS,
                         ids=lambda c: f"n{c.block_n}k{c.block_k}s{c.split_k}")
@pytest.mark.parametrize("rows", [1, 5])
def test_gate_up_silu_matches_the_unfused_pair(cfg, rows):
    x, gate_up = half(rows, 256, scale=1 / 4), half(2 * 72, 256, scale=1 / 4)  # partial tile
    counters = lin.new_counters(x.device)
    got = lin.gate_up_silu(x, gate_up, counters=counters, config=cfg)
    assert got.shape == (rows, 72)
    check(got, gated_reference(x, gate_up))
    assert not counters.any()
    # gate and up really are the two halves: swapping them changes the answer
    swapped = torch.cat([gate_up[72:], gate_up[:72]])
    assert (got.float() - gated_reference(x, swapped)).abs().max() > 0.1


def test_gate_up_silu_with_the_default_config_and_its_limits():
    x, gate_up = half(3, 128, scale=1 / 4), half(2 * 64, 128, scale=1 / 4)
    assert lin.supports(x, gate_up, gated=True)
    got = lin.gate_up_silu(x, gate_up, counters=lin.new_counters(x.device))
    check(got, gated_reference(x, gate_up))
    assert not lin.supports(x, half(63, 128), gated=True)  # an odd number of rows
    assert not lin.supports(x, gate_up, half(128), gated=True)  # a bias
    with pytest.raises(ValueError, match="even"):
        lin.gate_up_silu(x, gate_up, counters=lin.new_counters(x.device),
                         config=lin.LinearConfig(15, 64, 1))


@pytest.mark.parametrize("fuse", [False, True])
def test_triton_ops_gate_up_silu_fuses_only_when_asked(monkeypatch, fuse):
    from gpu_worker.ops import TritonOps

    ops, taken = TritonOps(torch.device(DEVICE), fuse_silu=fuse), []
    kernel = lin.gate_up_silu
    monkeypatch.setattr(lin, "gate_up_silu",
                        lambda *a, **kw: taken.append(1) or kernel(*a, **kw))
    gate_up = half(128, 128, scale=1 / 4)
    for x, expect in [(half(4, 128, scale=1 / 4), int(fuse)), (half(33, 128), 0)]:
        taken.clear()
        check(ops.gate_up_silu(x, gate_up), gated_reference(x, gate_up))
        assert len(taken) == expect


@cuda
@pytest.mark.gpu
@pytest.mark.parametrize("rows", [1, 32])
def test_gpu_gate_up_silu_llama_shape_under_a_graph(rows):
    x = torch.randn(rows, 4096, dtype=torch.bfloat16, device="cuda") / 8
    gate_up = torch.randn(28672, 4096, dtype=torch.bfloat16, device="cuda") / 64
    counters = lin.new_counters(x.device)
    eager = lin.gate_up_silu(x, gate_up, counters=counters)
    unfused = fused.silu_and_mul(lin.linear(x, gate_up, counters=counters))
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = lin.gate_up_silu(x, gate_up, counters=counters)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, eager)
    assert not counters.any()
    torch.testing.assert_close(out.float(), unfused.float(), rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(out.float(), gated_reference(x, gate_up), rtol=2e-2, atol=2e-2)


@cuda
@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336)])
@pytest.mark.parametrize("rows", [1, 32, 64])
def test_llama_shapes_in_bfloat16_under_a_graph(shape, rows):
    n, k = shape
    x = torch.randn(rows, k, dtype=torch.bfloat16, device="cuda") / 8
    w = torch.randn(n, k, dtype=torch.bfloat16, device="cuda") / 64
    counters = lin.new_counters(x.device)
    eager = lin.linear(x, w, counters=counters)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = lin.linear(x, w, counters=counters)
    for _ in range(3):
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, eager)  # same bits every replay
        assert not counters.any()
    torch.testing.assert_close(out.float(), F.linear(x, w).float(), rtol=2e-2, atol=2e-2)


# --- a residual add + RMSNorm folded into the products on either side of it


def normed_reference(residual, norm_weight, eps=1e-5):
    from gpu_worker.ops import TorchOps

    return TorchOps.rms_norm(residual, norm_weight, eps)


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"n{c.block_n}k{c.block_k}s{c.split_k}")
@pytest.mark.parametrize("rows", [1, 5])
def test_linear_add_updates_the_residual_and_leaves_its_sums_of_squares(cfg, rows):
    x, w = half(rows, 256, scale=1 / 4), half(80, 256, scale=1 / 4)  # a partial last tile
    residual = half(rows, 80)
    expected = residual + lin.linear(x, w, counters=lin.new_counters(x.device), config=cfg)
    counters = lin.new_counters(x.device)
    sums = lin.linear_add(x, w, residual, counters=counters, config=cfg)
    assert torch.equal(residual, expected)  # the same product, the same rounded add
    assert sums.shape == (-(-80 // cfg.block_n), rows) and sums.dtype == torch.float32
    torch.testing.assert_close(sums.sum(0), residual.float().pow(2).sum(-1), rtol=1e-5, atol=0)
    first = residual.float().pow(2)[:, :cfg.block_n].sum(-1)  # the first tile's own columns
    torch.testing.assert_close(sums[0], first, rtol=1e-5, atol=0)
    assert not counters.any()


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"n{c.block_n}k{c.block_k}s{c.split_k}")
@pytest.mark.parametrize("gated", [False, True], ids=["linear", "gate-up-silu"])
@pytest.mark.parametrize("prescaled", [False, True], ids=["scales-x", "prescaled-w"])
def test_normed_products_finish_the_norm(cfg, gated, prescaled):
    """linear_add then a normed product: the unfused residual add, norm and product, to a
    few half-precision ulps (the norm's scale is applied after the product, not before).
    prescaled: the norm's weight is in the product's weight already, x goes in unscaled."""
    counters = lin.new_counters(torch.device(DEVICE))
    x, w_o = half(5, 128, scale=1 / 4), half(256, 128, scale=1 / 4)
    residual, norm_weight = half(5, 256), half(256, scale=1 / 2) + 1
    w, bias = half(2 * 72 if gated else 72, 256, scale=1 / 8), None if gated else half(72)
    unfused_residual = residual + lin.linear(x, w_o, counters=counters)
    h = normed_reference(unfused_residual, norm_weight)
    want = gated_reference(h, w) if gated else reference(h, w, bias)
    sums = lin.linear_add(x, w_o, residual, counters=counters)
    scale, w_in = norm_weight, w
    if prescaled:
        scale, w_in = None, w * norm_weight

    def product():
        if gated:
            return lin.normed_gate_up_silu(residual, sums, scale, 1e-5, w_in,
                                           counters=counters, config=cfg)
        return lin.normed_linear(residual, sums, scale, 1e-5, w_in, bias, counters=counters,
                                 config=cfg)

    got = product()
    check(got, want)
    assert torch.equal(got, product())  # deterministic: async must equal sync
    assert not counters.any()


def test_folded_norm_rejects_what_does_not_fit():
    counters = lin.new_counters(torch.device(DEVICE))
    x, w = half(3, 128), half(64, 128)
    with pytest.raises(ValueError, match="residual"):
        lin.linear_add(x, w, half(3, 32), counters=counters)
    with pytest.raises(ValueError, match="norm sums"):
        lin.normed_linear(half(3, 64), torch.zeros(2, 4), half(64), 1e-5, half(32, 64),
                          counters=counters)


@cuda
@pytest.mark.gpu
@pytest.mark.parametrize("rows", [1, 32])
def test_gpu_folded_norm_llama_shape_under_a_graph(rows):
    """The O product with the residual add, then QKV and gate/up finishing the norm, in
    bfloat16 under a CUDA graph: as eager, and near the unfused path."""
    dev, counters = torch.device("cuda"), lin.new_counters(torch.device("cuda"))

    def bf16(*shape, scale):
        return torch.randn(*shape, dtype=torch.bfloat16, device=dev) * scale

    attn, w_o, residual = bf16(rows, 4096, scale=1), bf16(4096, 4096, scale=1 / 64), \
        bf16(rows, 4096, scale=1)
    norm_weight, w_qkv, gate_up = bf16(4096, scale=0.1) + 1, bf16(6144, 4096, scale=1 / 64), \
        bf16(28672, 4096, scale=1 / 64)

    def step(res):
        sums = lin.linear_add(attn, w_o, res, counters=counters)
        return (lin.normed_linear(res, sums, norm_weight, 1e-5, w_qkv, counters=counters),
                lin.normed_gate_up_silu(res, sums, norm_weight, 1e-5, gate_up,
                                        counters=counters))

    eager = step(residual.clone())
    graphed_residual = residual.clone()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step(graphed_residual)
    graphed_residual.copy_(residual)  # the capture ran nothing; replay from the same state
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out[0], eager[0]) and torch.equal(out[1], eager[1])
    assert not counters.any()
    h = fused.rms_norm(residual + lin.linear(attn, w_o, counters=counters), norm_weight, 1e-5)
    for got, want in ((eager[0], reference(h, w_qkv)), (eager[1], gated_reference(h, gate_up))):
        scale = want.abs().max().item()  # a few ulps of the largest: the norm scales later
        torch.testing.assert_close(got.float(), want, rtol=0, atol=0.02 * scale)
