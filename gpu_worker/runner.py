"""One batch from its device slot to sampled tokens, on the current (compute) stream.

Decode batches (one token per row) run a static-shape step over a bucket of
rows and a bucket of context length: it fills placeholders from the previous
batch's on-device output, masks the padding rows onto a scratch KV block, runs
the model and samples greedily into the slot's outputs. On CUDA the step is
captured once per (slot, rows, context) bucket and replayed as a graph, all
graphs sharing one memory pool; a batch that wants more than greedy tokens
(temperature, penalties, bans, logprobs) samples again, eagerly, over the graph's
logits. Other batches (prefill, mixed) run eagerly with the same model code.
"""

from __future__ import annotations

import bisect
import dataclasses
import logging

import numpy as np
import torch

from gpu_worker.attention import AttentionBackend, AttentionMetadata
from gpu_worker.device_slots import DeviceSlots
from gpu_worker.model import LlamaModel
from gpu_worker.sampler import Penalties, SamplingBatch, sample
from tandem import slots as S

log = logging.getLogger("gpu_worker")


@dataclasses.dataclass(frozen=True)
class BatchInfo:
    """What the host reads of a batch before launching it (from the shared slot)."""

    seq: int
    prev_seq: int
    num_tokens: int
    num_rows: int
    num_placeholders: int
    max_query_len: int
    max_context_len: int
    num_top_logprobs: int
    want_logprobs: bool
    all_greedy: bool
    any_truncation: bool  # top-k or top-p
    any_min_p: bool
    any_banned: bool
    any_bias: bool
    history_len: int  # > 0: penalties; the rows' token histories are this long

    @property
    def is_decode(self) -> bool:
        return self.max_query_len == 1

    @property
    def is_greedy_only(self) -> bool:
        """Greedy tokens are all the batch wants: the decode graph's sampling suffices."""
        return (self.all_greedy and not self.want_logprobs and not self.num_top_logprobs
                and not self.any_banned and not self.any_bias and not self.history_len)

    @classmethod
    def read(cls, view: S.SlotView) -> BatchInfo:
        h, rows = view.header, int(view.header[S.H_NUM_ROWS])
        temperature, top_p, top_k = view.temperature[:rows], view.top_p[:rows], view.top_k[:rows]
        return cls(
            seq=int(h[S.H_SEQ]), prev_seq=int(h[S.H_PREV_SEQ]),
            num_tokens=int(h[S.H_NUM_TOKENS]), num_rows=rows,
            num_placeholders=int(h[S.H_NUM_PLACEHOLDERS]),
            max_query_len=int(h[S.H_MAX_QUERY_LEN]), max_context_len=int(h[S.H_MAX_CONTEXT_LEN]),
            num_top_logprobs=int(h[S.H_NUM_TOP_LOGPROBS]), want_logprobs=bool(h[S.H_WANT_LOGPROBS]),
            all_greedy=bool(np.all(temperature <= 0)),
            any_truncation=bool(np.any((top_k > 0) | (top_p < 1))),
            any_min_p=bool(np.any(view.min_p[:rows] > 0)),
            any_banned=bool(np.any(view.banned_ids[:rows] >= 0)),
            any_bias=bool(np.any(view.bias_ids[:rows] >= 0)),
            history_len=int(h[S.H_HISTORY_LEN]),
        )


def buckets(limit: int, start: int, more: list[int] | None = None) -> list[int]:
    """Powers of two from ``start`` below ``limit``, then ``limit`` itself."""
    out, n = [], start
    while n < limit:
        out.append(n)
        n *= 2
    return sorted(set(out + (more or []) + [limit]))


