"""A decode layer's second half in one launch: O + residual, gate/up + SiLU, down + residual.

The three products of :mod:`gpu_worker.kernels.linear` that follow the attention each pay a
launch's ramp and tail (~4-6 us at 32 rows on an H200). Here one persistent grid of
programs, as many as fit on the GPU at once, runs them as three phases with a grid-wide
barrier between each: phase A ``residual += attn @ o.T`` (leaving each column tile's sums of
squares, as :func:`linear.linear_add`), phase B ``act = silu(h @ gate.T) * (h @ up.T)`` of
``h = rms_norm(residual)`` (finished from those sums, as :func:`linear.normed_gate_up_silu`),
phase C ``residual += act @ down.T`` (sums again, for the next layer's QKV product). Each
program takes its phase's column tiles round-robin, every tile over the whole of K.

The barrier is a counter per phase in ``state``: a program bumps it (release) once its
stores are done and spins until every program has (acquire); the last program to leave
sets them back to zero for the next launch. Every program must be resident at once for
that to finish, so the launcher sizes the grid from the compiled kernel's registers and
shared memory. Data another program wrote in an earlier phase is read through L2
(``.cg``). Triton's interpreter runs programs one after another and cannot run this
kernel: it is CUDA only.
"""

from __future__ import annotations

import dataclasses

import torch
import triton
import triton.language as tl

from gpu_worker.kernels import num_sms
from gpu_worker.kernels.fused import LIBDEVICE, rsqrt, silu_mul

STATE_SIZE = 4  # three barriers and the exit counter


@dataclasses.dataclass(frozen=True)
class ChainConfig:
    programs_per_sm: int = 1
    num_warps: int = 4
    block_n: int = 32  # phases A and C: output columns per tile
    block_k: int = 256
    stages: int = 5
    gated_block_n: int = 64  # phase B: rows from each half of gate/up per tile
    gated_block_k: int = 64
    gated_stages: int = 3
    sleep_ns: int = 0  # backoff between the barrier's polls
    phases: int = 7  # bit mask of the phases to run (timing one phase alone)


def new_state(device: torch.device) -> torch.Tensor:
    return torch.zeros(STATE_SIZE, dtype=torch.int32, device=device)


def mlp_chain(attn: torch.Tensor, o: torch.Tensor, residual: torch.Tensor,
              gate_up: torch.Tensor, down: torch.Tensor, eps: float, *, state: torch.Tensor,
              config: ChainConfig = ChainConfig()) -> torch.Tensor:
    """residual += attn @ o.T; residual += silu_and_mul(rms_norm(residual) @ gate_up.T) @
    down.T, in place (the norm's weight already in gate_up's columns). Returns the new
    residual's sums of squares by column tile [tiles, M] for the next normed product."""
    m, hidden = residual.shape
    inter = gate_up.shape[0] // 2
    cfg = config
    act = attn.new_empty(m, inter)
    tiles = triton.cdiv(hidden, cfg.block_n)
    sums_a = torch.empty(tiles, m, dtype=torch.float32, device=attn.device)
    sums_c = torch.empty_like(sums_a)
    programs = cfg.programs_per_sm * num_sms(attn.device)
    args = (attn, o, residual, gate_up, act, down, sums_a, sums_c, state, m, attn.stride(0),
            residual.stride(0), eps)
    consts = dict(H=hidden, I=inter, P=programs, BLOCK_M=max(16, triton.next_power_of_2(m)),
                  BN=cfg.block_n, BK=cfg.block_k, STAGES=cfg.stages, GBN=cfg.gated_block_n,
                  GBK=cfg.gated_block_k, GSTAGES=cfg.gated_stages, T_PAD=triton.next_power_of_2(
                      tiles), LIBDEVICE=LIBDEVICE, SLEEP_NS=cfg.sleep_ns,
                  PHASES=cfg.phases, num_warps=cfg.num_warps)
    _check_resident(args, consts, programs, attn.device)
    _chain_kernel[(programs,)](*args, **consts)
    return sums_c


