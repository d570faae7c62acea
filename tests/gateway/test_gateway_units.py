"""Small pieces without a server: error mapping, accumulation, config, command line, health."""

from __future__ import annotations

import asyncio
import sys

import grpc
import pytest
from gateway_fakes import default_chunks
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gateway.__main__ import config_from_args, serve
from gateway.config import MIB, GatewayConfig, SpawnConfig
from gateway.engines import channel_options
from gateway.errors import (
    EngineLost,
    EngineProtocolError,
    InvalidRequest,
    NoEngineReady,
    RequestTooLarge,
    ShuttingDown,
    status_for,
)
from gateway.health import NOT_SERVING, SERVICE_UNKNOWN, SERVING, HealthServicer
from gateway.mux import rpc_error
from gateway.relay import accumulate
from tandem.v1 import generation_pb2 as pb

pytestmark = pytest.mark.timeout(30)


engine_error = rpc_error  # an engine call's failure, as grpc raises it


@pytest.mark.parametrize(
    "exc, code, message",
    [
        (InvalidRequest("sampling.top_k", "must be >= 0"), grpc.StatusCode.INVALID_ARGUMENT,
         "sampling.top_k: must be >= 0"),
        (NoEngineReady(), grpc.StatusCode.UNAVAILABLE, "no engine is ready (model still loading?)"),
        (EngineLost("unix:///e.sock", "exited with code 1"), grpc.StatusCode.UNAVAILABLE,
         "engine unix:///e.sock went away mid-request (exited with code 1); retry"),
        (engine_error(grpc.StatusCode.INVALID_ARGUMENT, "prompt too long"),
         grpc.StatusCode.INVALID_ARGUMENT, "prompt too long"),
        (engine_error(grpc.StatusCode.RESOURCE_EXHAUSTED, "queue full"),
         grpc.StatusCode.RESOURCE_EXHAUSTED, "queue full"),
        (engine_error(grpc.StatusCode.UNAVAILABLE, "connection refused"),
         grpc.StatusCode.UNAVAILABLE, "engine unavailable: connection refused"),
        (engine_error(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded"),
         grpc.StatusCode.DEADLINE_EXCEEDED,
         "deadline exceeded while the engine was working on the request"),
        (ShuttingDown(), grpc.StatusCode.UNAVAILABLE, "server is shutting down"),
        (ShuttingDown("cut off; retry"), grpc.StatusCode.UNAVAILABLE,
         "server is shutting down: cut off; retry"),
        (engine_error(grpc.StatusCode.RESOURCE_EXHAUSTED,
                      "Received message larger than max (9 vs. 8)"),
         grpc.StatusCode.RESOURCE_EXHAUSTED, "response larger than the gateway's "
         "--max-response-bytes (Received message larger than max (9 vs. 8))"),
        (engine_error(grpc.StatusCode.RESOURCE_EXHAUSTED,
                      "Stream removed (CLIENT: Received message larger than max (9 vs. 8))"),
         grpc.StatusCode.RESOURCE_EXHAUSTED, "response larger than the gateway's "
         "--max-response-bytes (Stream removed (CLIENT: Received message larger than max "
         "(9 vs. 8)))"),
        (engine_error(grpc.StatusCode.RESOURCE_EXHAUSTED,
                      "SERVER: Received message larger than max (9 vs. 8)"),
         grpc.StatusCode.RESOURCE_EXHAUSTED, "request larger than the engine accepts (SERVER: "
         "Received message larger than max (9 vs. 8); its limit is below the gateway's "
         "--max-engine-message-bytes)"),
        (engine_error(grpc.StatusCode.RESOURCE_EXHAUSTED,
                      "CLIENT: Sent message larger than max (9 vs. 8)"),
         grpc.StatusCode.RESOURCE_EXHAUSTED, "request larger than the gateway's "
         "--max-engine-message-bytes (CLIENT: Sent message larger than max (9 vs. 8))"),
        (RequestTooLarge(9, 8), grpc.StatusCode.RESOURCE_EXHAUSTED, "request too large for "
         "the engine: 9 bytes once wrapped for it, over the gateway's "
         "--max-engine-message-bytes (8)"),
        (EngineProtocolError("no finish_reason"), grpc.StatusCode.INTERNAL, "no finish_reason"),
        (TimeoutError(), grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded"),
        (ZeroDivisionError("secret detail"), grpc.StatusCode.INTERNAL,
         "internal error in the gateway (req_id=r1)"),
    ],
)
def test_status_for(exc: BaseException, code: grpc.StatusCode, message: str) -> None:
    assert status_for(exc, "r1") == (code, message)


def test_accumulate_folds_the_stream() -> None:
    async def chunks():
        for chunk in default_chunks():
            chunk.request_id = "r9"
            yield chunk

    response = asyncio.run(accumulate(chunks()))
    assert response.text == "Hello world"
    assert list(response.token_ids) == [11, 12, 13, 14]
    assert len(response.logprobs) == 4
    assert response.finish_reason == pb.FINISH_REASON_STOP
    assert response.usage == pb.Usage(prompt_tokens=5, completion_tokens=4)
    assert response.timing.first_token_seconds == pytest.approx(0.02)
    assert response.request_id == "r9"


@pytest.mark.parametrize(
    "kwargs, problem",
    [
        (dict(), "no engine"),
        (dict(engine_addresses=("a:1", "a:1")), "duplicate"),
        (dict(engine_addresses=("",)), "must not be empty"),
        (dict(engine_addresses=("a:1",), listen=""), "listen"),
        (dict(engine_addresses=("a:1",), max_request_bytes=0), "max_request_bytes"),
        (dict(engine_addresses=("a:1",), default_timeout_s=0.0), "default_timeout_s"),
        (dict(engine_addresses=("a:1",), health_poll_interval_s=float("nan")),
         "health_poll_interval_s"),
        (dict(engine_addresses=("a:1",), grace_period_s=-1.0), "grace_period_s"),
        (dict(engine_addresses=("a:1",), engine_streams="one"), "engine_streams"),
        (dict(engine_addresses=("a:1",), engine_streams="multiplexed",
              max_response_bytes=1 << 20), "at least 2 MiB with multiplexed"),
        (dict(engine_addresses=("a:1",), metrics_port=70000), "metrics_port"),
        (dict(engine_addresses=("a:1",), max_engine_message_bytes=4 * MIB),
         r"max_engine_message_bytes \(4194304\) must be at least max_request_bytes"),
        (dict(engine_addresses=("a:1",), max_request_bytes=64 * MIB), "64 KiB"),
    ],
)
def test_config_is_validated(kwargs: dict, problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        GatewayConfig(**kwargs)


def test_spawn_config_is_validated() -> None:
    with pytest.raises(ValueError, match="engine_command"):
        SpawnConfig(engine_command=())
    with pytest.raises(ValueError, match="max_quick_failures"):
        SpawnConfig(max_quick_failures=0)
    with pytest.raises(ValueError, match="max_restart_backoff_s"):
        SpawnConfig(restart_backoff_s=5.0, max_restart_backoff_s=1.0)


def test_cli_defaults_spawn_an_engine() -> None:
    config, log_level = config_from_args([])
    assert config.listen == "0.0.0.0:50051"
    assert config.engine_addresses == ()
    assert config.spawn == SpawnConfig()
    assert config.spawn.engine_command == (sys.executable, "-m", "tokenizer_svc")
    assert config.max_request_bytes == 4 * 1024 * 1024
    assert log_level == "INFO"


def test_cli_engines_and_engine_args() -> None:
    config, _ = config_from_args(["--engine", "unix:///tmp/a.sock", "--engine", "127.0.0.1:6000",
                                  "--request-timeout", "30", "--log-level", "DEBUG"])
    assert config.engine_addresses == ("unix:///tmp/a.sock", "127.0.0.1:6000")
    assert config.spawn is None and config.default_timeout_s == 30.0

    config, _ = config_from_args(["--listen", "127.0.0.1:7000", "--engine", "h:1",
                                  "--spawn-engine", "--engine-command", "nice python -m x",
                                  "--", "--model", "/m", "--sync"])
    assert config.listen == "127.0.0.1:7000" and config.engine_addresses == ("h:1",)
    assert config.spawn.engine_args == ("--model", "/m", "--sync")
    assert config.spawn.engine_command == ("nice", "python", "-m", "x")


@pytest.mark.parametrize(
    "argv",
    [["--engine", "h:1", "--", "--model", "m"], ["--grace-period", "-1"], ["--bogus"]],
)
def test_cli_rejects_bad_command_lines(argv: list[str]) -> None:
    with pytest.raises(SystemExit) as caught:
        config_from_args(argv)
    assert caught.value.code == 2


@pytest.mark.parametrize(("argv", "message"), [
    (["--health-interval", "0"], "--health-interval must be a finite number > 0"),
    (["--request-timeout", "-1"], "--request-timeout must be a finite number > 0"),
    (["--max-engine-message-bytes", "10"], "--max-engine-message-bytes (10) must be at least "
     "--max-request-bytes (4194304)"),
    (["--listen="], "--listen must not be empty"),
])
def test_cli_errors_name_the_flag(capsys, argv: list[str], message: str) -> None:
    with pytest.raises(SystemExit):
        config_from_args(["--engine", "h:1", *argv])
    assert f"error: {message}" in capsys.readouterr().err


def test_a_file_it_cannot_read_fails_the_start_in_one_line(caplog, tmp_path) -> None:
    config, _ = config_from_args(["--listen", "127.0.0.1:0", "--engine", "h:1",
                                  "--tls-cert", str(tmp_path / "no.pem"), "--tls-key",
                                  str(tmp_path / "no.key")])
    assert asyncio.run(serve(config)) == 1
    [record] = [r for r in caplog.records if r.levelname == "ERROR"]
    assert record.getMessage().startswith("cannot start: cannot read the TLS certificate")
    assert record.exc_info is None


def test_health_watchers_come_and_go_independently() -> None:
    """Unlike grpc's reference asyncio servicer, one watcher leaving does not deafen others."""

    async def body() -> None:
        health = HealthServicer(["", "svc"])
        server = grpc.aio.server()
        health_pb2_grpc.add_HealthServicer_to_server(health, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            request = health_pb2.HealthCheckRequest(service="svc")
            staying, leaving = stub.Watch(request), stub.Watch(request)
            assert (await staying.read()).status == NOT_SERVING
            assert (await leaving.read()).status == NOT_SERVING
            leaving.cancel()
            await asyncio.sleep(0.1)
            health.set("svc", SERVING)
            assert (await asyncio.wait_for(staying.read(), 2)).status == SERVING
            unknown = stub.Watch(health_pb2.HealthCheckRequest(service="nope"))
            assert (await unknown.read()).status == SERVICE_UNKNOWN
            health.enter_graceful_shutdown()
            assert (await asyncio.wait_for(staying.read(), 2)).status == NOT_SERVING
            health.set("svc", SERVING)  # ignored from now on
            assert health.status("svc") == NOT_SERVING
            staying.cancel()
            unknown.cancel()
        await server.stop(0)

    asyncio.run(body())


def test_engine_message_limit_defaults_flag_and_channel() -> None:
    config, _ = config_from_args(["--engine", "a:1"])
    assert config.max_engine_message_bytes == 64 * MIB
    config, _ = config_from_args(["--engine", "a:1", "--max-request-bytes", "1000",
                                  "--max-engine-message-bytes", "100000"])
    assert config.max_engine_message_bytes == 100000
    assert ("grpc.max_send_message_length", 100000) in channel_options(config)
