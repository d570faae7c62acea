"""Serving behaviour through real gRPC: metrics, admission control, drain, deadlines."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2

from tandem.internal.v1 import engine_pb2
from tandem.v1 import generation_pb2 as pb
from tests.e2e.conftest import BASE_ARGS, DEVICE, PER_REQUEST
from tests.e2e.service import REPO, Service, process_env, scrape

pytestmark = pytest.mark.e2e
# A request still generating a moment after it starts: a GPU ran 40 tokens (and 400) in
# under a second, before the test could look.
LONG = 40 if DEVICE == "cpu" else 1000


def worker_pid(engine_pid: int) -> int:
    """The engine's gpu_worker child (started from any of its threads)."""
    for children in Path(f"/proc/{engine_pid}/task").glob("*/children"):
        for pid in children.read_text().split():
            if b"gpu_worker" in Path(f"/proc/{pid}/cmdline").read_bytes():
                return int(pid)
    raise LookupError("no gpu_worker child")


def long_request(max_tokens=200):
    return pb.GenerateRequest(text="Tell me a long story about a lighthouse keeper.",
                              sampling=pb.SamplingParams(max_tokens=max_tokens, temperature=0,
                                                         ignore_eos=True))


def test_metrics_show_latency_device_time_and_freed_cache(async_service):
    async_service.stub.Generate(long_request(12), timeout=120)
    call = async_service.stub.GenerateStream(long_request(300), timeout=120)
    next(iter(call))
    call.cancel()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        m = scrape(async_service)
        if m.get("tandem_requests_cancelled_total", 0) >= 1 and m["tandem_requests_running"] == 0:
            break
        time.sleep(0.1)
    assert m["tandem_requests_cancelled_total"] >= 1
    assert m["tandem_time_to_first_token_seconds_count"] >= 2
    assert m["tandem_inter_token_latency_seconds_count"] >= 11
    assert m["tandem_e2e_latency_seconds_count"] >= 1
    assert m['tandem_requests_finished_total{finish_reason="length"}'] >= 1
    assert m["tandem_device_busy_seconds_total"] > 0
    assert m["tandem_device_idle_gap_seconds_count"] > 0
    assert m["tandem_batch_size_requests_count"] > 0
    # the cancelled request's blocks are back once the engine sees the next batch
    async_service.stub.Generate(long_request(2), timeout=60)
    assert scrape(async_service)["tandem_kv_cache_usage_ratio"] == 0


def test_full_queue_is_refused_at_once_with_the_limit_named(small_queue_service):
    results, start = {}, threading.Barrier(4)

    def run(i):
        start.wait()  # all four at once: a fast device must not finish one before the next
        try:
            results[i] = small_queue_service.stub.Generate(long_request(60), timeout=120)
        except grpc.RpcError as exc:
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    refused = [r for r in results.values() if isinstance(r, grpc.RpcError)]
    assert refused, "no request was refused"
    assert all(r.code() == grpc.StatusCode.RESOURCE_EXHAUSTED for r in refused)
    assert "max-waiting-requests" in refused[0].details()
    assert any(not isinstance(r, grpc.RpcError) for r in results.values())
    rejected = scrape(small_queue_service)['tandem_requests_rejected_total{reason="queue_full"}']
    assert rejected == len(refused)


def test_a_higher_priority_request_preempts_a_running_one_that_then_ends_unchanged(
        small_queue_service):
    """One row: the urgent request takes it from the running one, which is recomputed later
    and streams exactly what it streams alone."""
    service = small_queue_service
    background = long_request(4 * LONG)
    alone = list(service.stub.Generate(background, timeout=120).token_ids)
    preemptions = service.stats().num_preemptions
    finished = []
    low = service.stub.GenerateStream(background, timeout=120)
    tokens = list(next(low).token_ids)  # running, and holding the only row

    def drain():
        tokens.extend(t for msg in low for t in msg.token_ids)
        finished.append("low")

    thread = threading.Thread(target=drain)
    thread.start()
    urgent = pb.GenerateRequest(text="Say hello.", priority=5, sampling=pb.SamplingParams(
        max_tokens=4, temperature=0, ignore_eos=True))
    assert len(service.stub.Generate(urgent, timeout=120).token_ids) == 4
    finished.append("urgent")
    thread.join()
    assert finished == ["urgent", "low"]  # in arrival order the urgent one would wait
    assert service.stats().num_preemptions > preemptions
    assert tokens == alone


def test_a_full_queue_makes_way_for_a_higher_priority_request(small_queue_service):
    """One row, one waiting place: the urgent request displaces the waiting one of lower
    priority (RESOURCE_EXHAUSTED, saying why), takes the row from the running one, and both
    it and the running one end whole."""
    service = small_queue_service
    running = service.stub.GenerateStream(long_request(2 * LONG), timeout=120)
    tokens = list(next(running).token_ids)  # holding the only row
    waiting = service.stub.GenerateStream(long_request(4), timeout=120)
    deadline = time.monotonic() + 30
    while service.stats().num_waiting == 0:
        assert time.monotonic() < deadline, "the second request never queued"
        time.sleep(0.02)
    urgent = pb.GenerateRequest(text="Say hello.", priority=5, sampling=pb.SamplingParams(
        max_tokens=4, temperature=0, ignore_eos=True))
    assert len(service.stub.Generate(urgent, timeout=120).token_ids) == 4
    with pytest.raises(grpc.RpcError) as displaced:
        list(waiting)
    assert displaced.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "higher priority" in displaced.value.details()
    tokens.extend(t for msg in running for t in msg.token_ids)
    assert len(tokens) == 2 * LONG
    assert scrape(service)["tandem_requests_displaced_total"] == 1