class ModelRunner:
    def __init__(self, model: LlamaModel, attention: AttentionBackend, slots: DeviceSlots,
                 scratch_block: int, block_size: int, use_graphs: bool) -> None:
        shape = slots.layout.shape
        self.model, self.attention, self.slots = model, attention, slots
        self.scratch_block, self.block_size = scratch_block, block_size
        max_context = shape.max_blocks_per_row * block_size
        self.row_buckets = buckets(shape.max_num_rows, 1)
        # One graph per context bucket, unless the attention reads lengths on the device.
        self.ctx_buckets = [max_context] if attention.any_context else \
            buckets(max_context, min(256, max_context))
        self.use_graphs = use_graphs
        self.graphs: dict[tuple[int, int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.index = torch.arange(shape.max_num_rows + 1, device=slots.device)  # row numbers

    def run(self, k: int, info: BatchInfo) -> None:
        """Run slot ``k``'s batch and write its outputs into the slot's device buffer."""
        if not info.is_decode:
            self._sample(k, info, self._eager(k, info))
            return
        logits = self._decode(k, info)  # greedy samples written
        if not info.is_greedy_only:
            self._sample(k, info, logits[:info.num_rows])

    def _prev_outputs(self, k: int) -> dict:
        return self.slots.slots[(k - 1) % len(self.slots.slots)].outputs

    # --- decode: static shapes, graph replay on CUDA ---
    def _decode(self, k: int, info: BatchInfo) -> torch.Tensor:
        rows = self.row_buckets[bisect.bisect_left(self.row_buckets, info.num_rows)]
        ctx = self.ctx_buckets[bisect.bisect_left(self.ctx_buckets, info.max_context_len)]
        graph = self.graphs.get((k, rows, ctx))
        if graph is None:
            return self._decode_forward(k, rows, ctx)
        graph[0].replay()
        return graph[1]

    def _decode_forward(self, k: int, rows: int, ctx: int) -> torch.Tensor:
        """The decode step over ``rows`` rows: inputs, model, greedy samples. The logits."""
        ops, out = self.model.ops, self.slots.slots[k].outputs
        ids, positions, slot_mapping, context_lens, block_tables = ops.decode_inputs(
            self.slots.slots[k].inputs, self._prev_outputs(k)["sampled_ids"], rows,
            -(-ctx // self.block_size), self.scratch_block, self.block_size, out["out_header"])
        meta = AttentionMetadata(
            positions=positions, slot_mapping=slot_mapping, query_start=self.index[:rows + 1],
            context_lens=context_lens, block_tables=block_tables, token_rows=self.index[:rows],
            max_query_len=1, max_context_len=ctx,
        )
        logits = self.model.forward(ids, meta, self.attention, None)
        ops.argmax_into(logits, out["sampled_ids"][:rows])
        return logits

    def capture_graphs(self) -> int:
        """Capture every decode bucket of every slot (largest first), sharing one pool."""
        pool = torch.cuda.graph_pool_handle()
        for k in range(len(self.slots.slots)):
            for rows in reversed(self.row_buckets):
                for ctx in reversed(self.ctx_buckets):
                    self._decode_forward(k, rows, ctx)  # warm-up outside the graph
                    graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(graph, pool=pool):
                        logits = self._decode_forward(k, rows, ctx)
                    self.graphs[(k, rows, ctx)] = (graph, logits)
        torch.cuda.synchronize()
        return len(self.graphs)

    # --- everything else: eager ---
    def _eager(self, k: int, info: BatchInfo) -> torch.Tensor:
        v, n, r = self.slots.slots[k].inputs, info.num_tokens, info.num_rows
        ids = v["input_ids"][:n].long()
        if info.num_placeholders:
            p = info.num_placeholders
            src = v["placeholder_src"][:p].long()
            ids[v["placeholder_pos"][:p].long()] = self._prev_outputs(k)["sampled_ids"][src].long()
        query_start = v["query_start"][: r + 1].long()
        num_blocks = -(-info.max_context_len // self.block_size)
        meta = AttentionMetadata(
            positions=v["positions"][:n].long(), slot_mapping=v["slot_mapping"][:n].long(),
            query_start=query_start, context_lens=v["context_lens"][:r].long(),
            block_tables=v["block_tables"][:r, :num_blocks].long(),
            token_rows=torch.repeat_interleave(
                torch.arange(r, device=ids.device), query_start.diff(), output_size=n),
            max_query_len=info.max_query_len, max_context_len=info.max_context_len,
        )
        return self.model.forward(ids, meta, self.attention, query_start[1:] - 1)

    # --- sampling, into the slot's output buffer ---
    def _sample(self, k: int, info: BatchInfo, logits: torch.Tensor) -> None:
        v, o, r = self.slots.slots[k].inputs, self.slots.slots[k].outputs, info.num_rows
        batch = SamplingBatch(
            temperature=v["temperature"][:r], top_p=v["top_p"][:r], top_k=v["top_k"][:r].long(),
            seed=v["seed"][:r], position=v["context_lens"][:r].long(),
            num_top_logprobs=info.num_top_logprobs, want_logprobs=info.want_logprobs,
            all_greedy=info.all_greedy, any_truncation=info.any_truncation,
            banned_ids=v["banned_ids"][:r] if info.any_banned else None,
            min_p=v["min_p"][:r] if info.any_min_p else None,
            bias=(v["bias_ids"][:r], v["bias_values"][:r]) if info.any_bias else None,
            penalties=self._penalties(k, info))
        out = sample(logits, batch)
        o["sampled_ids"][:r].copy_(out.token_ids)
        if out.logprobs is not None:
            o["logprobs"][:r].copy_(out.logprobs)
        if out.top_ids is not None:
            n = out.top_ids.shape[1]
            o["top_ids"][:r, :n].copy_(out.top_ids)
            o["top_logprobs"][:r, :n].copy_(out.top_logprobs)
        o["out_header"][S.O_SEQ].fill_(info.seq)
        o["out_header"][S.O_NUM_ROWS].fill_(r)

    def _penalties(self, k: int, info: BatchInfo) -> Penalties | None:
        if not info.history_len:
            return None
        v, r = self.slots.slots[k].inputs, info.num_rows
        history = self.slots.slots[k].history[:r, : info.history_len].long()
        src = v["history_src"][:r].long()
        prev = self._prev_outputs(k)["sampled_ids"][src.clamp(min=0)].long()
        return Penalties(
            history=torch.where(history == -1, prev[:, None], history),
            prompt_lens=v["prompt_lens"][:r].long(),
            repetition=v["repetition_penalty"][:r], presence=v["presence_penalty"][:r],
            frequency=v["frequency_penalty"][:r])
