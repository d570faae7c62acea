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

:func:`gate_up_silu` is the MLP's first half in the same launch: ``silu(x @ gate.T) * (x @
up.T)`` from the fused ``[gate; up]`` weight. Each program streams a tile of gate rows and
the matching tile of up rows (64 of each by default: with the plain product's 32 of
each it ran 1.3-1.5x slower on an H200), and its epilogue rounds both as the product's
output would be rounded, then applies SiLU-and-mul as
:func:`gpu_worker.kernels.fused.silu_and_mul` does: one launch, and no gate/up activations
written and read back.

:func:`linear_add`, :func:`normed_linear` and :func:`normed_gate_up_silu` fold a residual add
+ RMSNorm into the products on either side of it, two launches fewer a layer: the product
before the norm adds its output into the residual in its epilogue and stores each column
tile's float32 sums of squares of the new residual; the product after it scales each row of
its float32 sums by ``rsqrt(mean + eps)`` from those tile sums, before the one rounding
(``gpu_worker.ops.FOLD_NORMS``). The norm's weight is best already in that product's
weight (the model folds it in at load: x then goes into the product as it is); given
separately, x is scaled by it tile by tile in the loop, which on an H200 cost the QKV
product at 32 rows 25.0 us against 17.7.

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
from gpu_worker.kernels.fused import LIBDEVICE, rsqrt, silu_mul

MAX_ROWS = 64  # larger batches leave the weights' stream to cuBLAS
DTYPES = (torch.bfloat16, torch.float16)  # what the kernel takes
MAX_TILES = 1 << 16  # counters in a set: one per column tile of the widest product
SPARE_SHARED = 16 << 10  # shared memory left to the compiler beyond the pipeline stages
# Plain products of more than 16 rows whose K is a multiple of WHOLE_K_DEPTH: no split-K (no
# partial sums to add at the tail of the launch), K steps that deep, and as many stages as
# WHOLE_K_STAGE_BYTES hold. H200, Llama-3-8B shape, 2026-12-02: at 32 rows O adding into the
# residual 11.7-12.0 us against 12.2 split in two, down 32.6 against 34.2, QKV finishing the
# norm 17.0 against 17.4; whole steps (`bench.sweep --whole-k off|on`, A B A B) batch 32 at
# 1,024 5.57 -> 5.43 ms, at 4,096 8.45 -> 8.30; batch 8 lost 1% (4.59 -> 4.65), batch 1
# level, so up to 16 rows the split-K rule stays. The gated gate/up keeps its own config.
WHOLE_K = True
WHOLE_K_DEPTH = 256
WHOLE_K_STAGE_BYTES = 160 << 10  # counted as stages x stage bytes (Triton buffers one fewer)


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


def supports(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None,
             gated: bool = False, config: LinearConfig | None = None) -> bool:
    """Whether :func:`linear` (``gated``: :func:`gate_up_silu`) takes this product with
    ``config`` (None: its default config; else the caller uses ``F.linear``): half
    precision, at most MAX_ROWS rows, K contiguous and a multiple of its block, a
    contiguous weight and bias; gated: an even number of weight rows, an even ``block_n``,
    and no bias."""
    if not ((x.is_cuda or INTERPRETED) and x.dtype in DTYPES and
            w.dtype == x.dtype and x.dim() == 2 and 0 < x.shape[0] <= MAX_ROWS and
            x.stride(1) == 1 and w.is_contiguous() and
            (bias is None or (bias.is_contiguous() and bias.shape == w.shape[:1]))):
        return False
    n, k = w.shape
    cfg = config or default_config(x.shape[0], n, k, num_sms(x.device),
                                   shared_memory(x.device), gated)
    if gated and (bias is not None or n % 2 or cfg.block_n % 2):
        return False
    return x.shape[1] == k and k % (cfg.split_k * cfg.block_k) == 0


