"""The engine loop: schedule batch N+1 while the worker runs batch N.

Runs on its own thread. The gRPC side talks to it only through
:meth:`Engine.add_request` and :meth:`Engine.abort` (a thread-safe inbox), and
hears back through each request's sink. One iteration, in async mode::

    plan N+1 (placeholders for what N has not sampled yet) → write slot → doorbell
    wait for batch N's outputs → apply them (append, stop rules, stream deltas)

In sync mode (``--sync``) the engine waits for each batch before planning the
next, so no placeholder is ever needed: the benchmark's baseline.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future

from tandem import slots as S
from tokenizer_svc.batch_writer import write_plan
from tokenizer_svc.metrics import EngineMetrics
from tokenizer_svc.output_processor import OutputProcessor
from tokenizer_svc.request import FinishReason, Request, RequestOutput, Status, TokenLogprob
from tokenizer_svc.scheduler import BatchPlan, Scheduler
from tokenizer_svc.worker_client import WorkerClient

log = logging.getLogger("tokenizer_svc.engine")
Sink = Callable[[RequestOutput], None]


class Engine:
    def __init__(self, scheduler: Scheduler, outputs: OutputProcessor, worker: WorkerClient,
                 segment: S.SlotSegment, overlap: bool, batch_wait: float = 0.0,
                 metrics: EngineMetrics | None = None) -> None:
        self.scheduler = scheduler
        self.outputs = outputs
        self.worker = worker
        self.segment = segment
        self.overlap = overlap
        self.batch_wait = batch_wait  # seconds to gather requests when starting from idle
        self.metrics = metrics or EngineMetrics()
        self.inbox: queue.SimpleQueue = queue.SimpleQueue()
        self.sinks: dict[str, Sink] = {}
        self.requests: dict[str, Request] = {}
        self.in_flight: deque[BatchPlan] = deque()
        # per slot, what each row's block table was when last written (batch_writer); only
        # this engine writes them once serving (the worker does in its warm-up, before)
        self._tables_written: list[list] = [[] for _ in range(segment.layout.num_slots)]
        # wraps the delivery of a step's outputs (the server's OutputBridge.burst)
        self.output_burst: Callable[[], contextlib.AbstractContextManager] = \
            contextlib.nullcontext
        self.num_batches = 0
        self.num_finished = 0
        self.num_tokens = 0  # run through the model, prefill and decode
        self.num_sampled = 0  # tokens applied to live requests
        self._reported: dict[str, int] = {}  # the scheduler's counters, as last reported
        self.last_progress = time.monotonic()  # a batch finished, or the loop went idle
        self._queue_lock = threading.Lock()
        # req_id -> (prompt tokens, priority), in arrival order, until first scheduled
        self._queued: dict[str, tuple[int, int]] = {}
        self.fatal: Exception | None = None
        self.on_fatal: Callable[[Exception], None] = lambda exc: None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="engine", daemon=True)

    # --- the gRPC side (any thread) ---
    def start(self) -> None:
        self._thread.start()

    def add_request(self, req: Request, sink: Sink) -> None:
        with self._queue_lock:
            self._queued[req.req_id] = (len(req.prompt_ids), req.priority)
        self.inbox.put(("add", req, sink))

    def queued(self) -> tuple[int, int]:
        """Requests admitted but not yet scheduled, and their prompt tokens (any thread)."""
        with self._queue_lock:
            return len(self._queued), sum(n for n, _ in self._queued.values())

    def make_way(self, req: Request, max_requests: int, max_tokens: int) -> bool:
        """Whether `req` fits in the waiting queue (`max_requests` requests, `max_tokens`
        prompt tokens), once the fewest lowest-priority requests of strictly lower priority
        than its own, the latest first, are displaced: those end with RESOURCE_EXHAUSTED.
        When even displacing all of them would not make room, none is (any thread)."""
        with self._queue_lock:
            count = len(self._queued) + 1
            tokens = sum(n for n, _ in self._queued.values()) + len(req.prompt_ids)
            if count <= max_requests and tokens <= max_tokens:
                return True  # the common case: room without displacing anyone
            lower = sorted((p, -i, rid, n) for i, (rid, (n, p)) in
                           enumerate(self._queued.items()) if p < req.priority)
            victims = []
            for _, _, rid, n in lower:
                victims.append(rid)
                count, tokens = count - 1, tokens - n
                if count <= max_requests and tokens <= max_tokens:
                    break
            else:
                return False  # even all of them would not make room
            for rid in victims:
                del self._queued[rid]
        for rid in victims:
            self.inbox.put(("displace", rid, req.priority))
        return True

    def _dequeue(self, req_id: str) -> None:
        with self._queue_lock:
            self._queued.pop(req_id, None)

    def abort(self, req_id: str) -> None:
        self.inbox.put(("abort", req_id, None))

    def trace(self, start: bool, path: str = "") -> Future:
        """Start or stop the worker's device timeline; resolves to the worker's summary."""
        done: Future = Future()
        self.inbox.put(("trace", (start, path), done))
        return done

    def stop(self) -> None:
        self._stop.set()
        self.inbox.put(("wake", None, None))
        self._thread.join(timeout=30)

    # --- the loop (engine thread) ---
    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                self._step()
        except Exception as exc:  # noqa: BLE001 - fatal: fail everything, tell the server
            log.exception("engine failed")
            self.fatal = exc
            self._fail_all(f"engine failed: {exc}")
            self.on_fatal(exc)

    def stalled_for(self) -> float:
        """Seconds since the last finished batch while batches are in flight (else 0)."""
        return time.monotonic() - self.last_progress if self.in_flight else 0.0

    def _step(self) -> None:
        idle = not self.in_flight and not self.scheduler.has_work
        if idle:
            self.last_progress = time.monotonic()
        self._drain_inbox(block=idle)
        if idle and self.batch_wait > 0:  # let a burst of requests land in one batch
            time.sleep(self.batch_wait)
            self._drain_inbox(block=False)
        plan = None
        if self.overlap or not self.in_flight:
            plan = self.scheduler.schedule() if self.scheduler.has_work else None
        if plan is not None:
            self._submit(plan)
        elif not self.in_flight:  # work that cannot run yet: wait for news, not spin
            time.sleep(0.005)
        if len(self.in_flight) > (1 if self.overlap and plan is not None else 0):
            self._complete(self.in_flight.popleft())

    def _drain_inbox(self, block: bool) -> None:
        while True:
            try:
                kind, item, sink = self.inbox.get(block=block, timeout=None)
            except queue.Empty:
                return
            block = False
            if kind == "add":
                self.requests[item.req_id], self.sinks[item.req_id] = item, sink
                self.outputs.add(item)
                self.scheduler.add(item)
            elif kind == "abort":
                self._abort(item)
            elif kind == "displace":
                self._displace(item, sink)
            elif kind == "trace":
                self._trace(*item, done=sink)

    def _trace(self, start: bool, path: str, done: Future) -> None:
        while self.in_flight:  # a clean edge: no batch straddles the window
            self._complete(self.in_flight.popleft())
        try:
            done.set_result(self.worker.trace(start, path))
        except Exception as exc:  # noqa: BLE001 - the caller gets the error
            done.set_exception(exc)
            raise

    def _abort(self, req_id: str) -> None:
        self._dequeue(req_id)
        req = self.requests.get(req_id)
        if req is None:
            return
        self.metrics.cancelled.inc()
        self._drop(req)

    def _drop(self, req: Request) -> None:
        """Forgets a request that ends without output: its KV blocks and its sink."""
        self.requests.pop(req.req_id, None)
        req.finish_reason = FinishReason.ABORTED
        self.scheduler.finish(req)
        self.outputs.discard(req)
        self.sinks.pop(req.req_id, None)
        self.num_finished += 1

    def _displace(self, req_id: str, priority: int) -> None:
        """Ends a waiting request to make room for one of `priority`, unless it was
        scheduled (or ended) since it was chosen: then it goes on as it is."""
        req = self.requests.get(req_id)
        if req is None or req.first_scheduled is not None:
            return
        sink = self.sinks[req_id]
        self._drop(req)
        self.metrics.displaced.inc()
        sink(RequestOutput(req_id, finish_reason=FinishReason.ABORTED,
                           error_code="RESOURCE_EXHAUSTED",
                           error=f"displaced from the engine's full queue by a request of "
                                 f"higher priority ({priority} > {req.priority}); retry later"))

    def _submit(self, plan: BatchPlan) -> None:
        now = time.monotonic()
        for row in plan.rows:
            if row.req.first_scheduled is None:
                row.req.first_scheduled = now
                self.metrics.queue_time.observe(now - row.req.arrival)
                self._dequeue(row.req.req_id)
        slot = plan.seq % self.segment.layout.num_slots
        self.worker.wait_inputs_copied(slot)
        write_plan(self.segment.slots[slot], plan, self.scheduler.blocks,
                   self.outputs.eos_token_ids, self._tables_written[slot])
        self.worker.submit(slot, plan.seq)
        self.in_flight.append(plan)
        self.num_batches += 1
        self.num_tokens += plan.num_tokens
        self._observe_batch(plan)

    def _observe_batch(self, plan: BatchPlan) -> None:
        self.metrics.batch_rows.observe(len(plan.rows))
        self.metrics.batch_tokens.observe(plan.num_tokens)
        self._observe_state()

    def _observe_state(self) -> None:
        m, s = self.metrics, self.scheduler
        m.running.set(len(s.running))
        m.waiting.set(len(s.waiting))
        m.kv_usage.set(s.blocks.usage)
        for counter, name in ((m.preemptions, "num_preemptions"),
                              (m.prefix_queried, "prefix_queried_tokens"),
                              (m.prefix_hits, "prefix_hit_tokens")):
            total = getattr(s, name)
            counter.inc(total - self._reported.get(name, 0))
            self._reported[name] = total

    def _complete(self, plan: BatchPlan) -> None:
        slot = plan.seq % self.segment.layout.num_slots
        timing = self.worker.wait(plan.seq, slot)
        self.last_progress = time.monotonic()
        if timing is not None:
            self.metrics.observe_step(timing.busy_s, timing.idle_s)
        num_sampled = self.num_sampled
        with self.output_burst():
            self._apply_samples(plan, self.segment.slots[slot])
        self.metrics.generated.inc(self.num_sampled - num_sampled)
        self._observe_state()

    def _apply_samples(self, plan: BatchPlan, view: S.SlotView) -> None:
        sampled = view.sampled_ids[: len(plan.rows)].tolist()
        now, gaps = time.monotonic(), []  # the step's tokens arrived together
        for r, row in enumerate(plan.rows):
            req = row.req
            self.scheduler.written(row)
            if not row.samples or req.status == Status.FINISHED:
                continue
            req.pending.popleft()
            self.num_sampled += 1
            last_token = req.first_token
            out = self.outputs.apply(req, sampled[r], _logprob(view, r, req, sampled[r]))
            self._observe_token(req, out, last_token, now, gaps)
            if req.finish_reason is not None:
                self._retire(req)
            sink = self.sinks.get(req.req_id)
            if sink is not None:
                sink(out)
            if req.finish_reason is not None:
                self.sinks.pop(req.req_id, None)
        self.metrics.itl.observe_many(gaps)

    def _observe_token(self, req: Request, out: RequestOutput, previous: float | None,
                       now: float, gaps: list[float]) -> None:
        """Latency metrics of one token that arrived at ``now``; its inter-token gap goes to
        ``gaps`` (the step's, observed together)."""
        m = self.metrics
        if previous is None:
            m.ttft.observe(now - req.arrival)
        else:
            gaps.append(now - req.last_token_at)
        req.last_token_at = now
        if out.finish_reason is not None:
            m.e2e.observe(now - req.arrival)
            m.finished.labels(out.finish_reason.value).inc()

    def _retire(self, req: Request) -> None:
        self.scheduler.finish(req)
        self.requests.pop(req.req_id, None)
        self.num_finished += 1

    def _fail_all(self, message: str) -> None:
        for req_id, sink in list(self.sinks.items()):
            sink(RequestOutput(req_id, finish_reason=FinishReason.ABORTED, error=message))
        self.sinks.clear()
        self.requests.clear()


def _logprob(view: S.SlotView, row: int, req: Request, token_id: int) -> TokenLogprob | None:
    if not req.options.logprobs:
        return None
    n = req.options.top_logprobs
    top = list(zip(view.top_ids[row, :n].tolist(), view.top_logprobs[row, :n].tolist(),
                   strict=True))
    return TokenLogprob(token_id, float(view.logprobs[row]), top)
