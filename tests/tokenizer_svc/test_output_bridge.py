"""Outputs from the engine thread to the gRPC loop: wake-ups per burst, deltas merged when a
stream has fallen behind, errors never merged. Plain asyncio, no gRPC."""

from __future__ import annotations

import asyncio
import threading
import time

from tokenizer_svc.request import FinishReason, RequestOutput, TokenLogprob
from tokenizer_svc.server import OutputBridge, _deltas


def output(token, finish=None, error=None, text=None):
    return RequestOutput("r", text=text if text is not None else f"<{token}>",
                         token_ids=[token], logprobs=[TokenLogprob(token, -0.5, [])],
                         finish_reason=finish, completion_tokens=token, error=error)


async def collect(queue):
    return [out async for out in _deltas(queue)]


def test_a_stream_that_fell_behind_gets_one_delta_for_what_waits():
    async def main():
        queue = asyncio.Queue()
        for out in (output(1), output(2), output(3, FinishReason.LENGTH)):
            queue.put_nowait(out)
        return await collect(queue)

    (delta,) = asyncio.run(main())
    assert delta.token_ids == [1, 2, 3] and delta.text == "<1><2><3>"
    assert [lp.token_id for lp in delta.logprobs] == [1, 2, 3]
    assert delta.finish_reason == FinishReason.LENGTH and delta.completion_tokens == 3


def test_deltas_go_out_as_they_come_when_the_stream_keeps_up():
    async def main():
        queue, seen = asyncio.Queue(), []

        async def consume():
            async for out in _deltas(queue):
                seen.append(out.token_ids)

        task = asyncio.create_task(consume())
        for out in (output(1), output(2), output(3, FinishReason.STOP)):
            queue.put_nowait(out)
            await asyncio.sleep(0)
            await asyncio.sleep(0)
        await task
        return seen

    assert asyncio.run(main()) == [[1], [2], [3]]


def test_an_error_is_never_merged_into_tokens():
    async def main():
        queue = asyncio.Queue()
        failed = RequestOutput("r", finish_reason=FinishReason.ABORTED, error="engine failed")
        for out in (output(1), output(2), failed, output(9)):
            queue.put_nowait(out)
        return await collect(queue)

    tokens, error = asyncio.run(main())
    assert tokens.token_ids == [1, 2] and tokens.error is None and tokens.finish_reason is None
    assert error.error == "engine failed" and error.token_ids == []


class CountingLoop:
    def __init__(self, loop):
        self.loop, self.wakeups = loop, 0

    def call_soon_threadsafe(self, fn, *args):
        self.wakeups += 1
        return self.loop.call_soon_threadsafe(fn, *args)


def test_bridge_keeps_each_queue_in_order_with_fewer_wakeups_than_outputs():
    async def main():
        loop = CountingLoop(asyncio.get_running_loop())
        bridge = OutputBridge(loop)
        queues = [asyncio.Queue() for _ in range(4)]

        def engine_thread():
            for step in range(200):  # a burst per step: one output for every request
                for q in queues:
                    bridge.post(q.put_nowait, step)

        thread = threading.Thread(target=engine_thread)
        thread.start()
        got = [[] for _ in queues]
        while any(len(g) < 200 for g in got):
            for q, g in zip(queues, got, strict=True):
                while not q.empty():
                    g.append(q.get_nowait())
            await asyncio.sleep(0.001)
        thread.join()
        return got, loop.wakeups

    got, wakeups = asyncio.run(main())
    assert all(g == list(range(200)) for g in got)
    assert 1 <= wakeups < 800


