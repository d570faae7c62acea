"""A model check of the engine loop with prefix caching, placeholders and preemption.

The real ``Engine._step``, scheduler, block manager, slot writer and output processor run
against a fake worker that executes batches strictly in order, sometimes as soon as they
are submitted and sometimes only when the engine waits for them, and keeps a shadow KV
cache: each slot holds the tokens that produced it. Random requests (shared prefixes,
multi-turn continuations, a tiny vocabulary so that blocks collide, mixed priorities),
aborts and preemptions (small caches, higher priorities) on random configurations. After
every step and every batch it checks:

- the waiting and the running requests are each in priority order;
- every block is in exactly one place (tables with matching ref counts, the free list, the
  evictable LRU), and every registered block holds exactly its digest's tokens;
- every context position a row reads holds that request's true tokens, and every
  placeholder is filled with the true token;
- each sampling row bans exactly its ending ids (EOS unless ignore_eos, stop_token_ids)
  while below min_tokens and none after, and a penalised row's token history is its true
  context (its placeholder filled from the previous batch) with padding after;
- the streamed outputs are the samples, a request ends at its first ending id (never
  before min_tokens) or at max_tokens, and nothing is left held once the queue drains.
"""

from __future__ import annotations

import random
import time
from collections import deque

import pytest

import tokenizer_svc.engine as E
from tandem import slots as S
from tokenizer_svc.block_manager import BlockManager, block_digests
from tokenizer_svc.output_processor import OutputProcessor
from tokenizer_svc.request import FinishReason, Request, SamplingOptions
from tokenizer_svc.scheduler import Scheduler, SchedulerLimits


class Tok:
    def decode(self, ids, **kw):
        return "".join(chr(97 + i % 26) for i in ids)

class Bug(AssertionError):
    pass

FIELDS = ("header", "input_ids", "positions", "slot_mapping", "placeholder_pos",
          "placeholder_src", "query_start", "context_lens", "block_tables", "banned_ids",
          "prompt_lens", "history", "history_src")
EOS = frozenset({0})


def ending_ids(opts):
    return (frozenset() if opts.ignore_eos else EOS) | opts.stop_token_ids


