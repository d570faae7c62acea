"""Scheduler, block manager and placeholder bookkeeping: plain Python, no torch."""

import subprocess
import sys
from pathlib import Path

import pytest

from tokenizer_svc.block_manager import BlockManager
from tokenizer_svc.request import Request, SamplingOptions, Status
from tokenizer_svc.scheduler import Scheduler, SchedulerLimits


def make_request(req_id, prompt_len, max_tokens=4, priority=0):
    return Request(req_id, list(range(100, 100 + prompt_len)), SamplingOptions(max_tokens),
                   arrival=0.0, priority=priority)


def make_scheduler(num_blocks=16, block_size=4, max_seqs=8, max_tokens=64, watermark=0):
    blocks = BlockManager(num_blocks, block_size)
    return Scheduler(SchedulerLimits(max_seqs, max_tokens, watermark), blocks)


def apply_outputs(plan, token=7):
    """What the engine does with a finished batch: resolve each sampling row's token."""
    for r, row in enumerate(plan.rows):
        if row.samples and row.req.status != Status.FINISHED:
            assert row.req.pending.popleft() == (plan.seq, r)
            row.req.output_ids.append(token)


def test_scheduling_code_imports_no_torch():
    code = ("import sys, tokenizer_svc.scheduler, tokenizer_svc.block_manager, "
            "tokenizer_svc.batch_writer; print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[2])
    assert out.stdout.strip() == "False"


def test_block_manager_allocates_and_frees():
    bm = BlockManager(num_blocks=4, block_size=4)
    assert bm.blocks_needed("a", 5) == 2
    table = bm.allocate("a", 5)
    assert len(table) == 2 and bm.num_free == 2
    assert bm.slot("a", 5) == table[1] * 4 + 1
    assert bm.allocate("a", 8) == table and bm.num_free == 2  # still fits in 2 blocks
    assert not bm.can_allocate("b", 9)
    with pytest.raises(MemoryError):
        bm.allocate("b", 9)
    assert bm.free("a") == 2 and bm.num_free == 4 and bm.usage == 0.0


def test_prefill_then_decode_with_placeholders():
    s = make_scheduler()
    req = make_request("a", prompt_len=6)
    s.add(req)
    p1 = s.schedule()
    (row,) = p1.rows
    assert (row.start, row.num_tokens, row.samples) == (0, 6, True)
    assert row.token_ids == req.prompt_ids and row.placeholders == []
    assert list(req.pending) == [(1, 0)]
    # Batch 1 is still running: batch 2 decodes the token it has not sampled yet.
    p2 = s.schedule()
    (row,) = p2.rows
    assert (row.start, row.num_tokens, row.token_ids) == (6, 1, [-1])
    assert row.placeholders == [(0, 0)] and p2.prev_seq == 1
    apply_outputs(p1)
    p3 = s.schedule()
    assert p3.rows[0].placeholders == [(0, 0)] and p3.prev_seq == 2
    apply_outputs(p2)
    apply_outputs(p3)
    assert req.output_ids == [7, 7, 7]


def test_sync_mode_never_needs_placeholders():
    s = make_scheduler()
    s.add(make_request("a", 5))
    s.add(make_request("b", 3))
    for _ in range(4):
        plan = s.schedule()
        assert plan.num_placeholders == 0 and plan.prev_seq == 0
        apply_outputs(plan)


def test_chunked_prefill_shares_the_token_budget():
    s = make_scheduler(num_blocks=64, max_tokens=8)
    s.add(make_request("a", 20))
    s.add(make_request("b", 2))
    plan = s.schedule()
    assert [(r.req.req_id, r.num_tokens, r.samples) for r in plan.rows] == [("a", 8, False)]
    apply_outputs(plan)
    plan = s.schedule()
    assert [(r.req.req_id, r.start, r.num_tokens) for r in plan.rows] == [("a", 8, 8)]
    apply_outputs(plan)
    plan = s.schedule()
    assert [(r.req.req_id, r.num_tokens, r.samples) for r in plan.rows] == [
        ("a", 4, True), ("b", 2, True)]


def test_decodes_go_before_new_prefills():
    s = make_scheduler(num_blocks=64, max_tokens=8)
    s.add(make_request("a", 4))
    apply_outputs(s.schedule())
    s.add(make_request("b", 30))
    plan = s.schedule()
    assert [(r.req.req_id, r.num_tokens) for r in plan.rows] == [("a", 1), ("b", 7)]


def test_max_tokens_stops_scheduling_before_the_last_token_arrives():
    s = make_scheduler()
    req = make_request("a", 3, max_tokens=2)
    s.add(req)
    p1, p2 = s.schedule(), s.schedule()
    assert p1.rows[0].samples and p2.rows[0].samples
    assert not req.wants_more_tokens and s.schedule() is None


def test_preemption_frees_blocks_and_recomputes():
    s = make_scheduler(num_blocks=4, block_size=4, max_tokens=64)
    a, b = make_request("a", 4, max_tokens=8), make_request("b", 4, max_tokens=8)
    s.add(a)
    s.add(b)
    plan = s.schedule()  # both prefilled: 2 blocks used, 2 free
    apply_outputs(plan)
    plan = s.schedule()  # each decodes position 4: a new block each, 0 free
    apply_outputs(plan)
    assert s.blocks.num_free == 0
    for _ in range(3):
        apply_outputs(s.schedule())
    # a needs a third block at position 8: b (the latest) is preempted
    plan = s.schedule()
    assert [r.req.req_id for r in plan.rows] == ["a"]
    assert b.status == Status.WAITING and b.num_computed == 0 and s.num_preemptions == 1
    assert s.blocks.table("b") == []
    apply_outputs(plan)


def test_preempted_request_with_token_in_flight_resumes_with_placeholder():
    s = make_scheduler(num_blocks=3, block_size=4, max_tokens=64)
    a, b = make_request("a", 4, max_tokens=8), make_request("b", 3, max_tokens=8)
    s.add(a)
    s.add(b)
    p1 = s.schedule()  # a: 1 block, b: 1 block; both sample
    p2 = s.schedule()  # a decodes pos 4 (new block, 0 free); b decodes pos 3 (fits)
    assert {r.req.req_id for r in p2.rows} == {"a", "b"}
    apply_outputs(p1)
    p3 = s.schedule()  # a fits (pos 5), b needs a block at pos 4: b is preempted
    assert [r.req.req_id for r in p3.rows] == ["a"] and b.status == Status.WAITING
    assert len(b.pending) == 1  # b's token from batch 2 is still in flight
    apply_outputs(p2)
    assert len(b.pending) == 0 and len(b.output_ids) == 2
    # b can return once a finishes and frees its blocks
    s.finish(a)
    p4 = s.schedule()
    (row,) = p4.rows
    assert row.req is b and row.start == 0 and row.num_tokens == 5 and row.samples
    assert row.token_ids == b.prompt_ids + b.output_ids and row.placeholders == []


def test_finish_frees_blocks_immediately():
    s = make_scheduler()
    req = make_request("a", 9)
    s.add(req)
    s.schedule()
    assert s.blocks.num_free == 16 - 3
    s.finish(req)
    assert s.blocks.num_free == 16 and req not in s.running and req.status == Status.FINISHED


def test_waits_for_blocks_instead_of_failing():
    s = make_scheduler(num_blocks=2, block_size=4, max_tokens=64)
    a, b = make_request("a", 8), make_request("b", 4)
    s.add(a)
    s.add(b)
    plan = s.schedule()
    assert [r.req.req_id for r in plan.rows] == ["a"] and list(s.waiting) == [b]


def test_row_limit():
    s = make_scheduler(num_blocks=64, max_seqs=2, max_tokens=64)
    for i in range(3):
        s.add(make_request(str(i), 2))
    assert len(s.schedule().rows) == 2 and len(s.waiting) == 1


def ids(requests):
    return [r.req_id for r in requests]


def test_higher_priority_is_admitted_first_and_arrival_breaks_ties():
    s = make_scheduler(num_blocks=64, max_seqs=1, max_tokens=64)
    for name, priority in (("a", 0), ("b", 1), ("c", 0), ("d", 1), ("e", -1)):
        s.add(make_request(name, 2, priority=priority))
    assert ids(s.waiting) == ["b", "d", "a", "c", "e"]
    assert ids(r.req for r in s.schedule().rows) == ["b"]


def test_a_higher_priority_request_preempts_the_lowest_running_one_for_a_row():
    s = make_scheduler(num_blocks=64, max_seqs=2, max_tokens=64)
    a, b = make_request("a", 2, max_tokens=8, priority=1), make_request("b", 2, max_tokens=8)
    s.add(a)
    s.add(b)
    apply_outputs(s.schedule())
    urgent = make_request("u", 3, priority=2)
    s.add(urgent)
    plan = s.schedule()
    # b (priority 0) goes, not a; the urgent request takes its row at once
    assert ids(r.req for r in plan.rows) == ["a", "u"] and s.num_preemptions == 1
    assert ids(s.running) == ["u", "a"] and ids(s.waiting) == ["b"]
    assert b.status == Status.WAITING and b.num_computed == 0 and s.blocks.table("b") == []


def test_a_higher_priority_request_preempts_for_blocks_but_an_equal_one_waits():
    s = make_scheduler(num_blocks=3, block_size=4, max_seqs=8, max_tokens=64)
    low = make_request("low", 8, max_tokens=8)
    s.add(low)
    apply_outputs(s.schedule())  # 2 blocks held, 1 free
    s.add(make_request("same", 8, priority=0))
    apply_outputs(s.schedule())
    assert ids(s.running) == ["low"] and s.num_preemptions == 0  # same priority: it waits
    s.add(make_request("high", 8, priority=1))
    plan = s.schedule()
    assert ids(r.req for r in plan.rows) == ["high"] and s.num_preemptions == 1
    # the preempted request is ahead of the other waiting one of its priority
    assert ids(s.waiting) == ["low", "same"]


def test_priority_orders_the_running_requests_and_the_victims_of_preemption():
    s = make_scheduler(num_blocks=4, block_size=4, max_seqs=8, max_tokens=64)
    s.add(make_request("a", 4, max_tokens=8, priority=0))
    apply_outputs(s.schedule())
    s.add(make_request("b", 4, max_tokens=8, priority=3))
    apply_outputs(s.schedule())  # a decodes, b is admitted behind it but runs ahead of it
    assert ids(s.running) == ["b", "a"]
    plan = s.schedule()
    assert ids(r.req for r in plan.rows) == ["b", "a"]
    while not s.num_preemptions:
        apply_outputs(plan)
        plan = s.schedule()
    # a needs a third block at position 8 first: admitted first, but of lower priority, it
    # is the one to go (in arrival order b would have been)
    assert ids(s.running) == ["b"] and ids(s.waiting) == ["a"] and s.num_preemptions == 1


def run_to_end(s, overlap):
    """Run every request to max_tokens as the engine does (``overlap``: batch N+1 planned
    before batch N's tokens are applied); returns the most KV blocks each request held."""
    held, in_flight = {}, []
    while s.has_work or in_flight:
        plan = s.schedule() if s.has_work else None
        if plan is not None:
            in_flight.append(plan)
            for req in s.running:
                held[req.req_id] = max(held.get(req.req_id, 0), len(s.blocks.table(req.req_id)))
        if in_flight and (len(in_flight) > 1 or plan is None or not overlap):
            done = in_flight.pop(0)
            apply_outputs(done)
            for row in done.rows:
                if len(row.req.output_ids) >= row.req.options.max_tokens:
                    s.finish(row.req)
    return held


@pytest.mark.parametrize("overlap", [False, True], ids=["sync", "async"])
@pytest.mark.parametrize("with_other", [False, True], ids=["alone", "preempting"])
def test_a_request_never_holds_kv_for_its_last_token(overlap, with_other):
    """prompt + max_tokens - 1 tokens of KV at most (the last sampled token is never fed
    back), with preemption and recompute too: what the engine's admission check counts."""
    s = make_scheduler(num_blocks=4, block_size=4, max_tokens=64, watermark=1)
    boundary = make_request("b", 5, max_tokens=8)  # 5 + 8 - 1 = 12: the 3 usable blocks
    if with_other:
        s.add(make_request("a", 2, max_tokens=6))
    s.add(boundary)
    held = run_to_end(s, overlap)
    assert len(boundary.output_ids) == 8 and held["b"] == 3
    assert (s.num_preemptions > 0) == with_other
