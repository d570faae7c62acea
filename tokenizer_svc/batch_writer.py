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
    """Fill the slot with ``plan``: per-row fields first, gathered in lists and written one
    array at a time (a numpy write per row and field costs ~1 µs, and this runs every step
    for every row), then the header, whose seq goes last."""
    rows, bs = plan.rows, blocks.block_size
    num_rows = len(rows)
    counts = [row.num_tokens for row in rows]
    query_start = np.zeros(num_rows + 1, dtype=np.int64)
    np.cumsum(counts, out=query_start[1:])
    t = int(query_start[-1])
    # tokens: ids, positions and KV slots, through each row's block table
    for r, row in enumerate(rows):
        table = blocks.table(row.req.req_id)
        view.block_tables[r, : len(table)] = table
    view.input_ids[:t] = [token for row in rows for token in row.token_ids]
    token_rows = np.repeat(np.arange(num_rows), counts)
    starts = np.fromiter((row.start for row in rows), dtype=np.int64, count=num_rows)
    positions = starts[token_rows] + np.arange(t) - query_start[:-1][token_rows]
    view.positions[:t] = positions
    view.slot_mapping[:t] = view.block_tables[token_rows, positions // bs] * bs + positions % bs
    placeholders = [(int(query_start[r]) + offset, src)
                    for r, row in enumerate(rows) for offset, src in row.placeholders]
    if placeholders:
        view.placeholder_pos[: len(placeholders)], view.placeholder_src[: len(placeholders)] = \
            zip(*placeholders, strict=True)
    # rows: sampling options and lengths
    opts = [row.req.options for row in rows]
    view.query_start[: num_rows + 1] = query_start
    context_lens = starts + counts
    view.context_lens[:num_rows] = context_lens
    view.temperature[:num_rows] = [o.temperature for o in opts]
    view.top_p[:num_rows] = [o.top_p for o in opts]
    view.top_k[:num_rows] = [o.top_k for o in opts]
    view.seed[:num_rows] = [o.seed for o in opts]
    top_n = [o.top_logprobs if o.logprobs else 0 for o in opts]
    view.num_top_logprobs[:num_rows] = top_n
    view.repetition_penalty[:num_rows] = [o.repetition_penalty for o in opts]
    view.presence_penalty[:num_rows] = [o.presence_penalty for o in opts]
    view.frequency_penalty[:num_rows] = [o.frequency_penalty for o in opts]
    view.prompt_lens[:num_rows] = [len(row.req.prompt_ids) for row in rows]
    view.banned_ids[:num_rows] = -1
    for r, row in enumerate(rows):
        banned = banned_ids(row.req, eos_token_ids) if row.samples else []
        if banned:
            view.banned_ids[r, : len(banned)] = banned
    h = view.header
    h[S.H_HISTORY_LEN] = _write_histories(view, plan)
    h[S.H_NUM_TOKENS], h[S.H_NUM_ROWS], h[S.H_NUM_PLACEHOLDERS] = t, num_rows, len(placeholders)
    h[S.H_PREV_SEQ], h[S.H_MAX_QUERY_LEN] = plan.prev_seq, max(counts, default=0)
    h[S.H_MAX_CONTEXT_LEN] = int(context_lens.max(initial=0))
    h[S.H_NUM_TOP_LOGPROBS], h[S.H_WANT_LOGPROBS] = max(top_n, default=0), int(
        any(o.logprobs for o in opts))
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