_RESIDENT: dict = {}


def _check_resident(args, consts, programs, device) -> None:
    """Raise unless ``programs`` copies of the compiled kernel fit on the GPU at once."""
    key = tuple(sorted(consts.items()))
    if key not in _RESIDENT:
        k = _chain_kernel.warmup(*args, grid=(programs,), **consts)
        k._init_handles()  # loads the binary: its registers and spills are known then
        props = torch.cuda.get_device_properties(device)
        threads = consts["num_warps"] * 32
        per_sm = min(props.max_threads_per_multi_processor // threads,
                     65536 // max(1, k.n_regs * threads),
                     props.shared_memory_per_multiprocessor // max(1, k.metadata.shared + 1024))
        _RESIDENT[key] = (per_sm * props.multi_processor_count, k.n_regs, k.metadata.shared,
                          k.n_spills)
    fits, regs, shared, spills = _RESIDENT[key]
    if programs > fits:
        raise ValueError(f"{programs} programs do not fit at once ({fits} do: {regs} registers,"
                         f" {shared} B shared, {spills} spills)")


@triton.jit
def _tile_product(x_ptr, stride_xm, w_ptr, tile, M, N, K: tl.constexpr, BLOCK_M: tl.constexpr,
                  BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, STAGES: tl.constexpr,
                  GATED: tl.constexpr):
    """acc[n, m] = sum_k w[n, k] * x[m, k] for the tile's BLOCK_N rows of w (GATED: and
    up_acc for the rows N further on), x read through L2."""
    offs_n = tile * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_k = tl.arange(0, BLOCK_K)
    n_ok, m_ok = offs_n < N, offs_m < M
    rows = offs_n[:, None].to(tl.int64)
    w_ptrs = w_ptr + rows * K + offs_k[None, :]
    up_ptrs = w_ptr + (rows + N) * K + offs_k[None, :]
    x_ptrs = x_ptr + offs_m[None, :] * stride_xm + offs_k[:, None]
    acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    up_acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    for _ in tl.range(0, K, BLOCK_K, num_stages=STAGES):
        w = tl.load(w_ptrs, mask=n_ok[:, None], other=0.0)
        if GATED:
            up = tl.load(up_ptrs, mask=n_ok[:, None], other=0.0)
            up_ptrs += BLOCK_K
        xt = tl.load(x_ptrs, mask=m_ok[None, :], other=0.0, cache_modifier=".cg")
        acc = tl.dot(w, xt, acc)
        if GATED:
            up_acc = tl.dot(up, xt, up_acc)
        w_ptrs += BLOCK_K
        x_ptrs += BLOCK_K
    return acc, up_acc


@triton.jit
def _add_residual(acc, res_ptr, stride_rm, sums_ptr, tile, M, N, BLOCK_M: tl.constexpr,
                  BLOCK_N: tl.constexpr):
    """residual[:, tile] += acc (rounded first, as F.linear then add_ round); the new
    residual's sums of squares of each row go to sums[tile, :]."""
    offs_n = tile * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    n_ok, m_ok = offs_n < N, offs_m < M
    offs = offs_m[None, :] * stride_rm + offs_n[:, None]
    ok = n_ok[:, None] & m_ok[None, :]
    y = acc.to(res_ptr.dtype.element_ty)
    total = (tl.load(res_ptr + offs, mask=ok, other=0.0, cache_modifier=".cg").to(tl.float32) +
             y.to(tl.float32)).to(y.dtype)
    tl.store(res_ptr + offs, total, mask=ok)
    t32 = tl.where(ok, total.to(tl.float32), 0.0)
    tl.store(sums_ptr + tile * M + offs_m, tl.sum(t32 * t32, axis=0), mask=m_ok)


@triton.jit
def _grid_barrier(counter_ptr, P: tl.constexpr, SLEEP_NS: tl.constexpr):
    tl.debug_barrier()  # the program's stores are issued before it arrives
    tl.atomic_add(counter_ptr, 1, sem="release", scope="gpu")
    while tl.atomic_add(counter_ptr, 0, sem="acquire", scope="gpu") < P:
        if SLEEP_NS > 0:  # spinning at full rate on one address slows the programs still streaming
            tl.inline_asm_elementwise(f"nanosleep.u32 {SLEEP_NS}; mov.u32 $0, 0;", "=r", [],
                                      dtype=tl.int32, is_pure=False, pack=1)
    tl.debug_barrier()


@triton.jit
def _chain_kernel(
    attn_ptr, o_ptr, res_ptr, gu_ptr, act_ptr, down_ptr, sums_a_ptr, sums_c_ptr, state_ptr,
    M, stride_am, stride_rm, eps,
    H: tl.constexpr, I: tl.constexpr, P: tl.constexpr, BLOCK_M: tl.constexpr,
    BN: tl.constexpr, BK: tl.constexpr, STAGES: tl.constexpr, GBN: tl.constexpr,
    GBK: tl.constexpr, GSTAGES: tl.constexpr, T_PAD: tl.constexpr, LIBDEVICE: tl.constexpr,
    SLEEP_NS: tl.constexpr, PHASES: tl.constexpr,
):
    pid = tl.program_id(0)
    tiles: tl.constexpr = (H + BN - 1) // BN
    for tile in range(pid, tiles if PHASES & 1 else 0, P):  # A: residual += attn @ o.T
        acc, _ = _tile_product(attn_ptr, stride_am, o_ptr, tile, M, H, H, BLOCK_M, BN, BK,
                               STAGES, False)
        _add_residual(acc, res_ptr, stride_rm, sums_a_ptr, tile, M, H, BLOCK_M, BN)
    _grid_barrier(state_ptr, P, SLEEP_NS)

    offs_m = tl.arange(0, BLOCK_M)
    m_ok = offs_m < M
    offs_t = tl.arange(0, T_PAD)
    sums = tl.load(sums_a_ptr + offs_t[:, None] * M + offs_m[None, :],
                   mask=(offs_t < tiles)[:, None] & m_ok[None, :], other=0.0,
                   cache_modifier=".cg")
    rstd = rsqrt(tl.math.div_rn(tl.sum(sums, axis=0), tl.cast(H, tl.float32)) + eps, LIBDEVICE)
    for tile in range(pid, (I + GBN - 1) // GBN if PHASES & 2 else 0, P):  # B: act = silu(h @ gate.T) * (h @ up.T)
        acc, up_acc = _tile_product(res_ptr, stride_rm, gu_ptr, tile, M, I, H, BLOCK_M, GBN,
                                    GBK, GSTAGES, True)
        offs_n = tile * GBN + tl.arange(0, GBN)
        ok = (offs_n < I)[:, None] & m_ok[None, :]
        y = silu_mul((acc * rstd[None, :]).to(act_ptr.dtype.element_ty),
                     (up_acc * rstd[None, :]).to(act_ptr.dtype.element_ty), LIBDEVICE)
        tl.store(act_ptr + offs_m[None, :] * I + offs_n[:, None], y, mask=ok)
    _grid_barrier(state_ptr + 1, P, SLEEP_NS)

    for tile in range(pid, tiles if PHASES & 4 else 0, P):  # C: residual += act @ down.T
        acc, _ = _tile_product(act_ptr, I, down_ptr, tile, M, H, I, BLOCK_M, BN, BK, STAGES,
                               False)
        _add_residual(acc, res_ptr, stride_rm, sums_c_ptr, tile, M, H, BLOCK_M, BN)

    tl.debug_barrier()
    if tl.atomic_add(state_ptr + 3, 1, sem="acq_rel", scope="gpu") == P - 1:
        tl.atomic_xchg(state_ptr, 0, sem="relaxed", scope="gpu")  # for the next launch
        tl.atomic_xchg(state_ptr + 1, 0, sem="relaxed", scope="gpu")
        tl.atomic_xchg(state_ptr + 3, 0, sem="relaxed", scope="gpu")
