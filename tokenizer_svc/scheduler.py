"""Continuous batching over the paged KV cache. Plain Python, no torch.

Each step shares one token budget between the running requests (decodes and
continuing prefill chunks) and then the waiting ones (new or preempted requests,
prefilled in chunks). Both lists are kept in priority order, higher first, and in
arrival order within a priority (the waiting list) or admission order (the running
one). A running request that cannot get a block preempts the last running one: its
blocks are freed and it goes back to the front of its priority's queue, to be
recomputed later. A waiting request that cannot be admitted (no row or no blocks
free) preempts running requests of strictly lower priority until it can.

A request admitted from the queue first takes the cached blocks that hold the
longest whole-block prefix of its tokens (prefix caching, see
:mod:`tokenizer_svc.block_manager`): its computation starts after them.

In async mode a step is planned while the previous one is still running: a
request's next input token may be one that the previous batch has not sampled
yet. The plan then carries a *placeholder* for it: the position in the batch,
and the row of the previous batch whose output fills it.
"""

from __future__ import annotations

import dataclasses
from collections import deque

from tokenizer_svc.block_manager import BlockManager
from tokenizer_svc.request import Request, Status


@dataclasses.dataclass(frozen=True)
class SchedulerLimits:
    max_num_seqs: int = 64  # rows of one batch, and requests holding KV blocks
    max_num_batched_tokens: int = 2048  # token budget of one batch
    watermark_blocks: int = 1  # blocks kept free when admitting a new request

    def __post_init__(self) -> None:
        if self.max_num_seqs < 1 or self.max_num_batched_tokens < self.max_num_seqs:
            raise ValueError("need max_num_seqs >= 1 and max_num_batched_tokens >= max_num_seqs")


@dataclasses.dataclass
class ScheduledRow:
    req: Request
    start: int  # position of the row's first token
    num_tokens: int
    samples: bool  # the row's last token yields a new token for the request
    token_ids: list[int]  # [num_tokens]; -1 where a placeholder goes
    placeholders: list[tuple[int, int]]  # (offset in row, row of the previous batch)
    admission: int  # req.num_admissions when planned: the block table the row writes


@dataclasses.dataclass
class BatchPlan:
    seq: int
    rows: list[ScheduledRow]
    prev_seq: int  # the batch that placeholders refer to (0: none)

    @property
    def num_tokens(self) -> int:
        return sum(r.num_tokens for r in self.rows)

    @property
    def num_placeholders(self) -> int:
        return sum(len(r.placeholders) for r in self.rows)


def _insert(queue: deque[Request] | list[Request], req: Request, first: bool) -> None:
    """Put ``req`` into ``queue``, which is in priority order (higher first): behind the
    requests of its priority, or ahead of them if ``first``."""
    if first:
        i = next((i for i, r in enumerate(queue) if r.priority <= req.priority), len(queue))
    else:
        i = len(queue)
        while i and queue[i - 1].priority < req.priority:
            i -= 1
    queue.insert(i, req)