def test_engine_requests_reusing_an_id_run_side_by_side(async_service):
    """The internal API asks for ids unique in flight; a client that breaks that gets two
    independent requests, not a broken engine."""
    prompt = "Tell me a long story about a lighthouse keeper. " * 12  # whole cached blocks
    request = engine_pb2.EngineRequest(request_id="same", request=pb.GenerateRequest(
        text=prompt, sampling=pb.SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)))
    calls = [async_service.engine_stub.Generate(request, timeout=120) for _ in range(2)]
    outputs = [[t for msg in call for t in msg.token_ids] for call in calls]
    assert len(outputs[0]) == 6 and outputs[0] == outputs[1]
    again = [t for msg in async_service.engine_stub.Generate(request, timeout=120)
             for t in msg.token_ids]
    assert again == outputs[0]
    assert async_service.stats().num_running == 0


def test_deadline_exceeded_and_the_request_leaves_the_batch(async_service):
    with pytest.raises(grpc.RpcError) as err:
        async_service.stub.Generate(long_request(3000), timeout=0.5)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    deadline = time.monotonic() + 10
    while async_service.stats().num_running and time.monotonic() < deadline:
        time.sleep(0.05)
    assert async_service.stats().num_running == 0


def start_long_request(service: Service) -> tuple[threading.Thread, dict]:
    """A LONG-token Generate on a thread, returned once the engine runs it; the thread puts
    the response in the dict under "out"."""
    result = {}

    def run():
        result["out"] = service.stub.Generate(long_request(LONG), timeout=120)

    thread = threading.Thread(target=run)
    thread.start()
    while service.stats().num_running == 0:
        time.sleep(0.02)
    return thread, result


def shm_segments() -> set[str]:
    return {p.name for p in Path("/dev/shm").glob("psm_*")}


@pytest.mark.parametrize("gateway_args", [(), PER_REQUEST], ids=["multiplexed", "per-request"])
def test_sigterm_drains_in_flight_requests_and_refuses_new_ones(model_folder, gateway_args):
    before = shm_segments()
    service = Service(BASE_ARGS, "drain", gateway_args)
    try:
        service.wait_serving()
        (segment,) = shm_segments() - before
        assert Path("/dev/shm", segment).stat().st_mode & 0o077 == 0  # owner only
        thread, result = start_long_request(service)
        service.engine.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        health = service.engine_health()
        assert health == health_pb2.HealthCheckResponse.NOT_SERVING
        with pytest.raises(grpc.RpcError) as err:
            service.stub.Generate(long_request(4), timeout=30)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        thread.join()
        assert len(result["out"].token_ids) == LONG  # the in-flight request lost nothing
        assert service.engine.wait(timeout=30) == 0
        assert segment not in shm_segments()  # the slots are gone with the engine
    except BaseException:
        print(service.log_tail(80))  # the engine's side, in pytest's report
        raise
    finally:
        service.stop()


def test_worker_death_turns_health_not_serving_and_requests_unavailable(model_folder):
    service = Service(BASE_ARGS, "crash")
    try:
        service.wait_serving()
        os.kill(worker_pid(service.engine.pid), signal.SIGKILL)
        assert service.engine.wait(timeout=30) != 0  # the engine reports and exits
        deadline = time.monotonic() + 10
        status = None
        while time.monotonic() < deadline:
            status = service.health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
            if status.status == health_pb2.HealthCheckResponse.NOT_SERVING:
                break
            time.sleep(0.2)
        assert status.status == health_pb2.HealthCheckResponse.NOT_SERVING
        with pytest.raises(grpc.RpcError) as err:
            service.stub.Generate(long_request(4), timeout=10)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        service.stop()


def test_ctrl_c_on_the_engine_drains_instead_of_killing_its_worker(model_folder):
    """SIGINT to the engine's whole process group (a Ctrl-C at its terminal) reaches the
    worker too: it must leave stopping to the engine, which drains."""
    service = Service(BASE_ARGS, "ctrl-c", engine_session=True)
    try:
        service.wait_serving()
        thread, result = start_long_request(service)
        os.killpg(service.engine.pid, signal.SIGINT)
        thread.join()
        assert len(result["out"].token_ids) == LONG
        assert service.engine.wait(timeout=30) == 0
    except BaseException:
        print(service.log_tail(80))
        raise
    finally:
        service.stop()


def test_sigterm_while_the_worker_starts_stops_the_engine_at_once(tmp_path):
    """A signal during the model's load must not wait for the load (minutes on a GPU,
    longer than a supervisor waits before SIGKILL, which would orphan the worker)."""
    log = tmp_path / "log.txt"
    with open(log, "w") as out:
        engine = subprocess.Popen(
            [sys.executable, "-m", "tokenizer_svc", "--listen", f"unix://{tmp_path}/e.sock",
             *BASE_ARGS], cwd=REPO, stdout=out, stderr=subprocess.STDOUT, env=process_env())
    try:
        while True:  # the worker is loading
            assert engine.poll() is None, log.read_text()
            with contextlib.suppress(LookupError, FileNotFoundError):
                worker = worker_pid(engine.pid)
                break
            time.sleep(0.05)
        if "worker ready" in log.read_text():
            pytest.skip("the worker was ready before the signal could be sent")
        engine.send_signal(signal.SIGTERM)
        assert engine.wait(timeout=10) == 0, log.read_text()
        assert "worker ready" not in log.read_text()  # it did not wait for the load
        time.sleep(0.5)
        assert not Path(f"/proc/{worker}").exists()  # reaped: no orphan
    finally:
        if engine.poll() is None:
            engine.kill()
            engine.wait()