def test_a_burst_reaches_the_loop_in_one_delivery_at_its_end():
    async def main():
        loop = CountingLoop(asyncio.get_running_loop())
        bridge = OutputBridge(loop)
        batches: list[list] = []  # what each wake-up of the loop delivered
        real_deliver = bridge._deliver

        def deliver_batch():
            batches.append([])
            real_deliver()

        bridge._deliver = deliver_batch
        steps = 50

        def engine_thread():
            for step in range(steps):
                with bridge.burst():
                    for row in range(8):
                        bridge.post(batches_append, (step, row))
                        time.sleep(0.0002)  # the loop could take the GIL meanwhile

        def batches_append(item):
            batches[-1].append(item)

        thread = threading.Thread(target=engine_thread)
        thread.start()
        while thread.is_alive() or sum(map(len, batches)) < steps * 8:
            await asyncio.sleep(0.0005)
        return batches, loop.wakeups

    batches, wakeups = asyncio.run(main())
    assert [item for b in batches for item in b] == [(s, r) for s in range(50) for r in range(8)]
    assert all(len(b) % 8 == 0 for b in batches)  # never a step cut in two
    assert wakeups == len(batches) <= 50


# ---- GenerateMany: one stream's events

def muxed_output(rid, token, finish=None, error=None):
    out = output(token, finish, error)
    out.req_id = rid
    return out


def test_a_multiplexed_stream_merges_each_requests_outputs_and_keeps_errors_apart():
    import grpc

    from tokenizer_svc.server import Refused, _Muxed

    async def main():
        muxed = _Muxed()
        muxed.active.update(a="a.0", b="b.1", c="c.2")
        for rid, token, finish, error in [("a", 1, None, None), ("b", 7, None, None),
                                          ("a", 2, None, None), ("b", 8, None, "worker died"),
                                          ("a", 3, FinishReason.STOP, None)]:
            muxed.push(rid, muxed_output(rid, token, finish, error))
        muxed.push("d", Refused(grpc.StatusCode.INVALID_ARGUMENT, "text: empty"))
        events = list((await muxed.take(timeout=1)).events)
        assert not (await muxed.take(timeout=0.01)).events  # nothing left
        return muxed, events

    muxed, events = asyncio.run(main())
    assert [e.request_id for e in events] == ["a", "b", "b", "d"]
    a, b, b_error, d = events
    assert list(a.output.token_ids) == [1, 2, 3] and a.output.finish_reason  # one delta
    assert list(b.output.token_ids) == [7] and not b.error_code  # an error is never merged
    assert (b_error.error_code, b_error.error_message) == (14, "worker died")  # UNAVAILABLE
    assert (d.error_code, d.error_message) == (3, "text: empty")  # INVALID_ARGUMENT
    assert muxed.active == {"c": "c.2"}  # finished and failed requests left


def test_multiplexed_events_are_cut_into_messages_of_bounded_size():
    from tandem.internal.v1 import engine_pb2
    from tokenizer_svc.server import _batches

    events = [engine_pb2.EngineEvent(request_id=f"r{i}", error_message="x" * 100)
              for i in range(10)]
    size = events[0].ByteSize()
    whole = engine_pb2.EngineEvents(events=events)
    messages = list(_batches(whole, limit=3 * size))
    assert [len(m.events) for m in messages] == [3, 3, 3, 1]
    assert [e for m in messages for e in m.events] == events
    one = engine_pb2.EngineEvents(events=events[:1])
    assert [len(m.events) for m in _batches(one, limit=1)] == [1]  # never empty
    assert list(_batches(whole, limit=whole.ByteSize())) == [whole]  # fits: as it is
    assert list(_batches(engine_pb2.EngineEvents(), limit=100)) == []


def test_a_request_that_cannot_start_fails_alone_with_internal():
    import grpc

    from tandem.internal.v1 import engine_pb2
    from tokenizer_svc.server import EngineServicer, Refused, _Muxed

    async def broken(request):
        raise RuntimeError("tokenizer crashed")

    async def main():
        servicer = EngineServicer(None, None, "m", None)
        servicer._accept = broken
        muxed = _Muxed()
        await servicer._start_muxed(engine_pb2.EngineRequest(request_id="x"), muxed)
        return muxed

    muxed = asyncio.run(main())
    ((rid, refused),) = muxed.pending
    assert rid == "x" and isinstance(refused, Refused)
    assert refused.code == grpc.StatusCode.INTERNAL and "tokenizer crashed" in refused.message
    assert not muxed.accepting and not muxed.active
