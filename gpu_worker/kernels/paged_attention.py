"""Paged attention in Triton: flash-decoding for decode steps, a varlen kernel for the rest.

Both kernels gather keys and values straight from the paged cache through the block
table, put the query heads that share a KV head (and, for prefill, a tile of query
tokens) in the M dimension of ``tl.dot`` so that each K/V tile is loaded once per KV
head, and run an online softmax in float32 (base 2, with ``log2(e)`` folded into the
scale). :class:`gpu_worker.attention.TorchPagedAttention` is the reference they match.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from gpu_worker.attention import AttentionMetadata, KVCache
from gpu_worker.kernels import INTERPRETED, fused, num_sms, shared_memory

LOG2E = 1.4426950408889634
MAX_SPLITS = 64  # decode splits per (row, kv head)
MAX_ROW_HEADS = 1 << 16  # decode rows x kv heads: one split counter each
WAVES = 2  # decode launches at least this many programs per SM, where rows allow
# Decode with at most this many (row, kv head) pairs per SM: 128-key tiles, two stages, and
# as few splits as fill the machine in whole waves (H200, Llama-3-8B shape, `python -m
# bench.attention --search`: batch 32 at 1K 37.3 us a layer against 38.8 with the default
# 64-key tiles and two programs per SM; batch 8 at 4K and 16 at 2K 38.8 and 38.2 against
# 44.5 and 42.3; from batch 64 on the 64-key tiles stay ahead)
FEW_PAIRS_PER_SM = 2
WAVE_FILL = 0.9  # the share of the last wave's programs that few-pair splits aim for
# Few pairs over long contexts: splits of at least two key tiles where they still fill a wave
# (fewer partial sums to merge; H200, `python -m bench.attention`: batch 1 at 4,096 15.3 us a
# layer against 18.9-19.6 with one tile a split; at 1,024 two-tile splits fill only 32 SMs
# and took 10.1 against 7.1, so there the rule keeps one)
MIN_SPLIT_TILES = 2
DECODE_STAGES = 4  # K/V tiles in flight per decode program, where shared memory allows
STAGE_SHARE = 0.7  # of a program's shared memory, what the decode pipeline may take
PREFILL_BLOCK_M = 64  # query tokens x grouped heads per prefill program
# Decode: RoPE and the new token's K/V write inside the attention launch, one launch a layer
# fewer (H200, Llama-3-8B shape, batch 32 at 1K: 39.2 us a layer against 42.7 for the two
# launches; `python -m bench.attention` compares them).
FUSE_ROPE = True
# The merging split's loops over the others' partial sums, unrolled this many times so that
# their loads overlap (H200, Llama-3-8B shape, `python -m bench.attention`: batch 1 at 4,096
# 19.3 us a layer against 23.7 rolled, at 8,192 23.9 against 29.2; 4 and 64 did worse)
MERGE_UNROLL = 8


class TritonPagedAttention:
    """Paged attention with Triton kernels; same interface and results as TorchPagedAttention.

    Decode batches (``max_query_len == 1``) use flash-decoding: each (row, kv head) is cut
    into ``num_splits`` programs along its context, the loop bounds are read from
    ``context_lens`` on the device, and the last split of each (row, kv head) to finish
    merges them all, in split order, in the same launch. The launch
    depends on static shapes only (never on ``max_context_len``), so one captured CUDA
    graph serves every context length up to ``block_tables.shape[1] * block_size``.
    Other batches use a varlen kernel over (query tiles of each row, kv heads), causal by
    position.

    ``num_splits`` (decode splits) and ``block_n`` (keys per loop iteration, a power of
    two >= 16) override the defaults; tests use them to reach every code path. ``waves``
    (programs per SM that the split count aims for), ``num_warps`` and ``num_stages`` tune
    the decode kernel (``python -m bench.attention`` compares them). With none of
    ``block_n``, ``num_stages`` and ``waves`` given, a decode batch of few (row, kv head)
    pairs (``FEW_PAIRS_PER_SM``) takes longer programs: tiles of twice the keys, two
    stages, and the fewest splits that fill the machine in whole waves
    (:func:`few_pairs_splits`). ``fuse_rope`` makes a
    decode step one launch instead of two: each decode program rotates its own query heads
    in registers (q is then left as it was), and the split that holds a row's newest key
    rotates that key and writes it and its value into the cache before it reads them.
    """

    any_context = True  # decode reads each row's length on the device

    def __init__(self, cache: KVCache, scale: float, *, num_splits: int | None = None,
                 block_n: int | None = None, waves: int | None = None, num_warps: int = 4,
                 num_stages: int | None = None, fuse_rope: bool = FUSE_ROPE) -> None:
        head_dim = cache.data.shape[-1]
        if not (_is_pow2(cache.block_size) and _is_pow2(head_dim) and head_dim >= 16):
            raise ValueError("block_size and head_dim must be powers of two, head_dim >= 16")
        if block_n is not None and not (_is_pow2(block_n) and block_n >= 16):
            raise ValueError(f"block_n must be a power of two >= 16, got {block_n}")
        self.cache = cache
        self.scale = scale
        self.num_splits = num_splits
        self.block_n = block_n or max(64 if head_dim >= 128 else 128, cache.block_size)
        self.waves, self.num_warps, self.fuse_rope = waves or WAVES, num_warps, fuse_rope
        tile_bytes = 2 * self.block_n * head_dim * cache.data.element_size()  # one K + V
        budget = STAGE_SHARE * shared_memory(cache.data.device)
        self.num_stages = num_stages or (DECODE_STAGES if DECODE_STAGES * tile_bytes <= budget
                                         else 2)
        # few (row, kv head) pairs: (block_n, num_stages) of longer decode programs, or None
        self.few_pairs = None
        if block_n is None and num_stages is None and waves is None and \
                2 * (2 * tile_bytes) <= budget:
            self.few_pairs = (2 * self.block_n, 2)
        # decode: how many splits of each (row, kv head) have finished (zero between launches)
        self.split_counters = torch.zeros(MAX_ROW_HEADS, dtype=torch.int32,
                                          device=cache.data.device)

    def forward(self, layer, q, k, v, meta: AttentionMetadata, rope) -> torch.Tensor:
        key_cache, value_cache = self.cache.keys(layer), self.cache.values(layer)
        decode, new_kv = meta.max_query_len == 1, None
        if decode and self.fuse_rope:
            new_kv = NewKV(k, v, meta.slot_mapping, rope.cos, rope.signed_sin)
        else:
            fused.rope_write_kv(q, k, v, meta.positions, rope.cos, rope.signed_sin, key_cache,
                                value_cache, meta.slot_mapping)
        if decode:
            block_n, num_stages, num_splits = self.decode_launch(
                meta.block_tables.shape[0], key_cache.shape[2],
                meta.block_tables.shape[1] * self.cache.block_size, num_sms(q.device))
            return paged_decode(q, key_cache, value_cache, meta, self.scale, num_splits,
                                block_n, self.split_counters, self.num_warps, num_stages,
                                new_kv)
        return paged_prefill(q, key_cache, value_cache, meta, self.scale, self.block_n)

    def decode_launch(self, rows: int, kv_heads: int, max_context: int,
                      sms: int) -> tuple[int, int, int]:
        """(block_n, num_stages, num_splits) of a decode launch: static shapes only."""
        if self.few_pairs and rows * kv_heads <= FEW_PAIRS_PER_SM * sms:
            block_n, num_stages = self.few_pairs
            splits = self.num_splits or few_pairs_splits(rows * kv_heads, sms,
                                                         triton.cdiv(max_context, block_n))
            return block_n, num_stages, splits
        return self.block_n, self.num_stages, self.num_splits or decode_num_splits(
            rows, kv_heads, max_context, sms, self.block_n, self.waves)


class NewKV(NamedTuple):
    """A decode step's own keys and values, for the kernel to rotate and write itself."""

    k: torch.Tensor  # [rows, kv_heads, head_dim], unrotated
    v: torch.Tensor  # [rows, kv_heads, head_dim]
    slot_mapping: torch.Tensor  # [rows]
    cos: torch.Tensor  # [max_positions, head_dim]
    signed_sin: torch.Tensor  # [max_positions, head_dim], first half negated