class FakeWorker:
    def __init__(self, sim):
        self.sim = sim
        self.kv = {}
        self.queue = deque()
        self.outputs = {}
        self.done = 0
    def wait_inputs_copied(self, slot):
        pass
    def submit(self, slot, seq):
        view = self.sim.segment.slots[slot]
        snap = {f: getattr(view, f).copy() for f in FIELDS}
        self.queue.append((seq, slot, snap, self.sim.plans[seq]))
        if self.sim.rng.random() < self.sim.eager:
            self.run_all()
    def run_all(self):
        while self.queue:
            self.execute(*self.queue.popleft())
    def wait(self, seq, slot):
        while self.done < seq:
            self.execute(*self.queue.popleft())
        return None
    def execute(self, seq, slot, snap, plan):
        sim, bs = self.sim, self.sim.bs
        assert seq == self.done + 1
        h = snap["header"]
        T, R = int(h[S.H_NUM_TOKENS]), int(h[S.H_NUM_ROWS])
        ids = snap["input_ids"][:T].copy()
        for k in range(int(h[S.H_NUM_PLACEHOLDERS])):
            prev = self.outputs[int(h[S.H_PREV_SEQ])]
            ids[snap["placeholder_pos"][k]] = prev[snap["placeholder_src"][k]]
        qs, bt = snap["query_start"], snap["block_tables"]
        sampled = []
        for r in range(R):
            req = plan.rows[r].req
            truth = sim.truth[req.req_id]
            lo, hi = int(qs[r]), int(qs[r + 1])
            first = int(snap["positions"][lo])
            for q in range(first):  # attention reads the whole context
                s = int(bt[r, q // bs]) * bs + q % bs
                if self.kv.get(s) != tuple(truth[:q + 1]):
                    raise Bug(f"batch {seq} row {r} ({req.req_id}) reads pos {q} slot {s}: "
                              f"holds {self.kv.get(s)!r}, expected {tuple(truth[:q+1])!r}")
            for i in range(lo, hi):
                p = int(snap["positions"][i])
                if truth[p] != int(ids[i]):
                    raise Bug(f"batch {seq} {req.req_id} input pos {p}: token {ids[i]}, "
                              f"not {truth[p]}")
                s = int(snap["slot_mapping"][i])
                assert s == int(bt[r, p // bs]) * bs + p % bs
                self.kv[s] = tuple(truth[:p + 1])
            ctx = int(snap["context_lens"][r])
            tok = sim.rng.randrange(sim.vocab)
            if plan.rows[r].samples:
                if len(truth) != ctx:
                    raise Bug(f"{req.req_id} samples at {ctx} but truth has {len(truth)}")
                banned = self.check_sampling(seq, r, req, snap, truth)
                tok = sim.rng.choice([t for t in range(sim.vocab) if t not in banned])
                truth.append(tok)
            sampled.append(tok)
        self.outputs[seq] = sampled
        self.sim.segment.slots[slot].sampled_ids[:R] = sampled
        self.done = seq
        sim.check_registry(f"after executing batch {seq}")

    def check_sampling(self, seq, r, req, snap, truth):
        """Row ``r``'s bans, prompt length and (penalised) history; returns its bans."""
        opts, ctx, n = req.options, len(truth), len(req.prompt_ids)
        want = sorted(ending_ids(opts)) if ctx - n < opts.min_tokens else []
        banned = [int(b) for b in snap["banned_ids"][r] if b >= 0]
        if banned != want:
            raise Bug(f"batch {seq} {req.req_id} output {ctx - n} (min_tokens "
                      f"{opts.min_tokens}) bans {banned}, not {want}")
        if int(snap["prompt_lens"][r]) != n:
            raise Bug(f"batch {seq} {req.req_id} prompt_lens {snap['prompt_lens'][r]}, not {n}")
        length = int(snap["header"][S.H_HISTORY_LEN])
        if opts.has_penalties:
            history = [int(t) for t in snap["history"][r, :length]]
            if length >= ctx and history[ctx - 1] == -1:
                prev = self.outputs[int(snap["header"][S.H_PREV_SEQ])]
                history[ctx - 1] = prev[int(snap["history_src"][r])]
            if history != truth[:ctx] + [-2] * (length - ctx):
                raise Bug(f"batch {seq} {req.req_id} history {history}, truth {truth}")
        return set(banned)

class Sim:
    def __init__(self, seed, **cfg):
        rng = self.rng = random.Random(seed)
        self.bs = cfg.get("bs", rng.choice([1, 2, 3, 4]))
        self.num_blocks = cfg.get("num_blocks", rng.randint(4, 20))
        self.max_seqs = cfg.get("max_seqs", rng.randint(1, 6))
        self.max_tokens_batch = cfg.get("budget", rng.randint(self.max_seqs, 24))
        self.watermark = cfg.get("watermark", rng.choice([0, 1]))
        self.overlap = cfg.get("overlap", rng.random() < 0.8)
        self.eager = cfg.get("eager", rng.choice([0.0, 0.5, 1.0]))
        self.vocab = cfg.get("vocab", rng.choice([2, 3, 8]))
        self.p_abort = cfg.get("p_abort", rng.choice([0.0, 0.05, 0.2]))
        self.prefix_caching = cfg.get("prefix_caching", True)
        self.priorities = cfg.get("priorities", rng.choice([(0,), (0, 1), (-1, 0, 0, 2)]))
        # admitted as the server admits (Engine.make_way) into a queue this long (None: no
        # limit): displaced requests end with RESOURCE_EXHAUSTED, before any output
        self.max_waiting = cfg.get("max_waiting", rng.choice([None, 2, 5]))
        self.displaced: set[str] = set()
        # preempt a running request between steps, batches in flight or not (the engine
        # only preempts inside schedule(); this reaches orders it never produces)
        self.p_preempt = cfg.get("p_preempt", 0.0)
        bm = BlockManager(self.num_blocks, self.bs, self.prefix_caching)
        self.sched = Scheduler(SchedulerLimits(self.max_seqs, self.max_tokens_batch,
                                               self.watermark), bm)
        maxctx = (self.num_blocks - self.watermark) * self.bs
        self.maxctx = maxctx
        outputs = OutputProcessor(Tok(), EOS, 10**6)
        shape = S.SlotShape(self.max_tokens_batch, self.max_seqs,
                            -(-maxctx // self.bs) + 1, 0, self.bs)
        self.segment = S.SlotSegment(S.SlotLayout(shape, 2), create=True)
        self.worker = FakeWorker(self)
        self.engine = E.Engine(self.sched, outputs, self.worker, self.segment, self.overlap)
        self.truth, self.got, self.finished, self.live = {}, {}, {}, []
        self.plans = {}
        self.bases = [[rng.randrange(self.vocab) for _ in range(maxctx)] for _ in range(3)]
        self.n = 0

    def bm(self):
        return self.sched.blocks

    def check_registry(self, when):
        bm, bs = self.bm(), self.bs
        held = {b for t in bm._tables.values() for b in t}
        free, lru = set(bm._free), set(bm._evictable)
        everything = set(range(bm.num_blocks))
        if (held & free) or (held & lru) or (free & lru) or (held | free | lru) != everything \
                or len(bm._free) != len(free):
            raise Bug(f"{when}: accounting held={held} free={list(bm._free)} lru={lru}")
        for b in range(bm.num_blocks):
            if bm._refs[b] != sum(t.count(b) for t in bm._tables.values()):
                raise Bug(f"{when}: refs[{b}]={bm._refs[b]}")
        if set(bm._cached.values()) != set(bm._digest_of) or len(bm._cached) != len(bm._digest_of):
            raise Bug(f"{when}: cached/digest_of mismatch")
        for b in lru:
            if b not in bm._digest_of:
                raise Bug(f"{when}: evictable {b} unregistered")
        for b, d in bm._digest_of.items():
            if bm._cached[d] != b:
                raise Bug(f"{when}: digest maps elsewhere")
            last = self.worker.kv.get(b * bs + bs - 1)
            if last is None or len(last) % bs:
                raise Bug(f"{when}: registered block {b} last slot holds {last!r}")
            L = len(last)
            for j in range(bs):
                if self.worker.kv.get(b * bs + j) != last[:L - bs + j + 1]:
                    raise Bug(f"{when}: registered block {b} slot {j} holds "
                              f"{self.worker.kv.get(b*bs+j)!r}, block end {last!r}")
            if block_digests(list(last), bs, L // bs)[-1] != d:
                raise Bug(f"{when}: registered block {b} content {last!r} does not match digest")

    def check_priority_order(self, when):
        for name in ("waiting", "running"):
            order = [r.priority for r in getattr(self.sched, name)]
            if order != sorted(order, reverse=True):
                raise Bug(f"{when}: {name} requests out of priority order: {order}")

    def new_request(self):
        rng = self.rng
        self.n += 1
        rid = f"r{self.n}"
        if self.finished and rng.random() < 0.3:  # multi-turn: an earlier prompt + its output
            prev = rng.choice(list(self.finished.values()))
            prompt = list(prev[:rng.randint(1, len(prev))])
        else:
            base = rng.choice(self.bases)
            k = rng.randint(0, min(len(base), 12))
            prompt = base[:k] + [rng.randrange(self.vocab) for _ in range(rng.randint(0, 4))]
        if not prompt:
            prompt = [rng.randrange(self.vocab)]
        prompt = prompt[: self.maxctx - 1]
        mt = rng.randint(1, max(1, min(8, self.maxctx - len(prompt))))
        ignore_eos = rng.random() < 0.7
        stop = frozenset(t for t in range(1, self.vocab) if rng.random() < 0.3)
        if len((frozenset() if ignore_eos else EOS) | stop) == self.vocab:
            stop -= {max(stop)}  # leave a token to sample below min_tokens
        opts = SamplingOptions(
            mt, ignore_eos=ignore_eos, stop_token_ids=stop if rng.random() < 0.5 else frozenset(),
            min_tokens=rng.randint(0, mt) if rng.random() < 0.5 else 0,
            repetition_penalty=1.3 if rng.random() < 0.3 else 1.0)
        req = Request(rid, prompt, opts, arrival=time.monotonic(),
                      priority=rng.choice(self.priorities))
        if self.max_waiting is not None and not self.engine.make_way(req, self.max_waiting,
                                                                     10**9):
            return  # refused, as the server would
        self.truth[rid] = list(prompt)
        self.got[rid] = []
        def sink(out, rid=rid):
            if out.error is not None:
                if out.error_code != "RESOURCE_EXHAUSTED" or self.got[rid] or \
                        req.first_scheduled is not None:
                    raise Bug(f"{rid} ended with {out.error_code} {out.error!r} "
                              f"after {self.got[rid]}")
                self.displaced.add(rid)
                return
            self.got[rid] += out.token_ids
            if out.finish_reason is not None:
                self.finished[rid] = self.truth[rid][:len(self.got[rid]) + len(req.prompt_ids)]
                n, got = len(req.prompt_ids), self.got[rid]
                if got != self.truth[rid][n:n + len(got)]:
                    raise Bug(f"{rid} outputs {got} != truth {self.truth[rid]}")
                ends = ending_ids(opts)
                first_end = next((i for i, t in enumerate(got) if t in ends), None)
                if first_end is not None and first_end < opts.min_tokens:
                    raise Bug(f"{rid} sampled ending id {got[first_end]} at output {first_end}, "
                              f"below min_tokens {opts.min_tokens}")
                stopped = first_end == len(got) - 1
                if (out.finish_reason, len(got)) != ((FinishReason.STOP, first_end + 1) if stopped
                                                     else (FinishReason.LENGTH, mt)):
                    raise Bug(f"{rid} ({opts}) finished {out.finish_reason} after {got}")
        self.live.append(rid)
        self.engine.add_request(req, sink)
        if self.max_waiting is not None and self.engine.queued()[0] > self.max_waiting:
            raise Bug(f"{self.engine.queued()[0]} waiting, over the limit {self.max_waiting}")

    def run(self, steps=300):
        eng, rng = self.engine, self.rng
        for step in range(steps):
            if rng.random() < 0.5 or not (eng.in_flight or self.sched.has_work):
                for _ in range(rng.randint(1, 3)):
                    self.new_request()
            if self.live and rng.random() < self.p_abort:
                eng.abort(rng.choice(self.live))
            if self.sched.running and rng.random() < self.p_preempt:
                self.sched._preempt(rng.choice(self.sched.running))
            eng._step()
            self.check_registry(f"after step {step}")
            self.check_priority_order(f"after step {step}")
        for _ in range(10000):  # drain
            if not (eng.in_flight or self.sched.has_work or not eng.inbox.empty()):
                break
            eng._step()
            self.check_registry("drain")
        else:
            stuck = list(self.sched.waiting) + self.sched.running
            raise Bug("did not drain: " + repr([(r.req_id, r.status, r.num_computed, r.num_total)
                                               for r in stuck]))
        bm = self.bm()
        if bm._tables or bm.num_free != bm.num_blocks or bm._num_registered:
            raise Bug(f"leak after drain: tables={bm._tables} "
                      f"registered={len(bm._num_registered)} "
                      f"free={bm.num_free}")


@pytest.fixture
def engine_module(monkeypatch):
    """The engine with its idle nap removed and every plan it writes kept for the worker."""
    monkeypatch.setattr(E.time, "sleep", lambda s: None)
    return E


@pytest.mark.parametrize("seed", range(24))
def test_random_runs_keep_every_invariant(engine_module, monkeypatch, seed):
    sim = Sim(seed, prefix_caching=seed % 6 != 5, p_preempt=0.2 if seed % 3 == 2 else 0.0)
    real = E.write_plan

    def write_plan(view, plan, blocks, eos, tables_written):
        sim.plans[plan.seq] = plan
        real(view, plan, blocks, eos, tables_written)

    monkeypatch.setattr(E, "write_plan", write_plan)
    try:
        sim.run(steps=200)
    finally:
        sim.segment.close()