class Scheduler:
    def __init__(self, limits: SchedulerLimits, blocks: BlockManager) -> None:
        self.limits = limits
        self.blocks = blocks
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.next_seq = 1
        self.num_preemptions = 0
        self.prefix_queried_tokens = 0  # known tokens of admitted requests
        self.prefix_hit_tokens = 0  # of those, found in the prefix cache

    @property
    def has_work(self) -> bool:
        return bool(self.waiting) or any(r.wants_more_tokens for r in self.running)

    def add(self, req: Request) -> None:
        _insert(self.waiting, req, first=False)

    def written(self, row: ScheduledRow) -> None:
        """The batch of ``row`` has completed: its tokens' KV is in the cache, and the full
        blocks among them can serve other requests. Not if the request has left, or was
        preempted since: the blocks the row wrote are no longer its own."""
        req = row.req
        if req.status != Status.FINISHED and row.admission == req.num_admissions:
            self.blocks.register(req.req_id, row.start + row.num_tokens, req.known_ids,
                                 req.block_digests)

    def finish(self, req: Request) -> None:
        """Take a finished or aborted request out and free its blocks."""
        req.status = Status.FINISHED
        if req in self.running:
            self.running.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)
        self.blocks.free(req.req_id)

    def schedule(self) -> BatchPlan | None:
        """Plan the next batch, or None when no request has work that can run."""
        plan = BatchPlan(self.next_seq, [], prev_seq=self.next_seq - 1)
        budget = self.limits.max_num_batched_tokens
        preempted: list[Request] = []
        self._make_way(preempted)
        budget = self._schedule_running(plan, budget, preempted)
        self._schedule_waiting(plan, budget, preempted)
        if not plan.rows:
            return None
        self.next_seq += 1
        if not plan.num_placeholders:
            plan.prev_seq = 0
        return plan

    def _schedule_running(self, plan: BatchPlan, budget: int, preempted: list) -> int:
        i = 0
        while i < len(self.running) and budget > 0 and len(plan.rows) < self.limits.max_num_seqs:
            req = self.running[i]
            n = min(req.num_total - req.num_computed, budget) if req.wants_more_tokens else 0
            if n and not self._make_room(req, req.num_computed + n, preempted):
                break  # req itself was preempted: nothing after it is left either
            if n:
                self._add_row(plan, req, n)
                budget -= n
            i += 1
        return budget

    def _make_room(self, req: Request, num_tokens: int, preempted: list) -> bool:
        """Preempt from the back until ``req`` can hold ``num_tokens``; False if
        ``req`` had to go itself."""
        blocks = self.blocks
        while (need := blocks.blocks_needed(req.req_id, num_tokens)) > blocks.num_free:
            victim = self.running[-1]
            self._preempt(victim)
            preempted.append(victim)
            if victim is req:
                return False
        if need:  # a decoding request needs a block only every block_size tokens
            blocks.allocate(req.req_id, num_tokens)
        return True

    def _make_way(self, preempted: list) -> None:
        """Preempt running requests of lower priority than the head of the queue, last
        first, until the head has a row and the blocks of its first chunk (counted
        without its cached prefix: this may free a little more than it needs)."""
        limits, blocks = self.limits, self.blocks
        while self.waiting and self.running:
            head, victim = self.waiting[0], self.running[-1]
            if victim.priority >= head.priority or not head.wants_more_tokens:
                return
            chunk = min(head.num_total, limits.max_num_batched_tokens)
            if (len(self.running) < limits.max_num_seqs
                    and blocks.can_allocate(head.req_id, chunk, limits.watermark_blocks)):
                return
            self._preempt(victim)
            preempted.append(victim)

    def _preempt(self, req: Request) -> None:
        """Free ``req``'s blocks and queue it ahead of the waiting requests of its priority."""
        self.running.remove(req)
        self.blocks.free(req.req_id)
        req.num_computed = 0
        req.status = Status.WAITING
        _insert(self.waiting, req, first=True)
        self.num_preemptions += 1

    def _schedule_waiting(self, plan: BatchPlan, budget: int, preempted: list) -> None:
        limits = self.limits
        while self.waiting and budget > 0 and len(plan.rows) < limits.max_num_seqs:
            req = self.waiting[0]
            if not req.wants_more_tokens:  # preempted with its last token in flight:
                self.waiting.popleft()  # nothing to recompute; it finishes on arrival
                continue
            if req in preempted or len(self.running) >= limits.max_num_seqs:
                break
            req.num_computed = self._take_cached_prefix(req)
            n = min(req.num_total - req.num_computed, budget)
            reserve = limits.watermark_blocks
            if not self.blocks.can_allocate(req.req_id, req.num_computed + n, reserve):
                self.blocks.free(req.req_id)  # its cached prefix too, until it gets room
                req.num_computed = 0
                break  # wait for blocks; the head of the queue goes first
            self._count_prefix_hit(req)
            req.num_admissions += 1
            self.waiting.popleft()
            self.blocks.allocate(req.req_id, req.num_computed + n)
            req.status = Status.RUNNING
            _insert(self.running, req, first=False)
            self._add_row(plan, req, n)
            budget -= n

    def _take_cached_prefix(self, req: Request) -> int:
        """Start ``req``'s table with the cached blocks of its longest whole-block prefix;
        returns how many tokens they hold."""
        if not self.blocks.num_cached:  # nothing to match (or prefix caching is off)
            return 0
        # read only: a request that has not generated yet needs no copy of its prompt
        tokens = req.known_ids(0, req.num_known) if req.output_ids else req.prompt_ids
        blocks, _ = self.blocks.match_prefix(tokens, req.block_digests)
        self.blocks.adopt(req.req_id, blocks)
        return len(blocks) * self.blocks.block_size

    def _count_prefix_hit(self, req: Request) -> None:
        self.prefix_queried_tokens += req.num_known
        self.prefix_hit_tokens += req.num_computed
        if req.cached_prompt_tokens is None:  # the first admission (not a recompute)
            req.cached_prompt_tokens = min(req.num_computed, len(req.prompt_ids))

    def _add_row(self, plan: BatchPlan, req: Request, n: int) -> None:
        start, known = req.num_computed, req.num_known
        token_ids = req.known_ids(start, start + n)
        placeholders = []
        for pos in range(max(start, known), start + n):
            seq, src_row = req.pending[pos - known]
            if seq != plan.seq - 1:
                raise AssertionError(f"placeholder for batch {seq} in batch {plan.seq}")
            placeholders.append((pos - start, src_row))
            token_ids.append(-1)
        req.num_computed = start + n
        samples = req.num_computed == req.num_total
        if samples:
            req.pending.append((plan.seq, len(plan.rows)))
        plan.rows.append(ScheduledRow(req, start, n, samples, token_ids, placeholders,
                                      req.num_admissions))
