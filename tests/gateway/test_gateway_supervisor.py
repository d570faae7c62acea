"""The spawned local engine: start, crash and restart, give up, shutdown; and the CLI."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import grpc
import pytest
from gateway_fakes import (
    NOT_SERVING,
    SERVING,
    Client,
    fast_config,
    running_gateway,
    wait_for_status,
    wait_until,
)

from gateway.config import SpawnConfig
from gateway.supervisor import DIR_PREFIX, EngineSupervisor
from tandem.v1 import generation_pb2 as pb

pytestmark = pytest.mark.timeout(60)

FAKE_PROC = str(Path(__file__).with_name("gateway_fake_engine_proc.py"))
REPO_ROOT = str(Path(__file__).resolve().parents[2])


def spawn_config(tmp_path: Path, *engine_args: str, **overrides) -> SpawnConfig:
    values = dict(
        engine_command=(sys.executable, FAKE_PROC),
        engine_args=("--pid-file", str(tmp_path / "pids"), "--args-file",
                     str(tmp_path / "args.json"), *engine_args),
        restart_backoff_s=0.3, max_restart_backoff_s=0.5, terminate_timeout_s=3.0,
    )
    values.update(overrides)
    return SpawnConfig(**values)


def pids(tmp_path: Path) -> list[int]:
    path = tmp_path / "pids"
    return [int(line) for line in path.read_text().split()] if path.exists() else []


def is_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.fixture
def no_orphans(tmp_path: Path):
    """Whatever happens in the test, no fake engine outlives it."""
    yield
    for pid in pids(tmp_path):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def run(coro) -> None:
    asyncio.run(asyncio.wait_for(coro, timeout=40))


@pytest.mark.usefixtures("no_orphans")
def test_spawned_engine_crash_fails_requests_and_is_restarted(tmp_path: Path) -> None:
    async def body() -> None:
        config = fast_config((), spawn=spawn_config(tmp_path, "--hang"))
        async with running_gateway(config) as (server, client):
            await wait_for_status(client, SERVING, timeout=15)
            argv = json.loads((tmp_path / "args.json").read_text())
            assert argv[:2] == ["--listen", server.supervisor.address]
            assert argv[1].startswith("unix://") and argv[-1] == "--hang"
            [first_pid] = pids(tmp_path)
            assert server.supervisor.pid == first_pid

            call = client.stub.GenerateStream(pb.GenerateRequest(text="hi"))
            assert (await call.read()).text == "Hel"
            os.kill(first_pid, signal.SIGKILL)
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                while await call.read() != grpc.aio.EOF:
                    pass
            assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
            await wait_for_status(client, NOT_SERVING, timeout=2)

            await wait_for_status(client, SERVING, timeout=15)
            assert len(pids(tmp_path)) == 2 and not is_alive(first_pid)
            response = await client.stub.Tokenize(pb.TokenizeRequest(text="hello"))
            assert list(response.token_ids) == [7, 8]
        assert not any(is_alive(pid) for pid in pids(tmp_path))

    run(body())


@pytest.mark.usefixtures("no_orphans")
def test_gateway_gives_up_after_quick_failures(tmp_path: Path) -> None:
    async def body() -> None:
        spawn = spawn_config(tmp_path, "--exit-code", "3", max_quick_failures=2,
                             restart_backoff_s=0.05)
        async with running_gateway(fast_config((), spawn=spawn)) as (server, client):
            assert await asyncio.wait_for(server.wait(), timeout=15) == 1
            assert len(pids(tmp_path)) == 2
            assert await client.health_status() == NOT_SERVING

    run(body())


@pytest.mark.usefixtures("no_orphans")
def test_gateway_gives_up_at_once_when_the_engine_refuses_its_flags(tmp_path: Path) -> None:
    async def body() -> None:
        spawn = spawn_config(tmp_path, "--exit-code", "2", max_quick_failures=5,
                             restart_backoff_s=0.05)
        async with running_gateway(fast_config((), spawn=spawn)) as (server, _):
            assert await asyncio.wait_for(server.wait(), timeout=15) == 1
            assert len(pids(tmp_path)) == 1

    run(body())


@pytest.mark.usefixtures("no_orphans")
def test_stop_kills_an_engine_that_ignores_sigterm(tmp_path: Path) -> None:
    async def body() -> None:
        spawn = spawn_config(tmp_path, "--ignore-sigterm", terminate_timeout_s=0.3)
        async with running_gateway(fast_config((), spawn=spawn)) as (_, client):
            await wait_for_status(client, SERVING, timeout=15)
            [pid] = pids(tmp_path)
        assert not is_alive(pid)

    run(body())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.usefixtures("no_orphans")
def test_cli_drains_on_sigterm_and_stops_its_engine(tmp_path: Path) -> None:
    """SIGTERM with a stream in flight: NOT_SERVING, new requests UNAVAILABLE, the stream
    completes, the engine child is stopped, exit code 0."""
    port = free_port()
    release = tmp_path / "release"
    command = [
        sys.executable, "-m", "gateway", "--listen", f"127.0.0.1:{port}",
        "--engine-command", f"{sys.executable} {FAKE_PROC}", "--health-interval", "0.05",
        "--grace-period", "30",
        "--", "--pid-file", str(tmp_path / "pids"), "--hold-last-file", str(release),
    ]
    gateway = subprocess.Popen(command, cwd=REPO_ROOT)
    try:
        asyncio.run(asyncio.wait_for(_drain_on_sigterm(gateway, port, tmp_path), timeout=40))
        assert gateway.wait(timeout=15) == 0
        assert not any(is_alive(pid) for pid in pids(tmp_path))
    finally:
        if gateway.poll() is None:
            gateway.kill()
            gateway.wait()


async def _drain_on_sigterm(gateway: subprocess.Popen, port: int, tmp_path: Path) -> None:
    from grpc_health.v1 import health_pb2_grpc

    from tandem.v1 import generation_pb2_grpc

    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        client = Client(channel, generation_pb2_grpc.GenerationStub(channel),
                        health_pb2_grpc.HealthStub(channel))

        async def is_serving() -> bool:
            with contextlib.suppress(grpc.aio.AioRpcError):
                return await client.health_status() == SERVING
            return False

        await wait_until(is_serving, timeout=20)
        stream = client.stub.GenerateStream(pb.GenerateRequest(text="hi"))
        texts = [(await stream.read()).text, (await stream.read()).text]
        gateway.send_signal(signal.SIGTERM)
        await wait_for_status(client, NOT_SERVING, timeout=10)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await client.stub.Generate(pb.GenerateRequest(text="hi"))
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        assert caught.value.details() == "server is shutting down"
        assert gateway.poll() is None and len(pids(tmp_path)) == 1
        (tmp_path / "release").touch()
        while (chunk := await stream.read()) != grpc.aio.EOF:
            texts.append(chunk.text)
        assert texts == ["Hel", "lo", " world"]
        assert await stream.code() == grpc.StatusCode.OK


@pytest.mark.usefixtures("no_orphans")
def test_spawned_engine_stops_when_the_gateway_is_killed(tmp_path: Path) -> None:
    """The engine runs in its own session: SIGKILL on the gateway must still stop it (and so
    its worker), or a restarted gateway finds the device memory taken."""
    port = free_port()
    command = [
        sys.executable, "-m", "gateway", "--listen", f"127.0.0.1:{port}",
        "--engine-command", f"{sys.executable} {FAKE_PROC}",
        "--", "--pid-file", str(tmp_path / "pids"),
    ]
    gateway = subprocess.Popen(command, cwd=REPO_ROOT)
    try:
        asyncio.run(wait_until(lambda: pids(tmp_path), timeout=20))
        [pid] = pids(tmp_path)
        [left] = Path(tempfile.gettempdir()).glob(f"{DIR_PREFIX}{gateway.pid}-*")
        gateway.kill()
        gateway.wait()
        asyncio.run(wait_until(lambda: not _running(pid), timeout=10))
        # the killed gateway's socket folder stays, until the next gateway starts
        assert left.exists()
        EngineSupervisor(SpawnConfig(), on_exit=print, on_give_up=print)._remove_dir()
        assert not left.exists()
    finally:
        if gateway.poll() is None:
            gateway.kill()
            gateway.wait()


def _running(pid: int) -> bool:
    """Alive and not a zombie (once orphaned, whoever adopted it reaps it, or not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except FileNotFoundError:
        return False
