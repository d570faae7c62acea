"""Writes a :class:`BatchPlan` into a shared-memory slot (the fixed layout of
:mod:`tandem.slots`), ready for the worker to copy to the device."""

from __future__ import annotations

import numpy as np

from tandem import slots as S
from tokenizer_svc.block_manager import BlockManager
from tokenizer_svc.request import ending_eos
from tokenizer_svc.scheduler import BatchPlan, ScheduledRow


def banned_ids(req, eos_token_ids: frozenset[int]) -> list[int]:
    """Tokens this request's next sample may not be (min_tokens not reached yet): the ids
    that would end it, EOS (unless ignore_eos) and its stop_token_ids, each once.
    convert.sampling_options refuses a request with more than a row holds, so the cut (a
    guard against a crash) never drops one."""
    index = len(req.output_ids) + len(req.pending) - 1  # of the token being sampled
    if index >= req.options.min_tokens:
        return []
    ends = ending_eos(eos_token_ids, req.options.ignore_eos) | req.options.stop_token_ids
    return sorted(ends)[: S.MAX_BANNED_IDS]


def write_plan(view: S.SlotView, plan: BatchPlan, blocks: BlockManager,
               eos_token_ids: frozenset[int] = frozenset(),
               tables_written: list | None = None) -> None:
    """Fill the slot with ``plan``: the tokens, then the rows, then the header, whose seq
    goes last. Each field is written for all rows at once, from lists (a numpy write per
    row and field costs ~1 µs, and this runs every step for every row). The block tables
    are the exception: ``tables_written``, kept by the caller for this slot, lets each row's
    be written only from where it changed (see _write_block_tables)."""
    rows = plan.rows
    counts = [row.num_tokens for row in rows]
    query_start = np.zeros(len(rows) + 1, dtype=np.int64)
    np.cumsum(counts, out=query_start[1:])
    starts = np.fromiter((row.start for row in rows), dtype=np.int64, count=len(rows))
    num_placeholders = _write_tokens(view, rows, blocks, query_start, starts, tables_written)
    context_lens = starts + counts
    view.query_start[: len(rows) + 1] = query_start
    view.context_lens[: len(rows)] = context_lens
    opts = [row.req.options for row in rows]
    top_n = _write_sampling(view, rows, opts, eos_token_ids)
    h = view.header
    h[S.H_HISTORY_LEN] = _write_histories(view, plan)
    h[S.H_NUM_TOKENS], h[S.H_NUM_ROWS] = int(query_start[-1]), len(rows)
    h[S.H_NUM_PLACEHOLDERS], h[S.H_PREV_SEQ] = num_placeholders, plan.prev_seq
    h[S.H_MAX_QUERY_LEN] = max(counts, default=0)
    h[S.H_MAX_CONTEXT_LEN] = int(context_lens.max(initial=0))
    h[S.H_NUM_TOP_LOGPROBS] = top_n
    h[S.H_WANT_LOGPROBS] = int(any(o.logprobs for o in opts))
    h[S.H_SEQ] = plan.seq  # last: the header's seq names a complete batch


def _write_block_tables(tables: np.ndarray, rows: list[ScheduledRow], blocks: BlockManager,
                        written: list | None) -> None:
    """Each row's block table. ``written[r]`` is the table list and length that row ``r`` of
    this slot got last time. A request's table only grows while it exists (one that lets go
    of its blocks gets a new list), so a row that holds the same list again needs only the
    blocks added since: one every block_size tokens. Whole tables cost ~1 µs a row at a
    1K context and grow with it."""
    if written is None:
        written = []
    written.extend([None] * (len(rows) - len(written)))
    for r, row in enumerate(rows):
        table = blocks.table(row.req.req_id)
        last, n = written[r], len(table)
        start = last[1] if last is not None and last[0] is table and last[1] <= n else 0
        if start < n:
            tables[r, start:n] = table[start:]
        written[r] = (table, n)


def _write_tokens(view: S.SlotView, rows: list[ScheduledRow], blocks: BlockManager,
                  query_start: np.ndarray, starts: np.ndarray,
                  tables_written: list | None = None) -> int:
    """Ids, positions and KV slots of every token (through its row's block table), and the
    placeholders; returns how many placeholders there are."""
    bs, t = blocks.block_size, int(query_start[-1])
    _write_block_tables(view.block_tables, rows, blocks, tables_written)
    view.input_ids[:t] = [token for row in rows for token in row.token_ids]
    token_rows = np.repeat(np.arange(len(rows)), query_start[1:] - query_start[:-1])
    positions = starts[token_rows] + np.arange(t) - query_start[:-1][token_rows]
    view.positions[:t] = positions
    view.slot_mapping[:t] = view.block_tables[token_rows, positions // bs] * bs + positions % bs
    placeholders = [(int(query_start[r]) + offset, src)
                    for r, row in enumerate(rows) for offset, src in row.placeholders]
    if placeholders:
        view.placeholder_pos[: len(placeholders)], view.placeholder_src[: len(placeholders)] = \
            zip(*placeholders, strict=True)
    return len(placeholders)


def _write_sampling(view: S.SlotView, rows: list[ScheduledRow], opts: list,
                    eos_token_ids: frozenset[int]) -> int:
    """Each row's sampling options, prompt length and banned tokens; returns the most top
    logprobs any row wants."""
    n = len(rows)
    view.temperature[:n] = [o.temperature for o in opts]
    view.top_p[:n] = [o.top_p for o in opts]
    view.top_k[:n] = [o.top_k for o in opts]
    view.min_p[:n] = [o.min_p for o in opts]
    view.seed[:n] = [o.seed for o in opts]
    top_n = [o.top_logprobs if o.logprobs else 0 for o in opts]
    view.num_top_logprobs[:n] = top_n
    view.repetition_penalty[:n] = [o.repetition_penalty for o in opts]
    view.presence_penalty[:n] = [o.presence_penalty for o in opts]
    view.frequency_penalty[:n] = [o.frequency_penalty for o in opts]
    view.prompt_lens[:n] = [len(row.req.prompt_ids) for row in rows]
    view.banned_ids[:n] = -1
    view.bias_ids[:n] = -1
    for r, row in enumerate(rows):
        banned = banned_ids(row.req, eos_token_ids) if row.samples else []
        if banned:
            view.banned_ids[r, : len(banned)] = banned
        bias = row.req.options.logit_bias[: S.MAX_LOGIT_BIAS] if row.samples else ()
        if bias:
            view.bias_ids[r, : len(bias)], view.bias_values[r, : len(bias)] = zip(*bias,
                                                                                strict=True)
    return max(top_n, default=0)


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
