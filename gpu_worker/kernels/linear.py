"""Skinny matrix products for decode steps: ``y = x @ w.T`` with few rows in ``x``.

A decode step multiplies a handful of token rows by every weight matrix once, so the
product is bound by reading the weights, and what matters is keeping every multiprocessor
streaming weight tiles from the first microsecond to the last. cuBLAS gets there with
split-K plus a separate reduce kernel (two launches, a ramp and a tail each). Here a
program takes ``block_n`` output columns and one of ``split_k`` slices of K, puts the
weight tile in the M slot of ``tl.dot`` (so the wide side feeds the tensor cores, the
token rows are the narrow N side), and the reduction of the slices happens inside the same
launch: every program stores its float32 partial sums, bumps a per-column-tile counter,
and the program that arrives last adds the slices up in slice order and writes the output.
The order is fixed, so the result does not depend on which program finishes last: two
runs of the same batch agree bit for bit (the async pipeline must equal the sync one).

The launcher never syncs with the host and allocates only its output and partial sums:
it is safe inside CUDA graphs. The counters are the caller's (:func:`new_counters`, made
before any capture): every launch leaves them at zero, and launches that share them must
not run at the same time (one stream). Its config is a fixed function of the shapes and the
device (no autotuning), so every process picks the same one.
"""

from __future__ import annotations

import dataclasses

import torch
import triton
import triton.language as tl

from gpu_worker.kernels import INTERPRETED, num_sms, shared_memory

MAX_ROWS = 64  # larger batches leave the weights' stream to cuBLAS
MAX_TILES = 1 << 16  # counters in a set: one per column tile of the widest product
SPARE_SHARED = 16 << 10  # shared memory left to the compiler beyond the pipeline stages


@dataclasses.dataclass(frozen=True)
class LinearConfig:
    block_n: int  # output columns per program
    block_k: int  # reduction depth per loop iteration
    split_k: int  # programs along K per column tile
    num_warps: int = 4
    num_stages: int = 4


def new_counters(device: torch.device) -> torch.Tensor:
    """A set of column-tile counters for :func:`linear` (zero; make it outside captures)."""
    return torch.zeros(MAX_TILES, dtype=torch.int32, device=device)


