"""The engine's waiting queue at its limits: which waiting requests make way for a request
of higher priority, and what becomes of them."""

from __future__ import annotations

import types

from tests.tokenizer_svc.test_scheduler import make_request, make_scheduler
from tokenizer_svc.engine import Engine
from tokenizer_svc.request import FinishReason


class NoOutputs:
    def add(self, req) -> None:
        pass

    def discard(self, req) -> None:
        pass


def make_engine() -> Engine:
    segment = types.SimpleNamespace(layout=types.SimpleNamespace(num_slots=2))
    return Engine(make_scheduler(), NoOutputs(), worker=None, segment=segment, overlap=True)


def queue(engine: Engine, *requests) -> dict[str, list]:
    """Adds each request to the engine (its sink records what it is sent)."""
    sent: dict[str, list] = {}
    for req in requests:
        sent[req.req_id] = []
        engine.add_request(req, sent[req.req_id].append)
    engine._drain_inbox(block=False)
    return sent


def test_a_full_queue_displaces_the_latest_of_its_lowest_priority_for_a_higher_one():
    engine = make_engine()
    sent = queue(engine, make_request("a", 8, priority=0), make_request("b", 8, priority=1),
                 make_request("c", 8, priority=0))
    assert engine.make_way(make_request("u", 8, priority=2), max_requests=3, max_tokens=100)
    engine._drain_inbox(block=False)
    (out,) = sent["c"]  # of the two at priority 0, the later one
    assert out.finish_reason == FinishReason.ABORTED and out.error_code == "RESOURCE_EXHAUSTED"
    assert "higher priority (2 > 0)" in out.error
    assert sent["a"] == sent["b"] == [] and engine.queued() == (2, 16)
    assert [r.req_id for r in engine.scheduler.waiting] == ["b", "a"]
    assert engine.metrics.registry.get_sample_value("tandem_requests_displaced_total") == 1


def test_prompt_tokens_may_need_several_to_make_way_and_equal_priority_none():
    engine = make_engine()
    sent = queue(engine, make_request("a", 8), make_request("b", 8), make_request("c", 8))
    assert not engine.make_way(make_request("same", 8), max_requests=3, max_tokens=100)
    assert not engine.make_way(make_request("huge", 40, priority=1), max_requests=9,
                               max_tokens=30)  # even all three would not make room
    assert engine.queued() == (3, 24)
    assert engine.make_way(make_request("u", 20, priority=1), max_requests=9, max_tokens=30)
    engine._drain_inbox(block=False)
    assert [len(sent[r]) for r in "abc"] == [0, 1, 1]  # 24 + 20 > 30: the two latest go
    assert engine.queued() == (1, 8)


def test_a_request_scheduled_before_its_displacement_runs_on():
    engine = make_engine()
    sent = queue(engine, make_request("a", 8))
    assert engine.make_way(make_request("u", 8, priority=1), max_requests=1, max_tokens=100)
    engine.requests["a"].first_scheduled = 1.0  # the engine thread scheduled it meanwhile
    engine._drain_inbox(block=False)
    assert sent["a"] == [] and "a" in engine.requests
