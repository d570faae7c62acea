"""Writes a :class:`BatchPlan` into a shared-memory slot (the fixed layout of
:mod:`tandem.slots`), ready for the worker to copy to the device."""

from __future__ import annotations

import numpy as np

from tandem import slots as S
from tokenizer_svc.block_manager import BlockManager
from tokenizer_svc.scheduler import BatchPlan


def banned_ids(req, eos_token_ids: frozenset[int]) -> list[int]:
    """Tokens this request's next sample may not be (min_tokens not reached yet)."""
    index = len(req.output_ids) + len(req.pending) - 1  # of the token being sampled
    if index >= req.options.min_tokens:
        return []
    stops = sorted(req.options.stop_token_ids)
    return (sorted(eos_token_ids) + stops)[: S.MAX_BANNED_IDS]


def write_plan(view: S.SlotView, plan: BatchPlan, blocks: BlockManager,
               eos_token_ids: frozenset[int] = frozenset()) -> None:
    bs = blocks.block_size
    t = k = 0
    max_ctx = max_q = top_n = 0
    want_logprobs = False
    view.query_start[0] = 0
    for r, row in enumerate(plan.rows):
        n, end = row.num_tokens, row.start + row.num_tokens
        table = np.asarray(blocks.table(row.req.req_id), dtype=np.int32)
        positions = np.arange(row.start, end, dtype=np.int32)
        view.input_ids[t : t + n] = row.token_ids
        view.positions[t : t + n] = positions
        view.slot_mapping[t : t + n] = table[positions // bs] * bs + positions % bs
        for offset, src_row in row.placeholders:
            view.placeholder_pos[k], view.placeholder_src[k] = t + offset, src_row
            k += 1
        view.block_tables[r, : len(table)] = table
        t += n
        view.query_start[r + 1] = t
        view.context_lens[r] = end
        opts = row.req.options
        view.temperature[r], view.top_p[r], view.top_k[r] = opts.temperature, opts.top_p, opts.top_k
        view.seed[r] = opts.seed
        view.num_top_logprobs[r] = opts.top_logprobs if opts.logprobs else 0
        view.repetition_penalty[r] = opts.repetition_penalty
        view.presence_penalty[r], view.frequency_penalty[r] = (opts.presence_penalty,
                                                                opts.frequency_penalty)
        view.prompt_lens[r] = len(row.req.prompt_ids)
        banned = banned_ids(row.req, eos_token_ids) if row.samples else []
        view.banned_ids[r, :] = -1
        view.banned_ids[r, : len(banned)] = banned
        want_logprobs |= opts.logprobs
        top_n = max(top_n, int(view.num_top_logprobs[r]))
        max_ctx, max_q = max(max_ctx, end), max(max_q, n)
    h = view.header
    h[S.H_HISTORY_LEN] = _write_histories(view, plan)
    h[S.H_NUM_TOKENS], h[S.H_NUM_ROWS], h[S.H_NUM_PLACEHOLDERS] = t, len(plan.rows), k
    h[S.H_PREV_SEQ], h[S.H_MAX_QUERY_LEN], h[S.H_MAX_CONTEXT_LEN] = plan.prev_seq, max_q, max_ctx
    h[S.H_NUM_TOP_LOGPROBS], h[S.H_WANT_LOGPROBS] = top_n, int(want_logprobs)
    h[S.H_SEQ] = plan.seq  # last: the header's seq names a complete batch


def _write_histories(view: S.SlotView, plan: BatchPlan) -> int:
    """Token histories of the penalised rows that sample; returns their length (0: none).

    A row's history is every token up to its last input token; when that one is a
    placeholder it is written as -1 and the worker fills it from ``history_src``.
    """
    rows = [(r, row) for r, row in enumerate(plan.rows)
            if row.samples and row.req.options.has_penalties]
    if not rows:
        return 0
    length = max(row.start + row.num_tokens for _, row in rows)
    view.history[: len(plan.rows), :length] = -2
    for r, row in rows:
        end = row.start + row.num_tokens
        known = row.req.known_ids(0, end)
        view.history[r, : len(known)] = known
        if len(known) < end:  # the last input token is still a placeholder
            view.history[r, end - 1] = -1
            view.history_src[r] = row.placeholders[-1][1]
    return length
