"""The fused elementwise kernels against their torch twins, and the twins against the model.

Without a GPU the kernels run in Triton's interpreter on CPU tensors (float32 and float16:
the interpreter rounds bfloat16 by truncation, so bfloat16 is checked on the GPU only).
"""

from __future__ import annotations

import pytest
import torch

from gpu_worker.kernels import fused
from gpu_worker.ops import TorchOps as ref
from tests.gpu_worker.kernel_helpers import rope_tables

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
DTYPES = [torch.float32, torch.float16]
EPS = 1e-5


def close(actual, expected):
    """float32: the RMSNorm sum order and SiLU's exp may differ by an ulp; else one ulp."""
    if actual.dtype == torch.float32:
        torch.testing.assert_close(actual, expected, rtol=1e-6, atol=1e-6)
    else:
        torch.testing.assert_close(actual, expected)  # about one ulp of float16/bfloat16


def qkv_views(qkv, num_heads, num_kv_heads, head_dim):
    """q, k, v as the model gets them: strided views of one [num_tokens, q+2kv] tensor."""
    q_size, kv_size = num_heads * head_dim, num_kv_heads * head_dim
    q, k, v = qkv.split([q_size, kv_size, kv_size], dim=-1)
    return q.view(-1, num_heads, head_dim), k.view(-1, num_kv_heads, head_dim), v


def fused_qkv(num_tokens, num_heads, num_kv_heads, head_dim, dtype, device="cpu"):
    width = (num_heads + 2 * num_kv_heads) * head_dim
    qkv = torch.randn(num_tokens, width, dtype=dtype, device=device)
    return qkv, qkv_views(qkv, num_heads, num_kv_heads, head_dim)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", [96, 576])
def test_rms_norm_matches_reference(dtype, hidden):
    x = torch.randn(5, hidden, dtype=dtype) * 3
    weight = torch.randn(hidden, dtype=dtype)
    close(fused.rms_norm(x, weight, EPS), ref.rms_norm(x, weight, EPS))


def test_rms_norm_reads_strided_rows():
    x = torch.randn(4, 640)[:, :576]  # row stride 640
    weight = torch.randn(576)
    y = fused.rms_norm(x, weight, EPS)
    assert y.is_contiguous()
    close(y, ref.rms_norm(x, weight, EPS))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", [96, 576])
def test_add_rms_norm_adds_the_residual_in_place(dtype, hidden):
    x = torch.randn(6, hidden, dtype=dtype)
    residual = torch.randn(6, hidden, dtype=dtype) * 4
    weight = torch.randn(hidden, dtype=dtype)
    x_before, expected_residual = x.clone(), residual + x  # the model's `hidden + out`
    y, new_residual = fused.add_rms_norm(x, residual, weight, EPS)
    assert new_residual is residual
    assert torch.equal(residual, expected_residual)
    assert torch.equal(x, x_before)
    close(y, ref.rms_norm(expected_residual, weight, EPS))


@pytest.mark.parametrize("dtype", DTYPES)
def test_norms_without_a_weight_give_the_normed_rows(dtype):
    """A folded model's norms carry no weight (it is in the next product's columns): the
    same as a weight of ones."""
    x, residual = torch.randn(3, 96, dtype=dtype), torch.randn(3, 96, dtype=dtype) * 4
    ones = torch.ones(96, dtype=dtype)
    assert torch.equal(ref.rms_norm(x, None, EPS), ref.rms_norm(x, ones, EPS))
    close(fused.rms_norm(x, None, EPS), ref.rms_norm(x, None, EPS))
    y, _ = fused.add_rms_norm(x, residual.clone(), None, EPS)
    close(y, ref.rms_norm(residual + x, None, EPS))


