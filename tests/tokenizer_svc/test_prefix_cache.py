"""Prefix caching: the block manager's registry and the scheduler's use of it. No torch."""

import pytest

from tokenizer_svc.block_manager import BlockManager, block_digests
from tokenizer_svc.request import Request, SamplingOptions, Status
from tokenizer_svc.scheduler import Scheduler, SchedulerLimits

BS = 4


def tokens(n, first=100):
    return list(range(first, first + n))


def computed(bm, req_id, toks):
    """The engine's part: the batch that wrote ``toks``' KV has completed."""
    bm.register(req_id, len(toks), lambda a, b: toks[a:b], [])


def accounted(bm):
    """Every block is in exactly one place: a table, the free list or the evictable LRU."""
    held = {b for t in bm._tables.values() for b in t}
    free, lru = set(bm._free), set(bm._evictable)
    assert not (held & free) and not (held & lru) and not (free & lru)
    assert held | free | lru == set(range(bm.num_blocks))
    for b in range(bm.num_blocks):
        assert bm._refs[b] == sum(t.count(b) for t in bm._tables.values())
    assert set(bm._cached.values()) == set(bm._digest_of)


def test_digests_chain_over_the_whole_prefix():
    a = block_digests(tokens(8), BS, 2)
    b = block_digests(tokens(4, first=0) + tokens(4, first=104), BS, 2)
    assert a[0] != b[0] and a[1] != b[1]  # same second block, different prefix
    assert block_digests(tokens(8), BS, 2) == a
    assert block_digests(tokens(4, first=104), BS, 1, parent=a[0]) == a[1:]


def test_registered_blocks_serve_a_later_prompt_with_the_same_prefix():
    bm = BlockManager(8, BS)
    prompt = tokens(10)
    table = list(bm.allocate("a", 10))
    computed(bm, "a", prompt)
    assert bm.num_cached == 2  # two full blocks; the third holds 2 of 4 tokens
    blocks, _ = bm.match_prefix(prompt)
    assert blocks == table[:2]
    assert bm.match_prefix(prompt[:8])[0] == table[:1]  # the last token is always computed
    assert bm.match_prefix(tokens(4, first=0) + prompt[4:])[0] == []
    assert bm.match_prefix(prompt[:4] + tokens(6, first=0))[0] == table[:1]
    bm.adopt("b", blocks)
    bm.allocate("b", 12)
    assert bm.table("b")[:2] == table[:2] and bm._refs[table[0]] == 2
    accounted(bm)


def test_released_cached_blocks_wait_and_are_evicted_tail_first():
    bm = BlockManager(4, BS)
    prompt = tokens(10)
    table = list(bm.allocate("a", 10))
    computed(bm, "a", prompt)
    bm.free("a")
    assert bm.num_free == 4 and bm.num_cached == 2 and bm.usage == 0.0
    assert bm.match_prefix(prompt)[0] == table[:2]  # still there after its owner left
    accounted(bm)
    bm.allocate("x", 3 * BS)  # the two plain free blocks, then the LRU: the tail goes first
    assert bm.num_cached == 1 and bm.match_prefix(prompt)[0] == table[:1]
    accounted(bm)
    bm.allocate("x", 4 * BS)
    assert bm.num_cached == 0 and bm.match_prefix(prompt)[0] == []
    with pytest.raises(MemoryError):
        bm.allocate("y", 2 * BS)
    accounted(bm)


def test_a_block_someone_else_already_caches_stays_private():
    bm = BlockManager(8, BS)
    prompt = tokens(9)
    first = list(bm.allocate("a", 9))
    second = list(bm.allocate("b", 9))  # same prompt, computed at the same time
    computed(bm, "a", prompt)
    computed(bm, "b", prompt)
    assert bm.num_cached == 2 and bm.match_prefix(prompt)[0] == first[:2]
    bm.free("b")
    assert set(second) <= set(bm._free)  # not cached: plainly free again
    accounted(bm)


def test_register_is_incremental_and_ignores_requests_that_left():
    bm = BlockManager(8, BS)
    seq = tokens(12)
    bm.allocate("a", 12)
    calls = []

    def ids(a, b):
        calls.append((a, b))
        return seq[a:b]

    known: list[bytes] = []
    bm.register("a", 5, ids, known)
    bm.register("a", 7, ids, known)  # no new full block: nothing to hash
    bm.register("a", 12, ids, known)
    assert calls == [(0, 4), (4, 12)] and bm.num_cached == 3
    bm.free("a")
    bm.register("a", 12, ids, known)  # preempted or finished meanwhile: its blocks are not its own
    assert len(calls) == 2


def test_off_means_no_registry():
    bm = BlockManager(8, BS, prefix_caching=False)
    bm.allocate("a", 10)
    computed(bm, "a", tokens(10))
    assert bm.num_cached == 0 and bm.match_prefix(tokens(10)) == ([], [])
    bm.free("a")
    assert len(bm._free) == 8


# --- the scheduler ---

def make_request(req_id, prompt, max_tokens=2):
    return Request(req_id, list(prompt), SamplingOptions(max_tokens), arrival=0.0)


