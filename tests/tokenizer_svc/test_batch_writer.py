"""The batch writer against a row-by-row reference, byte for byte, over async schedules
with chunked prefills, placeholders, sampling options, bans and penalty histories."""

from __future__ import annotations

import numpy as np
import pytest

from tandem import slots as S
from tokenizer_svc.batch_writer import _write_histories, banned_ids, write_plan
from tokenizer_svc.block_manager import BlockManager
from tokenizer_svc.request import Request, SamplingOptions, Status
from tokenizer_svc.scheduler import Scheduler, SchedulerLimits

EOS = frozenset({2})


def reference_write(view, plan, blocks, eos_token_ids):
    """The writer's meaning, one row and one field at a time."""
    bs, t, k = blocks.block_size, 0, 0
    for r, row in enumerate(plan.rows):
        n, end = row.num_tokens, row.start + row.num_tokens
        table = blocks.table(row.req.req_id)
        for i, pos in enumerate(range(row.start, end)):
            view.input_ids[t + i] = row.token_ids[i]
            view.positions[t + i] = pos
            view.slot_mapping[t + i] = table[pos // bs] * bs + pos % bs
        for offset, src_row in row.placeholders:
            view.placeholder_pos[k], view.placeholder_src[k] = t + offset, src_row
            k += 1
        view.block_tables[r, : len(table)] = table
        view.query_start[r] = t
        t += n
        view.query_start[r + 1] = t
        view.context_lens[r] = end
        o = row.req.options
        view.temperature[r], view.top_p[r], view.top_k[r], view.seed[r] = (
            o.temperature, o.top_p, o.top_k, o.seed)
        view.min_p[r] = o.min_p
        view.num_top_logprobs[r] = o.top_logprobs if o.logprobs else 0
        view.repetition_penalty[r] = o.repetition_penalty
        view.presence_penalty[r], view.frequency_penalty[r] = o.presence_penalty, \
            o.frequency_penalty
        view.prompt_lens[r] = len(row.req.prompt_ids)
        view.banned_ids[r, :] = -1
        banned = banned_ids(row.req, eos_token_ids) if row.samples else []
        view.banned_ids[r, : len(banned)] = banned
        view.bias_ids[r, :] = -1
        for j, (token_id, bias) in enumerate(o.logit_bias if row.samples else ()):
            view.bias_ids[r, j], view.bias_values[r, j] = token_id, bias
    h = view.header
    h[S.H_HISTORY_LEN] = _write_histories(view, plan)
    h[S.H_NUM_TOKENS], h[S.H_NUM_ROWS], h[S.H_NUM_PLACEHOLDERS] = t, len(plan.rows), k
    h[S.H_PREV_SEQ] = plan.prev_seq
    h[S.H_MAX_QUERY_LEN] = max(row.num_tokens for row in plan.rows)
    h[S.H_MAX_CONTEXT_LEN] = max(row.start + row.num_tokens for row in plan.rows)
    opts = [row.req.options for row in plan.rows]
    h[S.H_NUM_TOP_LOGPROBS] = max(o.top_logprobs if o.logprobs else 0 for o in opts)
    h[S.H_WANT_LOGPROBS] = int(any(o.logprobs for o in opts))
    h[S.H_SEQ] = plan.seq


REQUESTS = [
    (10, SamplingOptions(6, temperature=0.0)),
    (25, SamplingOptions(5, temperature=0.7, top_p=0.9, top_k=5, seed=3, logprobs=True,
                         top_logprobs=2, min_p=0.1)),
    (3, SamplingOptions(6, min_tokens=3, stop_token_ids=frozenset({5, 9}),
                        repetition_penalty=1.3)),
    (7, SamplingOptions(4, presence_penalty=0.5, frequency_penalty=0.25,
                        logit_bias=((3, -2.5), (70, 100.0)))),
    (1, SamplingOptions(3, logprobs=True)),
]


@pytest.fixture
def segments():
    shape = S.SlotShape(max_num_tokens=16, max_num_rows=4, max_blocks_per_row=12,
                        max_top_logprobs=4, block_size=4)
    made = [S.SlotSegment(S.SlotLayout(shape, 2), create=True) for _ in range(2)]
    yield made
    for segment in made:
        segment.close()


@pytest.mark.parametrize("num_blocks", [64, 12], ids=["roomy", "preempting"])
@pytest.mark.parametrize("incremental", [False, True], ids=["whole-tables", "incremental"])
def test_writer_matches_the_row_by_row_reference(segments, num_blocks, incremental):
    """``incremental``: block tables written only where they changed, as the engine does
    (a slot's rows are reused by other requests, tables grow, and preempted requests get
    new blocks)."""
    blocks = BlockManager(num_blocks, 4)
    scheduler = Scheduler(SchedulerLimits(4, 16, 0), blocks)
    written = [[], []] if incremental else [None, None]
    for i, (prompt_len, options) in enumerate(REQUESTS):
        scheduler.add(Request(f"r{i}", list(range(100 + i, 100 + i + prompt_len)), options, 0.0))
    in_flight, seen_placeholders, batches = [], 0, 0
    while scheduler.has_work or in_flight:
        plan = scheduler.schedule() if scheduler.has_work else None
        if plan is not None:
            slot = plan.seq % 2
            write_plan(segments[0].slots[slot], plan, blocks, EOS, written[slot])
            reference_write(segments[1].slots[slot], plan, blocks, EOS)
            ours, theirs = segments[0].slots[slot], segments[1].slots[slot]
            assert np.array_equal(ours.input_bytes, theirs.input_bytes), f"batch {plan.seq}"
            assert np.array_equal(ours.history, theirs.history)
            seen_placeholders += plan.num_placeholders
            batches += 1
            in_flight.append(plan)
        if len(in_flight) > (1 if plan is not None else 0):  # async: one batch behind
            done = in_flight.pop(0)
            for r, row in enumerate(done.rows):
                if row.samples and row.req.status != Status.FINISHED:
                    assert row.req.pending.popleft() == (done.seq, r)
                    row.req.output_ids.append(40 + r)
                    if len(row.req.output_ids) >= row.req.options.max_tokens:
                        scheduler.finish(row.req)
    assert batches > 5 and seen_placeholders > 0
    assert (scheduler.num_preemptions > 0) == (num_blocks == 12)


def sampling_request(min_tokens, stop_token_ids, ignore_eos=False):
    req = Request("r", [5, 6], SamplingOptions(20, min_tokens=min_tokens,
                                               stop_token_ids=frozenset(stop_token_ids),
                                               ignore_eos=ignore_eos), 0.0)
    req.pending.append((1, 0))  # the first token is being sampled
    return req


def test_min_tokens_bans_each_end_once_up_to_a_full_row():
    stops = range(1000, 1000 + S.MAX_BANNED_IDS - 1)  # with EOS: exactly a row's worth
    assert banned_ids(sampling_request(3, stops), EOS) == [2, *stops]
    assert banned_ids(sampling_request(3, {2, 9}), EOS) == [2, 9]  # a stop id that is EOS
    assert banned_ids(sampling_request(1, {9}), frozenset({2, 9, 3})) == [2, 3, 9]
    assert banned_ids(sampling_request(0, stops), EOS) == []  # no min_tokens: no bans


def test_min_tokens_with_ignore_eos_bans_only_the_stop_ids():
    """EOS ends nothing under ignore_eos, so min_tokens has no reason to ban it."""
    assert banned_ids(sampling_request(3, {9}, ignore_eos=True), EOS) == [9]
    assert banned_ids(sampling_request(3, (), ignore_eos=True), EOS) == []
