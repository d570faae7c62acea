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


CONFIGS = [lin.LinearConfig(32, 64, 1), lin.LinearConfig(64, 64, 2),
           lin.LinearConfig(32, 32, 4, num_warps=2, num_stages=2)]


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"n{c.block_n}k{c.block_k}s{c.split_k}")
@pytest.mark.parametrize("rows", [1, 5])
def test_linear_matches_torch(cfg, rows):
    x = torch.randn(rows, 256, dtype=torch.float16, device=DEVICE) / 8
    w = torch.randn(80, 256, dtype=torch.float16, device=DEVICE) / 8  # a partial last tile
    check(lin.linear(x, w, config=cfg), reference(x, w))


def test_bias_and_strided_rows():
    big = torch.randn(3, 512, dtype=torch.float16, device=DEVICE) / 8
    x = big[:, 128:384]  # rows strided by 512, as a view into a wider output
    w = torch.randn(64, 256, dtype=torch.float16, device=DEVICE) / 8
    bias = torch.randn(64, dtype=torch.float16, device=DEVICE)
    check(lin.linear(x, w, bias, config=lin.LinearConfig(32, 64, 2)), reference(x, w, bias))


def test_split_k_reduction_is_deterministic_and_counters_reset():
    x = torch.randn(7, 512, dtype=torch.float16, device=DEVICE)
    w = torch.randn(96, 512, dtype=torch.float16, device=DEVICE) / 16
    cfg = lin.LinearConfig(32, 64, 4)
    first = lin.linear(x, w, config=cfg)
    for _ in range(3):
        assert torch.equal(lin.linear(x, w, config=cfg), first)
    assert not lin._locks(x.device).any()  # every tile's last program reset its counter


def test_rejects_shapes_it_cannot_take():
    x = torch.randn(2, 96, dtype=torch.float16, device=DEVICE)
    with pytest.raises(ValueError, match="multiple"):
        lin.linear(x, torch.randn(32, 96, dtype=torch.float16, device=DEVICE),
                   config=lin.LinearConfig(32, 64, 1))
    with pytest.raises(ValueError, match="does not fit"):
        lin.linear(x, torch.randn(32, 64, dtype=torch.float16, device=DEVICE))
    assert not lin.supports(x.float(), torch.randn(32, 96, device=DEVICE))
    assert not lin.supports(torch.randn(lin.MAX_ROWS + 1, 96, dtype=torch.float16,
                                        device=DEVICE),
                            torch.randn(32, 96, dtype=torch.float16, device=DEVICE))


def test_default_config_fills_the_machine():
    cfg = lin.default_config(32, 4096, 14336, num_sms=132)  # Llama-3-8B's down projection
    assert 14336 % (cfg.split_k * cfg.block_k) == 0
    assert (4096 // cfg.block_n) * cfg.split_k >= 132
    wide = lin.default_config(32, 28672, 4096, num_sms=132)  # gate/up: tiles enough already
    assert wide.split_k == 1


@cuda
@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336)])
@pytest.mark.parametrize("rows", [1, 32, 64])
def test_llama_shapes_in_bfloat16_under_a_graph(shape, rows):
    n, k = shape
    x = torch.randn(rows, k, dtype=torch.bfloat16, device="cuda") / 8
    w = torch.randn(n, k, dtype=torch.bfloat16, device="cuda") / 64
    lin.prepare(x.device)
    eager = lin.linear(x, w)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = lin.linear(x, w)
    for _ in range(3):
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, eager)  # same bits every replay
    torch.testing.assert_close(out.float(), F.linear(x, w).float(), rtol=2e-2, atol=2e-2)