def run_batch(s, plan, token=7):
    """Complete ``plan`` as the engine does: register the KV written, apply samples."""
    for r, row in enumerate(plan.rows):
        req = row.req
        s.written(row)
        if req.status == Status.FINISHED:
            continue
        if row.samples:
            assert req.pending.popleft() == (plan.seq, r)
            req.output_ids.append(token)
            if not req.wants_more_tokens and not req.pending:
                s.finish(req)


def make_scheduler(num_blocks=16, **kw):
    return Scheduler(SchedulerLimits(8, 64, 0), BlockManager(num_blocks, BS, **kw))


def test_a_repeated_prompt_computes_only_what_is_not_cached():
    s = make_scheduler()
    prompt = tokens(10)
    a = make_request("a", prompt)
    s.add(a)
    while s.has_work:
        run_batch(s, s.schedule())
    assert a.status == Status.FINISHED
    b = make_request("b", prompt)
    s.add(b)
    (row,) = s.schedule().rows
    assert (row.start, row.num_tokens, row.token_ids) == (8, 2, prompt[8:])
    assert (s.prefix_queried_tokens, s.prefix_hit_tokens) == (20, 8)


def test_requests_running_together_share_blocks():
    s = make_scheduler()
    prompt = tokens(13)
    a = make_request("a", prompt, max_tokens=4)
    s.add(a)
    run_batch(s, s.schedule())  # a's prompt is cached now, a still decodes
    b = make_request("b", prompt[:12] + [1, 2, 3])
    s.add(b)
    plan = s.schedule()
    row_b = next(r for r in plan.rows if r.req is b)
    assert row_b.start == 12 and s.blocks.table("b")[:3] == s.blocks.table("a")[:3]
    run_batch(s, plan)
    while s.has_work:
        run_batch(s, s.schedule())
    assert s.blocks.num_free == s.blocks.num_blocks
    accounted(s.blocks)


def test_a_preempted_request_comes_back_to_its_own_cached_blocks():
    s = make_scheduler(num_blocks=4)
    a = make_request("a", tokens(9), max_tokens=8)
    s.add(a)
    run_batch(s, s.schedule())  # 9 prompt tokens (3 blocks), 1 sampled
    s._preempt(a)
    assert a.status == Status.WAITING and s.blocks.num_cached == 2
    (row,) = s.schedule().rows
    assert row.req is a and row.start == 8  # blocks 0 and 1 came back from the cache
    assert row.token_ids == [108, 7]
    accounted(s.blocks)


def test_no_room_after_adopting_gives_the_blocks_back():
    s = make_scheduler(num_blocks=4)
    prompt = tokens(9)
    a = make_request("a", prompt, max_tokens=1)
    s.add(a)
    run_batch(s, s.schedule())
    assert a.status == Status.FINISHED and s.blocks.num_cached == 2
    hog = make_request("hog", tokens(8, first=500), max_tokens=8)
    s.add(hog)
    run_batch(s, s.schedule())  # hog holds the 2 plain free blocks
    b = make_request("b", prompt + tokens(8, first=900))  # 5 blocks: 2 cached + 3 more
    s.add(b)
    plan = s.schedule()  # hog's decode takes a third block: the cached tail is evicted
    assert [r.req for r in plan.rows] == [hog]
    assert b.status == Status.WAITING and b.num_computed == 0 and not s.blocks.table("b")
    assert s.blocks.match_prefix(prompt)[0] == [s.blocks._cached[k] for k in
                                                block_digests(prompt, BS, 1)]
    accounted(s.blocks)  # the head block b let go of is evictable again


def test_a_row_planned_before_a_preemption_registers_nothing_after_it():
    """Batch 1 is still in flight when its request is preempted and taken back with a new
    table: batch 1's completion must not register that new table's blocks."""
    s = make_scheduler(num_blocks=8)
    a = make_request("a", tokens(9), max_tokens=4)
    s.add(a)
    first = s.schedule()  # a's prompt, 3 blocks; in flight
    s._preempt(a)  # taken back before batch 1 completes: blocks freed, not registered
    second = s.schedule()  # a again, from scratch, into blocks it may get in any order
    assert second.rows[0].admission == first.rows[0].admission + 1
    s.written(first.rows[0])  # batch 1 completes
    assert s.blocks.num_cached == 0
    s.written(second.rows[0])
    assert s.blocks.num_cached == 2
    accounted(s.blocks)


def test_a_waiting_request_hashes_each_block_once(monkeypatch):
    import tokenizer_svc.block_manager as bm_module

    bm = BlockManager(8, BS)
    prompt = tokens(13)
    bm.allocate("a", 13)
    computed(bm, "a", prompt[:8] + [0] * 5)  # caches the first two blocks only
    hashed = []
    real = bm_module.block_digests
    monkeypatch.setattr(bm_module, "block_digests",
                        lambda toks, *a, **kw: hashed.append(1) or real(toks, *a, **kw))
    known: list[bytes] = []
    first = bm.match_prefix(prompt, known)
    assert len(first[0]) == 2 and len(hashed) == 3  # two hits and the miss that ends the walk
    assert bm.match_prefix(prompt, known) == first and len(hashed) == 3  # nothing hashed again
    assert known == block_digests(prompt, BS, 3)