def default_config(num_rows: int, n: int, k: int, sms: int, shared: int,
                   gated: bool = False, whole_k: bool | None = None) -> LinearConfig:
    """Narrow column tiles for narrow products; K split in two, four, ... until there are
    ~1.4 programs per multiprocessor; up to four pipeline stages, as many as ``shared``
    bytes of shared memory hold (``python -m bench.gemm --search`` chose these on an H200
    for the Llama-3-8B products at 32 rows). ``gated`` (:func:`gate_up_silu`): tiles of 64
    rows from each half, K split only until every multiprocessor has a program, 8 warps,
    3 stages, and 128-deep K steps for up to 16 rows, else 64 (the search's best at 1 and
    32 rows on an H200: 59.9 and 61.3 us for the Llama-3-8B gate/up, where the tiles of
    the plain product took 76.7 and 90.9). ``whole_k`` (None: ``WHOLE_K``): plain
    products of more than 16 rows in deep K steps without split-K."""
    if gated:  # (block_n, depths, programs x10 to reach, stages at most, warps)
        block_n, depths, target, most, warps = \
            128, (128, 64) if _block_m(num_rows) <= 16 else (64,), 10 * sms, 3, 8
    else:
        block_n, depths, target, most, warps = 32 if n <= 4096 else 64, (128, 64), 14 * sms, 4, 4
        if (WHOLE_K if whole_k is None else whole_k) and num_rows > 16 and \
                k % WHOLE_K_DEPTH == 0:
            stage_bytes = (block_n + _block_m(num_rows)) * WHOLE_K_DEPTH * 2
            stages = min(WHOLE_K_STAGE_BYTES, shared - SPARE_SHARED) // stage_bytes
            return LinearConfig(block_n=block_n, block_k=WHOLE_K_DEPTH, split_k=1,
                                num_warps=warps, num_stages=max(2, min(6, stages)))
    block_k = next((b for b in (*depths, 32, 16) if k % b == 0), 16)
    tiles, split_k = triton.cdiv(n, block_n), 1
    while tiles * split_k * 10 < target and k % (2 * split_k * block_k) == 0:
        split_k *= 2
    stage_bytes = (block_n + _block_m(num_rows)) * block_k * 2  # a weight and an x tile
    stages = max(2, min(most, (shared - SPARE_SHARED) // stage_bytes))  # 2 on ~100 KB cards
    return LinearConfig(block_n=block_n, block_k=block_k, split_k=split_k, num_warps=warps,
                        num_stages=stages)


def _block_m(num_rows: int) -> int:
    return max(16, triton.next_power_of_2(num_rows))


def linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None, *,
           counters: torch.Tensor, config: LinearConfig | None = None) -> torch.Tensor:
    """``x @ w.T (+ bias)``: x [M, K], rows may be strided, K contiguous; w [N, K]
    contiguous; M <= MAX_ROWS; ``counters`` from :func:`new_counters`, used by one stream
    only. Returns [M, N] in x's dtype."""
    return _launch(x, w, bias, counters, config, gated=False)


def gate_up_silu(x: torch.Tensor, gate_up: torch.Tensor, *, counters: torch.Tensor,
                 config: LinearConfig | None = None) -> torch.Tensor:
    """``silu(x @ gate.T) * (x @ up.T)`` where ``gate_up`` [2 I, K] is gate's rows then
    up's; each product is rounded to x's dtype before SiLU-and-mul, as the unfused pair
    rounds. Each program takes half its ``config.block_n`` rows from each half (default:
    :func:`default_config` with ``gated``).
    Returns [M, I] in x's dtype; same conditions as :func:`linear`, no bias."""
    return _launch(x, gate_up, None, counters, config, gated=True)


def linear_add(x: torch.Tensor, w: torch.Tensor, residual: torch.Tensor, *,
               counters: torch.Tensor, config: LinearConfig | None = None) -> torch.Tensor:
    """``residual += x @ w.T`` in place (the product rounded to x's dtype, then the add
    rounded, as ``F.linear`` then ``add_`` round), the first half of a residual add +
    RMSNorm folded into the product: returns each column tile's float32 sums of squares of
    the new residual, [tiles, M], for :func:`normed_linear` and :func:`normed_gate_up_silu`
    to finish the norm with. residual [M, N], x's dtype, unit column stride."""
    m, n = x.shape[0], w.shape[0]
    if residual.shape != (m, n) or residual.dtype != x.dtype or residual.stride(1) != 1:
        raise ValueError(f"residual {residual.dtype}{tuple(residual.shape)} does not fit "
                         f"the product's output [{m}, {n}] in {x.dtype}")
    return _launch(x, w, None, counters, config, gated=False, residual=residual)


def normed_linear(x: torch.Tensor, sums: torch.Tensor, norm_weight: torch.Tensor | None,
                  eps: float, w: torch.Tensor, bias: torch.Tensor | None = None, *,
                  counters: torch.Tensor, config: LinearConfig | None = None) -> torch.Tensor:
    """``rms_norm(x) @ w.T (+ bias)`` where ``sums`` are x's sums of squares by column tile
    (from :func:`linear_add`): each x tile is scaled by the norm's weight as it is loaded
    (rounded to x's dtype), and each row's ``rsqrt(mean + eps)`` is applied to the float32
    sums before the one rounding (where the unfused pair rounds the normed x first: the
    two agree to a few ulps). ``norm_weight`` None: it is already in w's columns (``w *
    norm_weight``, made once), and x goes into the product as it is. Same conditions as
    :func:`linear`."""
    return _launch(x, w, bias, counters, config, gated=False, norm=(sums, norm_weight, eps))


def normed_gate_up_silu(x: torch.Tensor, sums: torch.Tensor, norm_weight: torch.Tensor | None,
                        eps: float, gate_up: torch.Tensor, *, counters: torch.Tensor,
                        config: LinearConfig | None = None) -> torch.Tensor:
    """:func:`gate_up_silu` of ``rms_norm(x)``, the norm finished as :func:`normed_linear`
    finishes it."""
    return _launch(x, gate_up, None, counters, config, gated=True,
                   norm=(sums, norm_weight, eps))


def _launch(x, w, bias, counters, config, gated: bool, residual=None,
            norm=None) -> torch.Tensor:
    m, width = x.shape
    n, k = w.shape
    if width != k or x.stride(1) != 1:
        raise ValueError(f"x {tuple(x.shape)} does not fit w {tuple(w.shape)}")
    cfg = config or default_config(m, n, k, num_sms(x.device), shared_memory(x.device), gated)
    if k % (cfg.split_k * cfg.block_k):
        raise ValueError(f"K={k} is not a multiple of split_k x block_k in {cfg}")
    block_n = cfg.block_n
    if gated:
        if n % 2 or block_n % 2:
            raise ValueError(f"gate/up weight with {n} rows, block_n {block_n}: want both even")
        n, block_n = n // 2, block_n // 2  # output columns; rows per half-tile
    grid = (triton.cdiv(n, block_n), cfg.split_k)
    if grid[0] > counters.numel():
        raise ValueError(f"N={n} needs more than {counters.numel()} column-tile counters")
    y = residual if residual is not None else x.new_empty(m, n)
    sums = norm_weight = y  # unused unless the product takes part in a norm
    num_tiles, eps = 1, 0.0
    if residual is not None:  # the sums of squares this product leaves for the next
        sums = torch.empty(grid[0], m, dtype=torch.float32, device=x.device)
    scale_x = norm is not None and norm[1] is not None
    if norm is not None:
        sums, norm_weight, eps = norm
        num_tiles = sums.shape[0]
        norm_weight = norm_weight if scale_x else y
        if sums.shape != (num_tiles, m) or sums.dtype != torch.float32 or scale_x and (
                norm_weight.shape != (k,) or norm_weight.dtype != x.dtype):
            raise ValueError(f"norm sums {sums.dtype}{tuple(sums.shape)} and weight "
                             f"{norm_weight.dtype}{tuple(norm_weight.shape)} do not fit x "
                             f"{x.dtype}{tuple(x.shape)}")
    partial = y  # unused with one slice
    if cfg.split_k > 1:
        partial = torch.empty((2 if gated else 1) * cfg.split_k, m, n, dtype=torch.float32,
                              device=x.device)
    _linear_kernel[grid](
        x, w, y, bias if bias is not None else y, partial, counters, sums,
        norm_weight.contiguous(), m, n, x.stride(0), y.stride(0), num_tiles, eps, K=k,
        BLOCK_M=_block_m(m), BLOCK_N=block_n, BLOCK_K=cfg.block_k, SPLIT_K=cfg.split_k,
        HAS_BIAS=bias is not None, GATED=gated, ADD_RES=residual is not None,
        NORM_X=norm is not None, SCALE_X=scale_x, T_PAD=triton.next_power_of_2(num_tiles),
        LIBDEVICE=LIBDEVICE,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return sums if residual is not None else y


@triton.jit
def _linear_kernel(
    x_ptr, w_ptr, y_ptr, bias_ptr, partial_ptr, lock_ptr, sums_ptr, norm_w_ptr,
    M, N, stride_xm, stride_ym, num_tiles, eps, K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr, HAS_BIAS: tl.constexpr, GATED: tl.constexpr,
    ADD_RES: tl.constexpr, NORM_X: tl.constexpr, SCALE_X: tl.constexpr, T_PAD: tl.constexpr,
    LIBDEVICE: tl.constexpr,
):
    """One (column tile, K slice): acc[n, m] = sum_k w[n, k] * x[m, k] over the slice.
    GATED: w is [2 N, K]; up_acc sums the tile's rows N further on, and the output is
    silu(acc) * up_acc, each rounded first. ADD_RES: y is the residual, which the output is
    added to, and each tile's sums of squares of the new residual go to sums[tile, m].
    NORM_X: the output is scaled by each row's rsqrt of the mean of sums[:, m] (the norm's
    other half, from an ADD_RES product), and with SCALE_X x by norm_w as it is loaded
    (without: the norm's weight is already in w's columns)."""
    tile, split = tl.program_id(0), tl.program_id(1)
    offs_n = tile * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_k = tl.arange(0, BLOCK_K)
    n_ok, m_ok = offs_n < N, offs_m < M
    k_per_split: tl.constexpr = K // SPLIT_K  # K is static: the loop's trip count is known
    rows = offs_n[:, None].to(tl.int64)
    w_ptrs = w_ptr + rows * K + (split * k_per_split + offs_k)[None, :]
    up_ptrs = w_ptr + (rows + N) * K + (split * k_per_split + offs_k)[None, :]  # GATED
    x_ptrs = x_ptr + offs_m[None, :] * stride_xm + (split * k_per_split + offs_k)[:, None]
    nw_ptrs = norm_w_ptr + split * k_per_split + offs_k  # NORM_X
    acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    up_acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    for _ in range(0, k_per_split, BLOCK_K):
        w = tl.load(w_ptrs, mask=n_ok[:, None], other=0.0)  # [BLOCK_N, BLOCK_K]
        if GATED:
            up = tl.load(up_ptrs, mask=n_ok[:, None], other=0.0)
            up_ptrs += BLOCK_K
        xt = tl.load(x_ptrs, mask=m_ok[None, :], other=0.0)  # [BLOCK_K, BLOCK_M]
        if SCALE_X:  # the norm's weight, rounded as the unfused norm rounds its product
            nw = tl.load(nw_ptrs).to(tl.float32)
            xt = (xt.to(tl.float32) * nw[:, None]).to(xt.dtype)
            nw_ptrs += BLOCK_K
        acc = tl.dot(w, xt, acc)
        if GATED:
            up_acc = tl.dot(up, xt, up_acc)
        w_ptrs += BLOCK_K
        x_ptrs += BLOCK_K

    y_offs = offs_m[None, :] * stride_ym + offs_n[:, None]  # [BLOCK_N, BLOCK_M]
    out_ok = n_ok[:, None] & m_ok[None, :]
    if SPLIT_K > 1:
        # store this slice, then the last of the tile's programs reduces in slice order
        part_offs = offs_m[None, :] * N + offs_n[:, None]
        up_part = SPLIT_K * M * N  # GATED: the up sums follow the gate sums
        tl.store(partial_ptr + split * M * N + part_offs, acc, mask=out_ok)
        if GATED:
            tl.store(partial_ptr + up_part + split * M * N + part_offs, up_acc, mask=out_ok)
        tl.debug_barrier()
        arrived = tl.atomic_add(lock_ptr + tile, 1, sem="acq_rel", scope="gpu")
        if arrived == SPLIT_K - 1:
            acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
            up_acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
            for s in range(SPLIT_K):
                acc += tl.load(partial_ptr + s * M * N + part_offs, mask=out_ok, other=0.0,
                               cache_modifier=".cg")
                if GATED:
                    up_acc += tl.load(partial_ptr + up_part + s * M * N + part_offs,
                                      mask=out_ok, other=0.0, cache_modifier=".cg")
            _store_output(y_ptr, bias_ptr, sums_ptr, acc, up_acc, y_offs, offs_n, offs_m,
                          out_ok, n_ok, m_ok, tile, M, num_tiles, eps, K, HAS_BIAS, GATED,
                          ADD_RES, NORM_X, T_PAD, LIBDEVICE)
            tl.atomic_xchg(lock_ptr + tile, 0, sem="relaxed", scope="gpu")  # next launch
    else:
        _store_output(y_ptr, bias_ptr, sums_ptr, acc, up_acc, y_offs, offs_n, offs_m, out_ok,
                      n_ok, m_ok, tile, M, num_tiles, eps, K, HAS_BIAS, GATED, ADD_RES,
                      NORM_X, T_PAD, LIBDEVICE)


@triton.jit
def _store_output(y_ptr, bias_ptr, sums_ptr, acc, up_acc, y_offs, offs_n, offs_m, out_ok,
                  n_ok, m_ok, tile, M, num_tiles, eps, K: tl.constexpr,
                  HAS_BIAS: tl.constexpr, GATED: tl.constexpr, ADD_RES: tl.constexpr,
                  NORM_X: tl.constexpr, T_PAD: tl.constexpr, LIBDEVICE: tl.constexpr):
    if NORM_X:  # rsqrt(mean(x^2) + eps) of each row, from the column tiles' sums in order
        offs_t = tl.arange(0, T_PAD)
        sums = tl.load(sums_ptr + offs_t[:, None] * M + offs_m[None, :],
                       mask=(offs_t < num_tiles)[:, None] & m_ok[None, :], other=0.0)
        mean = tl.math.div_rn(tl.sum(sums, axis=0), tl.cast(K, tl.float32))
        rstd = rsqrt(mean + eps, LIBDEVICE)
        acc = acc * rstd[None, :]
        if GATED:
            up_acc = up_acc * rstd[None, :]
    if HAS_BIAS:  # added in float32 before the one rounding, as cuBLAS's epilogue does
        acc += tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[:, None]
    y = acc.to(y_ptr.dtype.element_ty)
    if GATED:
        y = silu_mul(y, up_acc.to(y_ptr.dtype.element_ty), LIBDEVICE)
    if ADD_RES:  # y_ptr is the residual: torch's add in dtype, then this tile's sums
        total = (tl.load(y_ptr + y_offs, mask=out_ok, other=0.0).to(tl.float32) +
                 y.to(tl.float32)).to(y.dtype)
        tl.store(y_ptr + y_offs, total, mask=out_ok)
        t32 = tl.where(out_ok, total.to(tl.float32), 0.0)
        tl.store(sums_ptr + tile * M + offs_m, tl.sum(t32 * t32, axis=0), mask=m_ok)
    else:
        tl.store(y_ptr + y_offs, y, mask=out_ok)
