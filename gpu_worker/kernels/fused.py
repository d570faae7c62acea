"""Fused elementwise kernels of the Llama-family decoder, each with its plain-torch twin.

RMSNorm (alone and after the residual add), RoPE with the KV cache write (position lookup,
rotation of q in place and of k into the cache) and SiLU-and-mul. Every kernel rounds where
the torch twin rounds, so the two agree bit-for-bit up to the order of the RMSNorm sum (and
to the last ulp of exp in SiLU). The norms and RoPE compile without FMA contraction, since
torch rounds each product (x^2, x * cos) before the add. The launchers allocate only
outputs, never sync with the host, and use fixed configs (no autotune): safe to capture in a
CUDA graph. Every tensor's last dim must be contiguous; rows may be strided (views into a
fused projection's output work).

Their torch twins, the reference the CPU runs, are ``gpu_worker.ops.TorchOps``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from gpu_worker.kernels import INTERPRETED

# ---------------------------------------------------------------- kernels

@triton.jit
def rsqrt(x, LIBDEVICE: tl.constexpr):
    if LIBDEVICE:
        return libdevice.rsqrt(x)
    else:
        return tl.rsqrt(x)


@triton.jit
def _exp(x, LIBDEVICE: tl.constexpr):
    if LIBDEVICE:
        return libdevice.exp(x)
    else:
        return tl.exp(x)


@triton.jit
def _normalize(x32, w_ptr, cols, mask, n_cols, eps, dtype: tl.constexpr,
               HAS_WEIGHT: tl.constexpr, LIBDEVICE: tl.constexpr):
    """``w * (x * rsqrt(mean(x^2) + eps)).to(dtype)`` (without HAS_WEIGHT: the normed x alone,
    its weight being in the next product's); masked lanes of x32 hold 0."""
    mean = tl.math.div_rn(tl.sum(x32 * x32, axis=0), tl.cast(n_cols, tl.float32))
    normed = (x32 * rsqrt(mean + eps, LIBDEVICE)).to(dtype)
    if HAS_WEIGHT:
        w = tl.load(w_ptr + cols, mask=mask, other=0.0)
        normed = (normed.to(tl.float32) * w.to(tl.float32)).to(dtype)  # one dtype rounding
    return normed


@triton.jit
def _rms_norm_kernel(
    x_ptr, w_ptr, y_ptr, x_stride, y_stride, n_cols, eps,
    BLOCK: tl.constexpr, HAS_WEIGHT: tl.constexpr, LIBDEVICE: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(x_ptr + row * x_stride + cols, mask=mask, other=0.0).to(tl.float32)
    y = _normalize(x, w_ptr, cols, mask, n_cols, eps, y_ptr.dtype.element_ty, HAS_WEIGHT,
                   LIBDEVICE)
    tl.store(y_ptr + row * y_stride + cols, y, mask=mask)


@triton.jit
def _add_rms_norm_kernel(
    x_ptr, res_ptr, w_ptr, y_ptr, x_stride, res_stride, y_stride, n_cols, eps,
    BLOCK: tl.constexpr, HAS_WEIGHT: tl.constexpr, LIBDEVICE: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(x_ptr + row * x_stride + cols, mask=mask, other=0.0)
    res_ptrs = res_ptr + row * res_stride + cols
    res = tl.load(res_ptrs, mask=mask, other=0.0)
    total = (x.to(tl.float32) + res.to(tl.float32)).to(x.dtype)  # torch's add in dtype
    tl.store(res_ptrs, total, mask=mask)
    y = _normalize(total.to(tl.float32), w_ptr, cols, mask, n_cols, eps,
                   y_ptr.dtype.element_ty, HAS_WEIGHT, LIBDEVICE)
    tl.store(y_ptr + row * y_stride + cols, y, mask=mask)


@triton.jit
def mul_add(a, b, c, d):
    """``a * b + c * d`` with each op rounded to a's dtype, as three torch ops would."""
    ab = (a.to(tl.float32) * b.to(tl.float32)).to(a.dtype)
    cd = (c.to(tl.float32) * d.to(tl.float32)).to(a.dtype)
    return (ab.to(tl.float32) + cd.to(tl.float32)).to(a.dtype)


@triton.jit
def _rotate_heads(
    base, head_stride, num_heads, cos1, cos2, sin1, sin2,
    HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
):
    heads = tl.arange(0, BLOCK_H)[:, None]
    dims = tl.arange(0, BLOCK_D)[None, :]
    mask = (heads < num_heads) & (dims < HALF)
    ptrs1 = base + heads * head_stride + dims
    x1 = tl.load(ptrs1, mask=mask, other=0.0)  # [BLOCK_H, BLOCK_D]
    x2 = tl.load(ptrs1 + HALF, mask=mask, other=0.0)
    tl.store(ptrs1, mul_add(x1, cos1, x2, sin1), mask=mask)
    tl.store(ptrs1 + HALF, mul_add(x2, cos2, x1, sin2), mask=mask)


@triton.jit
def _rope_write_kv_kernel(
    q_ptr, k_ptr, v_ptr, key_cache, value_cache, slot_ptr, pos_ptr, cos_ptr, sin_ptr,
    q_token_stride, q_head_stride, k_token_stride, v_token_stride, kv_head_stride,
    table_stride, num_heads, num_kv_heads,
    HALF: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr,
):
    """One token: rotate its query heads in place, its key heads into the cache at its
    slot, and copy its value heads there."""
    token = tl.program_id(0).to(tl.int64)
    pos = tl.load(pos_ptr + token).to(tl.int64)
    dims = tl.arange(0, BLOCK_D)
    mask = dims < HALF
    cos_row, sin_row = cos_ptr + pos * table_stride + dims, sin_ptr + pos * table_stride + dims
    cos1 = tl.load(cos_row, mask=mask, other=0.0)[None, :]
    cos2 = tl.load(cos_row + HALF, mask=mask, other=0.0)[None, :]
    sin1 = tl.load(sin_row, mask=mask, other=0.0)[None, :]
    sin2 = tl.load(sin_row + HALF, mask=mask, other=0.0)[None, :]
    _rotate_heads(q_ptr + token * q_token_stride, q_head_stride, num_heads,
                  cos1, cos2, sin1, sin2, HALF, BLOCK_HQ, BLOCK_D)

    slot = tl.load(slot_ptr + token).to(tl.int64)
    heads = tl.arange(0, BLOCK_HK)[:, None]
    kv_mask = (heads < num_kv_heads) & mask[None, :]
    src = heads * kv_head_stride + dims[None, :]
    dst = slot * (num_kv_heads * 2 * HALF) + heads * (2 * HALF) + dims[None, :]
    k_src = k_ptr + token * k_token_stride + src
    k1 = tl.load(k_src, mask=kv_mask, other=0.0)
    k2 = tl.load(k_src + HALF, mask=kv_mask, other=0.0)
    cache_dtype = key_cache.dtype.element_ty
    tl.store(key_cache + dst, mul_add(k1, cos1, k2, sin1).to(cache_dtype), mask=kv_mask)
    tl.store(key_cache + dst + HALF, mul_add(k2, cos2, k1, sin2).to(cache_dtype), mask=kv_mask)
    v_src = v_ptr + token * v_token_stride + src
    tl.store(value_cache + dst, tl.load(v_src, mask=kv_mask).to(cache_dtype), mask=kv_mask)
    tl.store(value_cache + dst + HALF, tl.load(v_src + HALF, mask=kv_mask).to(cache_dtype),
             mask=kv_mask)


@triton.jit
def silu_mul(gate, up, LIBDEVICE: tl.constexpr):
    """``silu(gate) * up`` in gate's dtype, rounded where torch rounds (F.silu, then *)."""
    g = gate.to(tl.float32)
    silu = tl.math.div_rn(g, 1.0 + _exp(-g, LIBDEVICE)).to(gate.dtype)  # F.silu's one rounding
    return (silu.to(tl.float32) * up.to(tl.float32)).to(gate.dtype)


@triton.jit
def _silu_and_mul_kernel(
    gate_up_ptr, out_ptr, in_stride, out_stride, n_cols,
    BLOCK: tl.constexpr, LIBDEVICE: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    gate_ptrs = gate_up_ptr + row * in_stride + cols
    gate = tl.load(gate_ptrs, mask=mask, other=0.0)
    up = tl.load(gate_ptrs + n_cols, mask=mask, other=0.0)
    tl.store(out_ptr + row * out_stride + cols, silu_mul(gate, up, LIBDEVICE), mask=mask)


# ---------------------------------------------------------------- launchers

# libdevice's exp and rsqrt are the ones torch's CUDA kernels call; the interpreter has none.
LIBDEVICE = not INTERPRETED


def _norm_config(n_cols: int) -> tuple[int, int]:
    block = triton.next_power_of_2(n_cols)
    return block, 4 if block < 2048 else 8 if block < 8192 else 16


def _check_rows(name: str, t: torch.Tensor, n_cols: int) -> None:
    if t.dim() != 2 or t.shape[1] != n_cols or t.stride(1) != 1:
        raise ValueError(f"{name}: want [num_tokens, {n_cols}] with unit column stride, "
                         f"got shape {tuple(t.shape)} strides {t.stride()}")


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """``TorchOps.rms_norm`` in one kernel: x [num_tokens, hidden], weight [hidden] (x's
    dtype; None: no weight, it is in the next product's)."""
    hidden = _check_weight(x, weight)
    _check_rows("x", x, hidden)
    y = torch.empty_like(x, memory_format=torch.contiguous_format)
    if x.shape[0]:
        block, num_warps = _norm_config(hidden)
        _rms_norm_kernel[(x.shape[0],)](
            x, y if weight is None else weight.contiguous(), y, x.stride(0), y.stride(0),
            hidden, eps, BLOCK=block, HAS_WEIGHT=weight is not None, LIBDEVICE=LIBDEVICE,
            num_warps=num_warps, enable_fp_fusion=False,
        )
    return y


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor | None, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``residual += x`` (rounded to dtype, in place), then ``rms_norm(residual)``.

    One read of x and residual, one write of each output. Returns (normed, residual),
    the residual being the argument itself, updated: callers that still need the old
    residual must pass a copy.
    """
    hidden = _check_weight(x, weight)
    _check_rows("x", x, hidden)
    _check_rows("residual", residual, hidden)
    if x.dtype != residual.dtype or x.shape != residual.shape:
        raise ValueError(f"x {x.dtype}{tuple(x.shape)} and residual {residual.dtype}"
                         f"{tuple(residual.shape)} must agree")
    y = torch.empty_like(x, memory_format=torch.contiguous_format)
    if x.shape[0]:
        block, num_warps = _norm_config(hidden)
        _add_rms_norm_kernel[(x.shape[0],)](
            x, residual, y if weight is None else weight.contiguous(), y,
            x.stride(0), residual.stride(0), y.stride(0), hidden, eps, BLOCK=block,
            HAS_WEIGHT=weight is not None, LIBDEVICE=LIBDEVICE, num_warps=num_warps,
            enable_fp_fusion=False,
        )
    return y, residual


def _check_weight(x: torch.Tensor, weight: torch.Tensor | None) -> int:
    """A norm's hidden size: the weight's length (x's dtype), or x's last dim without one."""
    if weight is None:
        return x.shape[-1]
    if weight.dtype != x.dtype:
        raise ValueError(f"weight dtype {weight.dtype} != x dtype {x.dtype}")
    return weight.shape[0]


def rope_write_kv(
    q: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    k: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    v: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    positions: torch.Tensor,  # [num_tokens] integer
    cos_table: torch.Tensor,  # [max_positions, head_dim]
    signed_sin_table: torch.Tensor,  # [max_positions, head_dim], first half negated
    key_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,  # [num_tokens] int64
) -> torch.Tensor:
    """RoPE and the cache write in one kernel: rotates q in place, stores the rotated k and
    v at each token's slot (k itself is left as it was). Returns q.

    ``x * cos + cat(x2, x1) * signed_sin``, computed as torch would: both products and the
    sum are each rounded to dtype, so the result equals ``TorchOps.rope_`` followed by an
    index copy into the cache, in every dtype. q, k and v may be strided views of a fused
    qkv output (k and v with the same head stride); only head_dim must be contiguous.
    """
    check_rope_write_kv(q, k, v, positions, cos_table, signed_sin_table, key_cache,
                        value_cache, slot_mapping)
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    if num_tokens:
        _rope_write_kv_kernel[(num_tokens,)](
            q, k, v, key_cache, value_cache, slot_mapping, positions, cos_table,
            signed_sin_table, q.stride(0), q.stride(1), k.stride(0), v.stride(0), k.stride(1),
            cos_table.stride(0), num_heads, num_kv_heads,
            HALF=head_dim // 2, BLOCK_D=triton.next_power_of_2(head_dim // 2),
            BLOCK_HQ=triton.next_power_of_2(num_heads),
            BLOCK_HK=triton.next_power_of_2(num_kv_heads), num_warps=4, enable_fp_fusion=False,
        )
    return q


def check_rope_write_kv(q, k, v, positions, cos_table, signed_sin_table, key_cache,
                        value_cache, slot_mapping) -> None:
    """What :func:`rope_write_kv` (and the decode attention that does its work itself)
    needs of its arguments; ValueError otherwise."""
    num_tokens, _, head_dim = q.shape
    num_kv_heads = k.shape[1]
    if k.shape != (num_tokens, num_kv_heads, head_dim) or v.shape != k.shape or head_dim % 2:
        raise ValueError(f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}: "
                         "want one even head_dim and matching k and v")
    if q.stride(2) != 1 or k.stride(2) != 1 or v.stride(2) != 1 or cos_table.stride(1) != 1:
        raise ValueError("q, k, v and the tables need a contiguous head_dim")
    if k.stride(1) != v.stride(1):
        raise ValueError("k and v need the same head stride")
    if positions.shape != (num_tokens,) or slot_mapping.shape != (num_tokens,):
        raise ValueError(f"positions and slot_mapping: want [{num_tokens}]")
    if not q.dtype == k.dtype == cos_table.dtype == signed_sin_table.dtype:
        raise ValueError("q, k and the tables must share a dtype")
    if cos_table.shape != signed_sin_table.shape or cos_table.stride() != signed_sin_table.stride():
        raise ValueError("cos and signed sin tables must have the same shape and strides")
    if not (key_cache.is_contiguous() and value_cache.is_contiguous()):
        raise ValueError("the key and value caches of a layer must be contiguous")
    if key_cache.shape[2:] != (num_kv_heads, head_dim) or value_cache.shape != key_cache.shape:
        raise ValueError(f"caches {tuple(key_cache.shape)} do not fit k {tuple(k.shape)}")


_SILU_BLOCK = 1024


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` of gate_up [num_tokens, 2 * intermediate] (gate first)."""
    intermediate = gate_up.shape[-1] // 2
    _check_rows("gate_up", gate_up, 2 * intermediate)
    out = gate_up.new_empty(gate_up.shape[0], intermediate)
    if gate_up.shape[0]:
        grid = (gate_up.shape[0], triton.cdiv(intermediate, _SILU_BLOCK))
        _silu_and_mul_kernel[grid](
            gate_up, out, gate_up.stride(0), out.stride(0), intermediate,
            BLOCK=_SILU_BLOCK, LIBDEVICE=LIBDEVICE, num_warps=4,
        )
    return out
