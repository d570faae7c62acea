"""bench.gemm's products compute what they are named for (run here in Triton's
interpreter, in float16; the timing itself needs a GPU)."""

from __future__ import annotations

import pytest
import torch

from bench import gemm
from gpu_worker.kernels import linear as lin


@pytest.mark.parametrize("name", ["o", "gate_up_silu", "o_add_norm", "normed_qkv",
                                  "normed_qkv_prescaled", "normed_gate_up_silu"])
def test_both_sides_of_a_product_agree(name):
    torch.manual_seed(0)
    n = 2 * 64 if name in gemm.GATED else 64
    x = torch.randn(3, 128, dtype=torch.float16) / 4
    weights = [torch.randn(n, 128, dtype=torch.float16) / 8 for _ in range(2)]
    cublas, tandem = gemm.products(name, x, weights, lin.new_counters(x.device))
    config = lin.LinearConfig(32, 64, 2)
    if name == "o_add_norm":  # both add into the same residual: compare what each adds
        residual = cublas(0)[1]
        before = residual.clone()
        sums = tandem(config)(1)
        added = residual - before
        torch.testing.assert_close(added.float(), (x @ weights[1].T).float(), rtol=2e-2,
                                   atol=2e-2)
        torch.testing.assert_close(sums.sum(0), residual.float().pow(2).sum(-1), rtol=1e-4,
                                   atol=0)
        return
    want, got = cublas(1), tandem(config)(1)
    scale = want.float().abs().max().item()
    torch.testing.assert_close(got.float(), want.float(), rtol=0, atol=0.02 * scale)
