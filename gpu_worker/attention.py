"""Attention over the paged KV cache, behind one small interface.

The model calls ``backend.forward(layer, q, k, v, meta, rope)``; the backend applies
RoPE to the new queries and keys, writes the keys and values into the cache and attends
over each row's whole context.
:class:`TorchPagedAttention` is the portable reference (CPU and GPU, plain torch
ops, CUDA-graph safe for a fixed shape); faster kernels implement the same
interface.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Protocol

import torch


@dataclasses.dataclass
class AttentionMetadata:
    """Where each token of the batch goes and what it may attend to.

    Rows are requests; row ``b`` owns tokens ``[query_start[b], query_start[b+1])``.
    ``max_query_len`` and ``max_context_len`` are host-side integers that size
    the padded work; they must bound the real values.
    """

    positions: torch.Tensor  # [num_tokens] int64, absolute position of each token
    slot_mapping: torch.Tensor  # [num_tokens] int64, KV cache slot of each token
    query_start: torch.Tensor  # [num_rows + 1] int64
    context_lens: torch.Tensor  # [num_rows] int64, cached + new tokens per row
    block_tables: torch.Tensor  # [num_rows, max_blocks] int64
    token_rows: torch.Tensor  # [num_tokens] int64, row of each token
    max_query_len: int
    max_context_len: int

    @property
    def num_rows(self) -> int:
        return self.context_lens.shape[0]

    @functools.cached_property
    def query_offsets(self) -> torch.Tensor:  # [num_tokens]: index of each token in its row
        if self.max_query_len == 1:
            return torch.zeros_like(self.token_rows)
        return torch.arange(self.positions.shape[0], device=self.positions.device) - \
            self.query_start[self.token_rows]

    def context_mask(self, ctx: int) -> torch.Tensor:
        """[rows, max_query_len, ctx] bool: which keys each (padded) query may see.

        Computed once per forward pass and shared by every layer. Padded query slots
        see key 0 only, so that no row is fully masked."""
        key = ("mask", ctx)
        if key not in self._memo:
            query_pos = self.positions[:, None]
            if self.max_query_len > 1:
                query_pos = torch.zeros(self.num_rows, self.max_query_len, dtype=torch.long,
                                        device=self.positions.device)
                query_pos[self.token_rows, self.query_offsets] = self.positions
            key_pos = torch.arange(ctx, device=self.positions.device)
            self._memo[key] = key_pos[None, None, :] <= query_pos[:, :, None]
        return self._memo[key]

    @functools.cached_property
    def _memo(self) -> dict:
        return {}


class RopeTables(Protocol):
    cos: torch.Tensor  # [max_positions, head_dim]
    signed_sin: torch.Tensor  # [max_positions, head_dim], first half negated


class AttentionBackend(Protocol):
    # False: a decode step's work depends on the batch's max_context_len (its graphs are
    # captured per context bucket); True: it reads each row's length on the device, so one
    # graph serves every context length.
    any_context: bool

    def forward(
        self,
        layer: int,
        q: torch.Tensor,  # [num_tokens, num_heads, head_dim]
        k: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
        v: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
        meta: AttentionMetadata,
        rope: RopeTables,
    ) -> torch.Tensor:  # [num_tokens, num_heads, head_dim]
        """q is rotated in place; k may be left unrotated (only the cache holds keys)."""
        ...


class KVCache:
    """The paged cache: per layer, keys and values of ``num_blocks`` blocks."""

    def __init__(
        self,
        num_layers: int,
        num_blocks: int,
        block_size: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        shape = (num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim)
        self.data = torch.zeros(shape, dtype=dtype, device=device)
        self.num_blocks = num_blocks
        self.block_size = block_size

    @staticmethod
    def bytes_per_block(num_layers, block_size, num_kv_heads, head_dim, dtype) -> int:
        return 2 * num_layers * block_size * num_kv_heads * head_dim * dtype.itemsize

    def keys(self, layer: int) -> torch.Tensor:  # [num_blocks, block_size, kv_heads, head_dim]
        return self.data[layer, 0]

    def values(self, layer: int) -> torch.Tensor:
        return self.data[layer, 1]


class TorchPagedAttention:
    """Reference paged attention: gather each row's context, pad, attend.

    Grouped-query heads attend in groups (one einsum per group of query heads
    sharing a KV head), so keys and values are never repeated per query head.
    With ``max_query_len == 1`` and a fixed ``max_context_len`` every shape is
    static, so decode steps can be captured in a CUDA graph.
    """

    any_context = False

    def __init__(self, cache: KVCache, scale: float) -> None:
        self.cache = cache
        self.scale = scale

    def forward(self, layer, q, k, v, meta: AttentionMetadata, rope: RopeTables) -> torch.Tensor:
        from gpu_worker.ops import TorchOps

        TorchOps.rope_(q, k, meta.positions, rope.cos, rope.signed_sin)
        key_cache, value_cache = self.cache.keys(layer), self.cache.values(layer)
        _write_cache(key_cache, value_cache, k, v, meta.slot_mapping)
        keys = _gather_context(key_cache, meta)  # [rows, ctx, kv_heads, dim]
        values = _gather_context(value_cache, meta)
        q_pad = _pad_queries(q, meta)  # [rows, max_q, heads, dim]
        rows, max_q, heads, dim = q_pad.shape
        groups = q_pad.view(rows, max_q, k.shape[1], heads // k.shape[1], dim)
        mask = meta.context_mask(keys.shape[1])  # [rows, max_q, ctx]
        scores = torch.einsum("bqkgd,bskd->bkgqs", groups, keys).float() * self.scale
        scores = scores.masked_fill(~mask[:, None, None], float("-inf"))
        probs = scores.softmax(dim=-1).to(values.dtype)
        out = torch.einsum("bkgqs,bskd->bqkgd", probs, values).reshape(rows, max_q, heads, dim)
        if meta.max_query_len == 1:
            return out[:, 0]
        return out[meta.token_rows, meta.query_offsets]


def _write_cache(key_cache, value_cache, k, v, slot_mapping) -> None:
    flat_k = key_cache.view(-1, *key_cache.shape[2:])
    flat_v = value_cache.view(-1, *value_cache.shape[2:])
    flat_k.index_copy_(0, slot_mapping, k.to(flat_k.dtype))
    flat_v.index_copy_(0, slot_mapping, v.to(flat_v.dtype))


def _gather_context(cache: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
    block_size = cache.shape[1]
    num_blocks = -(-meta.max_context_len // block_size)
    blocks = meta.block_tables[:, :num_blocks]  # [rows, num_blocks]
    gathered = cache[blocks]  # [rows, num_blocks, block_size, kv_heads, dim]
    return gathered.flatten(1, 2)


def _pad_queries(q: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
    if meta.max_query_len == 1:  # one token per row, in row order
        return q[:, None]
    q_pad = q.new_zeros(meta.num_rows, meta.max_query_len, *q.shape[1:])
    q_pad[meta.token_rows, meta.query_offsets] = q
    return q_pad


def make_attention(cache: KVCache, scale: float, device: torch.device,
                   kind: str = "auto") -> AttentionBackend:
    """``auto``: Triton kernels on CUDA, the torch reference elsewhere; or ``triton``/``torch``."""
    from gpu_worker.ops import use_triton

    if use_triton(device, kind):
        from gpu_worker.kernels.paged_attention import TritonPagedAttention

        return TritonPagedAttention(cache, scale)
    return TorchPagedAttention(cache, scale)