def caches(num_slots, num_kv_heads, head_dim, dtype, device="cpu", block_size=4):
    shape = (num_slots // block_size, block_size, num_kv_heads, head_dim)
    return (torch.full(shape, float("nan"), dtype=dtype, device=device),
            torch.full(shape, float("nan"), dtype=dtype, device=device))


def rope_write_reference(qkv, positions, cos, signed_sin, slots, num_heads, num_kv_heads,
                         head_dim, key_cache, value_cache):
    """TorchOps.rope_ on a copy, then an index copy of k and v into copies of the caches."""
    expected = qkv.clone()
    q, k, v = qkv_views(expected, num_heads, num_kv_heads, head_dim)
    ref.rope_(q, k, positions, cos, signed_sin)
    keys, values = key_cache.clone(), value_cache.clone()
    keys.view(-1, num_kv_heads, head_dim)[slots] = k
    values.view(-1, num_kv_heads, head_dim)[slots] = v.view(-1, num_kv_heads, head_dim)
    return expected, keys, values


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("num_heads", "num_kv_heads", "head_dim"), [(4, 2, 64), (3, 1, 96)])
def test_rope_write_kv_rotates_q_in_place_and_k_into_the_cache(
        dtype, num_heads, num_kv_heads, head_dim):
    qkv, (q, k, v) = fused_qkv(7, num_heads, num_kv_heads, head_dim, dtype)
    assert q.stride(0) != num_heads * head_dim  # a real strided view
    cos, signed_sin = rope_tables(64, head_dim, dtype)
    positions = torch.tensor([0, 5, 63, 3, 3, 42, 1])
    slots = torch.tensor([9, 0, 15, 4, 5, 2, 11])
    key_cache, value_cache = caches(16, num_kv_heads, head_dim, dtype)
    expected_qkv, expected_keys, expected_values = rope_write_reference(
        qkv, positions, cos, signed_sin, slots, num_heads, num_kv_heads, head_dim,
        key_cache, value_cache)
    k_before, v_before = k.clone(), v.clone()
    v3 = v.view(-1, num_kv_heads, head_dim)

    out_q = fused.rope_write_kv(q, k, v3, positions, cos, signed_sin, key_cache, value_cache,
                                slots)
    assert out_q is q
    q_expected = qkv_views(expected_qkv, num_heads, num_kv_heads, head_dim)[0]
    assert torch.equal(q, q_expected)  # every op rounds as torch's does: exact
    assert torch.equal(k, k_before) and torch.equal(v, v_before)  # k and v: read only
    # exact, and the slots no token maps to are left alone (still NaN)
    torch.testing.assert_close(key_cache, expected_keys, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(value_cache, expected_values, rtol=0, atol=0, equal_nan=True)
    assert not torch.equal(q[0], q[1])  # positions 0 and 5 differ


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("intermediate", [96, 1536])  # 1536: two column tiles, one masked
def test_silu_and_mul_matches_reference(dtype, intermediate):
    gate_up = torch.randn(5, 2 * intermediate, dtype=dtype) * 3
    out = fused.silu_and_mul(gate_up)
    assert out.shape == (5, intermediate)
    close(out, ref.silu_and_mul(gate_up))


def test_empty_batches_launch_nothing():
    x, weight = torch.empty(0, 96), torch.ones(96)
    assert fused.rms_norm(x, weight, EPS).shape == (0, 96)
    assert fused.add_rms_norm(x, x.clone(), weight, EPS)[0].shape == (0, 96)
    assert fused.silu_and_mul(torch.empty(0, 192)).shape == (0, 96)
    cos, sin = rope_tables(8, 64, torch.float32)
    q, k = torch.empty(0, 2, 64), torch.empty(0, 1, 64)
    key_cache, value_cache = caches(8, 1, 64, torch.float32)
    fused.rope_write_kv(q, k, k, torch.empty(0, dtype=torch.long), cos, sin, key_cache,
                        value_cache, torch.empty(0, dtype=torch.long))
    assert key_cache.isnan().all()


@pytest.mark.gpu
@cuda
def test_bf16_at_llama3_8b_widths_in_a_cuda_graph():
    dev, dtype, num_tokens = "cuda", torch.bfloat16, 37
    hidden, intermediate, num_heads, num_kv_heads, head_dim = 4096, 14336, 32, 8, 128
    weight = torch.randn(hidden, dtype=dtype, device=dev)
    x = torch.randn(num_tokens, hidden, dtype=dtype, device=dev)
    residual = torch.randn(num_tokens, hidden, dtype=dtype, device=dev)
    residual_start = residual.clone()
    gate_up = torch.randn(num_tokens, 2 * intermediate, dtype=dtype, device=dev)
    qkv, (q, k, v) = fused_qkv(num_tokens, num_heads, num_kv_heads, head_dim, dtype, dev)
    qkv_start = qkv.clone()
    cos, sin = rope_tables(8192, head_dim, dtype, dev)
    positions = torch.randint(0, 8192, (num_tokens,), device=dev)
    slots = torch.randperm(64, device=dev)[:num_tokens]
    key_cache, value_cache = caches(64, num_kv_heads, head_dim, dtype, dev, block_size=16)
    v3 = v.view(-1, num_kv_heads, head_dim)

    def step():
        residual.copy_(residual_start)
        qkv.copy_(qkv_start)
        fused.rope_write_kv(q, k, v3, positions, cos, sin, key_cache, value_cache, slots)
        return (fused.rms_norm(x, weight, EPS), *fused.add_rms_norm(x, residual, weight, EPS),
                fused.silu_and_mul(gate_up))

    def check(outs):
        normed, added_normed, new_residual, act = outs
        expected_residual = residual_start + x
        assert torch.equal(new_residual, expected_residual)
        close(normed, ref.rms_norm(x, weight, EPS))
        close(added_normed, ref.rms_norm(expected_residual, weight, EPS))
        close(act, ref.silu_and_mul(gate_up))
        expected, keys, values = rope_write_reference(
            qkv_start, positions, cos, sin, slots, num_heads, num_kv_heads, head_dim,
            key_cache, value_cache)
        q_size = num_heads * head_dim
        assert torch.equal(qkv[:, :q_size], expected[:, :q_size])
        assert torch.equal(key_cache.view(-1, num_kv_heads, head_dim)[slots],
                           keys.view(-1, num_kv_heads, head_dim)[slots])
        assert torch.equal(value_cache.view(-1, num_kv_heads, head_dim)[slots],
                           values.view(-1, num_kv_heads, head_dim)[slots])

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # compile and warm up outside the capture
        check(step())
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = step()
    for _ in range(2):  # replay on new inputs, written into the captured buffers
        for t in (x, residual_start, gate_up, qkv_start, weight):
            t.copy_(torch.randn_like(t))
        positions.copy_(torch.randint(0, 8192, (num_tokens,), device=dev))
        graph.replay()
        torch.cuda.synchronize()
        check(outs)