def decode_num_splits(num_rows: int, num_kv_heads: int, max_context: int, num_sms: int,
                      block_n: int, waves: int = WAVES) -> int:
    """Splits per (row, kv head): enough programs for ``waves`` per SM, at most one per
    key tile of the largest context. Static inputs only, so every replay agrees."""
    wanted = triton.cdiv(waves * num_sms, num_rows * num_kv_heads)
    return max(1, min(wanted, triton.cdiv(max_context, block_n), MAX_SPLITS))


def few_pairs_splits(pairs: int, num_sms: int, max_tiles: int) -> int:
    """Splits per (row, kv head) when there are few pairs: the fewest that give every SM a
    program and fill the last wave to ``WAVE_FILL`` (waves counted at one program per SM,
    though on sm_90 two of the 128-key, two-stage programs fit at once: 72 KB of shared
    memory and 179 registers a thread at head size 128), at most one per key tile, or
    one per ``MIN_SPLIT_TILES`` key tiles where that many splits still fill a wave."""
    longer = max_tiles // MIN_SPLIT_TILES  # splits of MIN_SPLIT_TILES tiles
    most = max(1, min(longer if pairs * longer >= WAVE_FILL * num_sms else max_tiles,
                      MAX_SPLITS))
    for splits in range(1, most + 1):
        programs = pairs * splits
        if programs >= num_sms and programs >= WAVE_FILL * num_sms * -(-programs // num_sms):
            return splits
    return most


def paged_decode(
    q: torch.Tensor,  # [rows, heads, head_dim], one token per row
    key_cache: torch.Tensor,  # [num_blocks, block_size, kv_heads, head_dim]
    value_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    num_splits: int,
    block_n: int,
    split_counters: torch.Tensor,  # [>= rows * kv_heads] int32, zero
    num_warps: int = 4,
    num_stages: int = 2,
    new_kv: NewKV | None = None,  # given: q unrotated, new keys and values not yet cached
) -> torch.Tensor:  # [rows, heads, head_dim]
    rows, heads, dim = q.shape
    kv_heads = key_cache.shape[2]
    if rows * kv_heads > split_counters.numel():
        raise ValueError(f"{rows} rows x {kv_heads} kv heads: more than the "
                         f"{split_counters.numel()} split counters")
    q, out = _last_dim_contiguous(q), q.new_empty(q.shape)
    partial_acc = partial_ml = out  # unused with one split
    if num_splits > 1:
        partial_acc = torch.empty(rows, heads, num_splits, dim, dtype=torch.float32,
                                  device=q.device)  # weighted values, unnormalised
        partial_ml = torch.empty(2, rows, heads, num_splits, dtype=torch.float32,
                                 device=q.device)  # running max (log2 units), sum of exp2
    group = heads // kv_heads
    fuse = new_kv is not None
    k_new, v_new, slots, cos, sin = new_kv if fuse else (q, q, meta.positions, q[0], q[0])
    if fuse:
        fused.check_rope_write_kv(q, k_new, v_new, meta.positions, cos, sin, key_cache,
                                  value_cache, slots)
    is_fp32 = q.dtype == torch.float32
    _decode_kernel[(rows, kv_heads, num_splits)](
        q, key_cache, value_cache, out, partial_acc, partial_ml, split_counters,
        meta.block_tables, meta.context_lens, meta.positions,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        *_kv_strides(key_cache, value_cache), meta.block_tables.stride(0), scale * LOG2E,
        k_new, v_new, slots, cos, sin, k_new.stride(0), v_new.stride(0), k_new.stride(1),
        cos.stride(0),
        GROUP=group, BLOCK_M=max(16, triton.next_power_of_2(group)), HEAD_DIM=dim,
        BLOCK_N=block_n, BLOCK_SIZE=key_cache.shape[1], NUM_SPLITS=num_splits,
        IS_FP32=is_fp32, WHILE_LOOP=INTERPRETED, FUSE_ROPE=fuse, MERGE_UNROLL=MERGE_UNROLL,
        num_warps=num_warps, num_stages=num_stages,
        # RoPE rounds each product as torch does; with FP fusion on, the compiler drops the
        # rounding of one of them into an FMA (seen on sm_90, half and bfloat16 alike)
        enable_fp_fusion=not fuse,
    )
    return out


def paged_prefill(
    q: torch.Tensor,  # [num_tokens, heads, head_dim], rows contiguous (meta.query_start)
    key_cache: torch.Tensor,  # [num_blocks, block_size, kv_heads, head_dim]
    value_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    block_n: int,
) -> torch.Tensor:  # [num_tokens, heads, head_dim]
    _, heads, dim = q.shape
    kv_heads = key_cache.shape[2]
    q, out = _last_dim_contiguous(q), q.new_empty(q.shape)
    group = heads // kv_heads
    group_pad = triton.next_power_of_2(group)
    block_q = max(1, PREFILL_BLOCK_M // group_pad)
    grid = (triton.cdiv(meta.max_query_len, block_q), meta.num_rows, kv_heads)
    _prefill_kernel[grid](
        q, key_cache, value_cache, out,
        meta.block_tables, meta.context_lens, meta.positions, meta.query_start,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        *_kv_strides(key_cache, value_cache), meta.block_tables.stride(0), scale * LOG2E,
        GROUP=group, GROUP_PAD=group_pad, BLOCK_Q=block_q, HEAD_DIM=dim, BLOCK_N=block_n,
        BLOCK_SIZE=key_cache.shape[1], IS_FP32=q.dtype == torch.float32,
        WHILE_LOOP=INTERPRETED, num_warps=4, num_stages=2,
    )
    return out


@triton.jit
def _dot(a, b, IS_FP32: tl.constexpr):
    # float32 without TF32, to match torch to ~1e-5; half types accumulate in float32
    return tl.dot(a, b, input_precision="ieee") if IS_FP32 else tl.dot(a, b)


@triton.jit
def _attend(q, m_i, l_i, acc, tile_lo, tile_hi, q_pos, kv_len,
            block_table, k_head, v_head, stride_kb, stride_kt, scale_log2,
            HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_SIZE: tl.constexpr,
            IS_FP32: tl.constexpr, WHILE_LOOP: tl.constexpr):
    """Online softmax of q [M, D] over key tiles [tile_lo, tile_hi) of one row's context.

    Key j is visible to query row m when j < kv_len and j <= q_pos[m]. ``k_head`` and
    ``v_head`` point at the KV head inside block 0; ``block_table`` at the row's table.
    The interpreter needs a while loop (with numpy >= 2.4 it cannot turn the device
    scalars it keeps as 1-element arrays into ``range`` bounds); compiled code keeps the
    for loop, which Triton software-pipelines."""
    if WHILE_LOOP:
        tile = tile_lo
        while tile < tile_hi:
            m_i, l_i, acc = _attend_tile(
                q, m_i, l_i, acc, tile, q_pos, kv_len, block_table, k_head, v_head,
                stride_kb, stride_kt, scale_log2, HEAD_DIM, BLOCK_N, BLOCK_SIZE, IS_FP32)
            tile += 1
    else:
        for tile in range(tile_lo, tile_hi):
            m_i, l_i, acc = _attend_tile(
                q, m_i, l_i, acc, tile, q_pos, kv_len, block_table, k_head, v_head,
                stride_kb, stride_kt, scale_log2, HEAD_DIM, BLOCK_N, BLOCK_SIZE, IS_FP32)
    return m_i, l_i, acc


@triton.jit
def _attend_tile(q, m_i, l_i, acc, tile, q_pos, kv_len,
                 block_table, k_head, v_head, stride_kb, stride_kt, scale_log2,
                 HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                 IS_FP32: tl.constexpr):
    """One BLOCK_N-key step of the online softmax, K/V gathered through the block table."""
    offs_d = tl.arange(0, HEAD_DIM)
    keys = tile * BLOCK_N + tl.arange(0, BLOCK_N)  # [N] key positions
    in_ctx = keys < kv_len
    blocks = tl.load(block_table + keys // BLOCK_SIZE, mask=in_ctx, other=0)  # [N]
    kv_offs = (blocks * stride_kb + (keys % BLOCK_SIZE) * stride_kt)[:, None] + offs_d[None, :]
    k = tl.load(k_head + kv_offs, mask=in_ctx[:, None], other=0.0)  # [N, D]
    s = _dot(q, tl.trans(k), IS_FP32) * scale_log2  # [M, N]
    s = tl.where(in_ctx[None, :] & (keys[None, :] <= q_pos[:, None]), s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    v = tl.load(v_head + kv_offs, mask=in_ctx[:, None], other=0.0)  # [N, D]
    acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, IS_FP32)
    return m_new, l_i, acc


@triton.jit
def _decode_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr, partial_acc_ptr, partial_ml_ptr, counters_ptr,
    block_tables_ptr, context_lens_ptr, positions_ptr,
    stride_qt, stride_qh, stride_ot, stride_oh, stride_kb, stride_kt, stride_kh, stride_bt,
    scale_log2,
    k_new_ptr, v_new_ptr, slot_ptr, cos_ptr, sin_ptr, stride_knt, stride_vnt, stride_knh,
    stride_table,
    GROUP: tl.constexpr, BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, NUM_SPLITS: tl.constexpr, IS_FP32: tl.constexpr,
    WHILE_LOOP: tl.constexpr, FUSE_ROPE: tl.constexpr, MERGE_UNROLL: tl.constexpr,
):
    """One (row, kv head, split): an equal share of the row's key tiles, all GROUP heads.
    The split that finishes last merges all of them. FUSE_ROPE: q arrives unrotated, and
    the row's new key and value are not cached yet; the split holding the row's last key
    tile rotates the key and writes both into the cache first, then reads them back with
    the tile (a barrier between)."""
    row, kv_head, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    pos = tl.load(positions_ptr + row).to(tl.int64)  # the new token's
    kv_len = tl.minimum(tl.load(context_lens_ptr + row), pos + 1)
    num_tiles = tl.cdiv(kv_len, BLOCK_N)
    per_split = tl.cdiv(num_tiles, NUM_SPLITS)
    tile_lo = split * per_split
    tile_hi = tl.minimum(tile_lo + per_split, num_tiles)

    offs_m, offs_d = tl.arange(0, BLOCK_M), tl.arange(0, HEAD_DIM)
    is_head = offs_m < GROUP
    heads = kv_head * GROUP + offs_m  # [M]
    q_ptrs = q_ptr + row * stride_qt + heads[:, None] * stride_qh
    q = tl.load(q_ptrs + offs_d[None, :], mask=is_head[:, None], other=0.0)  # [M, D]
    if FUSE_ROPE:
        cos = tl.load(cos_ptr + pos * stride_table + offs_d)  # [D]
        sin = tl.load(sin_ptr + pos * stride_table + offs_d)
        q = _rope(q, q_ptrs, is_head, cos, sin, HEAD_DIM)
        owner = split == (num_tiles - 1) // per_split  # holds the row's last key tile
        if owner:  # into the cache first, and read back from there with the others
            _cache_new_kv(row, kv_head, cos, sin, k_new_ptr, v_new_ptr, slot_ptr, k_ptr, v_ptr,
                          stride_knt, stride_vnt, stride_knh, stride_kb, stride_kt,
                          stride_kh, HEAD_DIM, BLOCK_SIZE)
            tl.debug_barrier()  # the key tiles below read this token back
    q_pos = tl.zeros([BLOCK_M], dtype=tl.int64) + (kv_len - 1)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    m_i, l_i, acc = _attend(
        q, m_i, l_i, acc, tile_lo, tile_hi, q_pos, kv_len,
        block_tables_ptr + row * stride_bt, k_ptr + kv_head * stride_kh,
        v_ptr + kv_head * stride_kh, stride_kb, stride_kt, scale_log2,
        HEAD_DIM, BLOCK_N, BLOCK_SIZE, IS_FP32, WHILE_LOOP)

    out = out_ptr + row * stride_ot + heads[:, None] * stride_oh + offs_d[None, :]
    if NUM_SPLITS == 1:
        l_i = tl.where(is_head, l_i, 1.0)  # padding lanes: no 0 / 0
        tl.store(out, (acc / l_i[:, None]).to(out_ptr.dtype.element_ty), mask=is_head[:, None])
    else:
        first = (row * tl.num_programs(1) * GROUP + heads).to(tl.int64) * NUM_SPLITS  # split 0
        acc_ptrs = partial_acc_ptr + first[:, None] * HEAD_DIM + offs_d[None, :]
        ml_stride = tl.num_programs(0) * tl.num_programs(1) * GROUP * NUM_SPLITS
        tl.store(acc_ptrs + split * HEAD_DIM, acc, mask=is_head[:, None])
        tl.store(partial_ml_ptr + first + split, m_i, mask=is_head)
        tl.store(partial_ml_ptr + ml_stride + first + split, l_i, mask=is_head)
        tl.debug_barrier()  # every thread's partials are written before the count goes up
        counter = counters_ptr + row * tl.num_programs(1) + kv_head
        if tl.atomic_add(counter, 1, sem="acq_rel", scope="gpu") == NUM_SPLITS - 1:
            _merge_splits(out, acc_ptrs, partial_ml_ptr + first, ml_stride, is_head,
                          NUM_SPLITS, HEAD_DIM, BLOCK_M, MERGE_UNROLL)
            tl.atomic_xchg(counter, 0, sem="relaxed", scope="gpu")  # ready for the next launch


@triton.jit
def _rope(q, q_ptrs, is_head, cos, sin, HEAD_DIM: tl.constexpr):
    """The rotated q [M, D] of a decode program (``cos``, ``sin``: its position's rows):
    ``x * cos + cat(x2, x1) * signed_sin``, rounded as
    :func:`gpu_worker.kernels.fused.rope_write_kv` rounds."""
    swapped = (tl.arange(0, HEAD_DIM) + HEAD_DIM // 2) % HEAD_DIM
    q_swapped = tl.load(q_ptrs + swapped[None, :], mask=is_head[:, None], other=0.0)
    return fused.mul_add(q, cos[None, :], q_swapped, sin[None, :])


@triton.jit
def _cache_new_kv(row, kv_head, cos, sin, k_new_ptr, v_new_ptr, slot_ptr, k_ptr, v_ptr,
                  stride_knt, stride_vnt, stride_knh, stride_kb, stride_kt, stride_kh,
                  HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr):
    """The row's new key, rotated as :func:`_rope` rotates q, and its new value into the
    cache at the row's slot."""
    offs_d = tl.arange(0, HEAD_DIM)
    swapped = (offs_d + HEAD_DIM // 2) % HEAD_DIM
    k_src = k_new_ptr + row * stride_knt + kv_head * stride_knh
    key = fused.mul_add(tl.load(k_src + offs_d), cos, tl.load(k_src + swapped), sin)
    value = tl.load(v_new_ptr + row * stride_vnt + kv_head * stride_knh + offs_d)
    slot = tl.load(slot_ptr + row).to(tl.int64)
    dst = (slot // BLOCK_SIZE) * stride_kb + (slot % BLOCK_SIZE) * stride_kt + \
        kv_head * stride_kh + offs_d
    tl.store(k_ptr + dst, key.to(k_ptr.dtype.element_ty))
    tl.store(v_ptr + dst, value.to(v_ptr.dtype.element_ty))


@triton.jit
def _merge_splits(out, acc_ptrs, ml_ptrs, ml_stride, is_head,
                  NUM_SPLITS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
                  UNROLL: tl.constexpr):
    """Rescale each split's partial sums to the common max and add them, in split order
    (so the result does not depend on which split merges). Empty splits weigh 0. The loops
    are unrolled UNROLL times, so that their loads are in flight together."""
    m_max = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    for s in tl.range(NUM_SPLITS, loop_unroll_factor=UNROLL):
        m_max = tl.maximum(m_max, tl.load(ml_ptrs + s, mask=is_head, other=float("-inf"),
                                          cache_modifier=".cg"))
    total = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    l_sum = tl.zeros([BLOCK_M], dtype=tl.float32)
    for s in tl.range(NUM_SPLITS, loop_unroll_factor=UNROLL):
        m = tl.load(ml_ptrs + s, mask=is_head, other=float("-inf"), cache_modifier=".cg")
        weight = tl.where(m > float("-inf"), tl.exp2(m - m_max), 0.0)
        l_sum += weight * tl.load(ml_ptrs + ml_stride + s, mask=is_head, other=0.0,
                                  cache_modifier=".cg")
        total += weight[:, None] * tl.load(acc_ptrs + s * HEAD_DIM, mask=is_head[:, None],
                                           other=0.0, cache_modifier=".cg")
    l_sum = tl.where(is_head, l_sum, 1.0)  # padding lanes: no 0 / 0
    tl.store(out, (total / l_sum[:, None]).to(out.dtype.element_ty), mask=is_head[:, None])


@triton.jit
def _prefill_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr,
    block_tables_ptr, context_lens_ptr, positions_ptr, query_start_ptr,
    stride_qt, stride_qh, stride_ot, stride_oh, stride_kb, stride_kt, stride_kh, stride_bt,
    scale_log2,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, BLOCK_Q: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    IS_FP32: tl.constexpr, WHILE_LOOP: tl.constexpr,
):
    """One (query tile, row, kv head): BLOCK_Q tokens x GROUP heads, causal by position."""
    q_tile, row, kv_head = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    first = tl.load(query_start_ptr + row)
    num_queries = tl.load(query_start_ptr + row + 1) - first
    if q_tile * BLOCK_Q >= num_queries:
        return

    offs_m, offs_d = tl.arange(0, BLOCK_Q * GROUP_PAD), tl.arange(0, HEAD_DIM)
    query = q_tile * BLOCK_Q + offs_m // GROUP_PAD  # [M] index of the token in its row
    heads = kv_head * GROUP + offs_m % GROUP_PAD  # [M]
    valid = (query < num_queries) & (offs_m % GROUP_PAD < GROUP)
    tokens = first + query
    q_pos = tl.load(positions_ptr + tokens, mask=valid, other=0)  # padding sees key 0 only
    q = tl.load(q_ptr + tokens[:, None] * stride_qt + heads[:, None] * stride_qh
                + offs_d[None, :], mask=valid[:, None], other=0.0)  # [M, D]
    context_len = tl.load(context_lens_ptr + row)
    kv_hi = tl.minimum(context_len, tl.max(q_pos, 0) + 1)
    m_i = tl.full([BLOCK_Q * GROUP_PAD], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_Q * GROUP_PAD], dtype=tl.float32)
    acc = tl.zeros([BLOCK_Q * GROUP_PAD, HEAD_DIM], dtype=tl.float32)
    m_i, l_i, acc = _attend(
        q, m_i, l_i, acc, 0, tl.cdiv(kv_hi, BLOCK_N), q_pos, context_len,
        block_tables_ptr + row * stride_bt, k_ptr + kv_head * stride_kh,
        v_ptr + kv_head * stride_kh, stride_kb, stride_kt, scale_log2,
        HEAD_DIM, BLOCK_N, BLOCK_SIZE, IS_FP32, WHILE_LOOP)

    out = out_ptr + tokens[:, None] * stride_ot + heads[:, None] * stride_oh + offs_d[None, :]
    tl.store(out, (acc / l_i[:, None]).to(out_ptr.dtype.element_ty), mask=valid[:, None])




def _kv_strides(key_cache: torch.Tensor, value_cache: torch.Tensor) -> tuple[int, int, int]:
    """Block, token and head strides, shared by the key and the value cache."""
    if key_cache.stride() != value_cache.stride() or key_cache.stride(-1) != 1:
        raise ValueError("key and value caches need the same layout, head_dim contiguous")
    return key_cache.stride()[:3]


def _last_dim_contiguous(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _is_pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0