def supports(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> bool:
    """Whether :func:`linear` takes this product with its default config (else the caller
    uses ``F.linear``): half precision, at most MAX_ROWS rows, K contiguous and a multiple
    of its block, a contiguous weight and bias."""
    if not ((x.is_cuda or INTERPRETED) and x.dtype in (torch.bfloat16, torch.float16) and
            w.dtype == x.dtype and x.dim() == 2 and 0 < x.shape[0] <= MAX_ROWS and
            x.stride(1) == 1 and w.is_contiguous() and
            (bias is None or (bias.is_contiguous() and bias.shape == w.shape[:1]))):
        return False
    n, k = w.shape
    cfg = default_config(x.shape[0], n, k, num_sms(x.device), shared_memory(x.device))
    return x.shape[1] == k and k % (cfg.split_k * cfg.block_k) == 0


def default_config(num_rows: int, n: int, k: int, sms: int, shared: int) -> LinearConfig:
    """Narrow column tiles for narrow products; K split in two, four, ... until there are
    ~1.4 programs per multiprocessor; up to four pipeline stages, as many as ``shared``
    bytes of shared memory hold (``python -m bench.gemm --search`` chose these on an H200
    for the Llama-3-8B products at 32 rows)."""
    block_n = 32 if n <= 4096 else 64
    block_k = next((b for b in (128, 64, 32, 16) if k % b == 0), 16)
    tiles, split_k = triton.cdiv(n, block_n), 1
    while tiles * split_k * 10 < 14 * sms and k % (2 * split_k * block_k) == 0:
        split_k *= 2
    stage_bytes = (block_n + _block_m(num_rows)) * block_k * 2  # a weight and an x tile
    stages = max(2, min(4, (shared - SPARE_SHARED) // stage_bytes))
    return LinearConfig(block_n=block_n, block_k=block_k, split_k=split_k, num_stages=stages)


def _block_m(num_rows: int) -> int:
    return max(16, triton.next_power_of_2(num_rows))


def linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None, *,
           counters: torch.Tensor, config: LinearConfig | None = None) -> torch.Tensor:
    """``x @ w.T (+ bias)``: x [M, K], rows may be strided, K contiguous; w [N, K]
    contiguous; M <= MAX_ROWS; ``counters`` from :func:`new_counters`, used by one stream
    only. Returns [M, N] in x's dtype."""
    m, width = x.shape
    n, k = w.shape
    if width != k or x.stride(1) != 1:
        raise ValueError(f"x {tuple(x.shape)} does not fit w {tuple(w.shape)}")
    cfg = config or default_config(m, n, k, num_sms(x.device), shared_memory(x.device))
    if k % (cfg.split_k * cfg.block_k):
        raise ValueError(f"K={k} is not a multiple of split_k x block_k in {cfg}")
    y = x.new_empty(m, n)
    partial = y  # unused with one slice
    if cfg.split_k > 1:
        partial = torch.empty(cfg.split_k, m, n, dtype=torch.float32, device=x.device)
    grid = (triton.cdiv(n, cfg.block_n), cfg.split_k)
    if grid[0] > counters.numel():
        raise ValueError(f"N={n} needs more than {counters.numel()} column-tile counters")
    _linear_kernel[grid](
        x, w, y, bias if bias is not None else y, partial, counters,
        m, n, x.stride(0), y.stride(0), K=k,
        BLOCK_M=_block_m(m), BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, SPLIT_K=cfg.split_k,
        HAS_BIAS=bias is not None, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return y


@triton.jit
def _linear_kernel(
    x_ptr, w_ptr, y_ptr, bias_ptr, partial_ptr, lock_ptr,
    M, N, stride_xm, stride_ym, K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr, HAS_BIAS: tl.constexpr,
):
    """One (column tile, K slice): acc[n, m] = sum_k w[n, k] * x[m, k] over the slice."""
    tile, split = tl.program_id(0), tl.program_id(1)
    offs_n = tile * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_k = tl.arange(0, BLOCK_K)
    n_ok, m_ok = offs_n < N, offs_m < M
    k_per_split: tl.constexpr = K // SPLIT_K  # K is static: the loop's trip count is known
    w_ptrs = w_ptr + offs_n[:, None].to(tl.int64) * K + (split * k_per_split + offs_k)[None, :]
    x_ptrs = x_ptr + offs_m[None, :] * stride_xm + (split * k_per_split + offs_k)[:, None]
    acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    for _ in range(0, k_per_split, BLOCK_K):
        w = tl.load(w_ptrs, mask=n_ok[:, None], other=0.0)  # [BLOCK_N, BLOCK_K]
        xt = tl.load(x_ptrs, mask=m_ok[None, :], other=0.0)  # [BLOCK_K, BLOCK_M]
        acc = tl.dot(w, xt, acc)
        w_ptrs += BLOCK_K
        x_ptrs += BLOCK_K

    y_offs = offs_m[None, :] * stride_ym + offs_n[:, None]  # [BLOCK_N, BLOCK_M]
    out_ok = n_ok[:, None] & m_ok[None, :]
    if SPLIT_K > 1:
        # store this slice, then the last of the tile's programs reduces in slice order
        part_offs = offs_m[None, :] * N + offs_n[:, None]
        tl.store(partial_ptr + split * M * N + part_offs, acc, mask=out_ok)
        tl.debug_barrier()
        arrived = tl.atomic_add(lock_ptr + tile, 1, sem="acq_rel", scope="gpu")
        if arrived == SPLIT_K - 1:
            acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
            for s in range(SPLIT_K):
                acc += tl.load(partial_ptr + s * M * N + part_offs, mask=out_ok, other=0.0,
                               cache_modifier=".cg")
            _store_output(y_ptr, bias_ptr, acc, y_offs, offs_n, out_ok, n_ok, HAS_BIAS)
            tl.atomic_xchg(lock_ptr + tile, 0, sem="relaxed", scope="gpu")  # next launch
    else:
        _store_output(y_ptr, bias_ptr, acc, y_offs, offs_n, out_ok, n_ok, HAS_BIAS)


@triton.jit
def _store_output(y_ptr, bias_ptr, acc, y_offs, offs_n, out_ok, n_ok, HAS_BIAS: tl.constexpr):
    if HAS_BIAS:  # added in float32 before the one rounding, as cuBLAS's epilogue does
        acc += tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[:, None]
    tl.store(y_ptr + y_offs, acc.to(y_ptr.dtype.element_ty), mask=out_ok)
