"""Security at the edge: TLS and mutual TLS on the public port, API keys, message sizes."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
from gateway_certs import Certs, make_certs
from gateway_fakes import SERVING, gateway_with_engine, rpc_error, run, stream_error
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from gateway.__main__ import config_from_args
from gateway.config import MIB, GatewayConfig, TlsConfig
from gateway.security import ApiKeyAuth, parse_api_keys, read_api_keys
from gateway.server import build_server
from tandem.v1 import generation_pb2 as pb

pytestmark = pytest.mark.timeout(60)

GOOD = pb.GenerateRequest(text="Say hello")
KEYS = ("k1-secret-0123", "k2-secret-4567")


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    return make_certs(tmp_path_factory.mktemp("certs"))


def tls_credentials(certs: Certs, cert: Path | None = None,
                    key: Path | None = None) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(
        root_certificates=certs.ca.read_bytes(),
        private_key=key.read_bytes() if key else None,
        certificate_chain=cert.read_bytes() if cert else None,
    )


async def check_health(channel: grpc.aio.Channel) -> int:
    stub = health_pb2_grpc.HealthStub(channel)
    response = await stub.Check(health_pb2.HealthCheckRequest(), timeout=10)
    return response.status


# --- TLS ---------------------------------------------------------------------------------------


def test_tls_serves_tls_clients_and_refuses_plain_text(certs: Certs) -> None:
    async def body() -> None:
        tls = TlsConfig(str(certs.server_cert), str(certs.server_key))
        credentials = tls_credentials(certs)
        async with gateway_with_engine(tls=tls, credentials=credentials) as (server, client, _):
            assert (await client.stub.Generate(GOOD)).text == "Hello world"
            address = f"127.0.0.1:{server.port}"
            async with grpc.aio.insecure_channel(address) as plain:
                error = await rpc_error(check_health(plain))
                assert error.code() == grpc.StatusCode.UNAVAILABLE
            # A client that does not trust the server's CA refuses the server.
            untrusting = grpc.ssl_channel_credentials(certs.stranger_cert.read_bytes())
            async with grpc.aio.secure_channel(address, untrusting) as channel:
                error = await rpc_error(check_health(channel))
                assert error.code() == grpc.StatusCode.UNAVAILABLE

    run(body())


def test_mutual_tls_refuses_clients_without_a_trusted_certificate(certs: Certs) -> None:
    async def body() -> None:
        tls = TlsConfig(str(certs.server_cert), str(certs.server_key), str(certs.ca))
        credentials = tls_credentials(certs, certs.client_cert, certs.client_key)
        async with gateway_with_engine(tls=tls, credentials=credentials) as (server, client, _):
            assert (await client.stub.Generate(GOOD)).text == "Hello world"
            address = f"127.0.0.1:{server.port}"
            for refused in (tls_credentials(certs),  # no client certificate
                            tls_credentials(certs, certs.stranger_cert, certs.stranger_key)):
                async with grpc.aio.secure_channel(address, refused) as channel:
                    error = await rpc_error(check_health(channel))
                    assert error.code() == grpc.StatusCode.UNAVAILABLE

    run(body())


def test_bad_tls_files_are_a_clear_error(tmp_path: Path, certs: Certs) -> None:
    async def body() -> None:
        def config(cert: Path, key: Path) -> GatewayConfig:
            return GatewayConfig(listen="127.0.0.1:0", engine_addresses=("127.0.0.1:1",),
                                 tls=TlsConfig(str(cert), str(key)))

        with pytest.raises(ValueError, match="cannot read the TLS certificate .*nope.pem"):
            await build_server(config(tmp_path / "nope.pem", certs.server_key))
        with pytest.raises(RuntimeError, match="not a PEM certificate chain and its private key"):
            await build_server(config(certs.server_cert, certs.client_key))  # not its key

    run(body())


# --- API keys ----------------------------------------------------------------------------------


def bearer(key: str) -> tuple[tuple[str, str]]:
    return (("authorization", f"Bearer {key}"),)


def test_api_keys_guard_generation_but_not_health_or_reflection() -> None:
    async def body() -> None:
        async with gateway_with_engine(api_keys=KEYS) as (_, client, engine):
            stub = client.stub
            unauthenticated = (grpc.StatusCode.UNAUTHENTICATED, "missing or invalid API key")
            for metadata in (None, bearer("wrong"), bearer(KEYS[0][:-1]), bearer(KEYS[0] + "x"),
                             (("authorization", f"Basic {KEYS[0]}"),),
                             (("x-api-key", KEYS[0]),)):
                error = await rpc_error(stub.Generate(GOOD, metadata=metadata))
                assert (error.code(), error.details()) == unauthenticated, metadata
            error = await stream_error(stub.GenerateStream(GOOD))
            assert (error.code(), error.details()) == unauthenticated
            error = await rpc_error(stub.Tokenize(pb.TokenizeRequest(text="x")))
            assert error.code() == grpc.StatusCode.UNAUTHENTICATED
            error = await rpc_error(stub.GetModelInfo(pb.GetModelInfoRequest()))
            assert error.code() == grpc.StatusCode.UNAUTHENTICATED
            assert engine.engine.requests == []  # nothing reached the engine

            for key in KEYS:
                assert (await stub.Generate(GOOD, metadata=bearer(key))).text == "Hello world"
            chunks = [c async for c in stub.GenerateStream(GOOD, metadata=bearer(KEYS[1]))]
            assert "".join(c.text for c in chunks) == "Hello world"
            lowercase = (("authorization", f"bearer {KEYS[0]}"),)
            assert (await stub.Generate(GOOD, metadata=lowercase)).text == "Hello world"
            assert len(engine.engine.requests) == 4

            # Probes and tools need no key.
            assert await client.health_status() == SERVING
            reflection = reflection_pb2_grpc.ServerReflectionStub(client.channel)
            request = reflection_pb2.ServerReflectionRequest(list_services="")
            responses = [r async for r in reflection.ServerReflectionInfo(iter([request]))]
            names = {s.name for s in responses[0].list_services_response.service}
            assert "tandem.v1.Generation" in names

    run(body())


def test_api_key_auth_matches_whole_bearer_tokens_only() -> None:
    auth = ApiKeyAuth(KEYS, open_services=())
    assert auth.is_allowed(bearer(KEYS[1]))
    assert auth.is_allowed((("other", "x"), ("Authorization", f"  Bearer   {KEYS[0]} ")))
    assert auth.is_allowed((("authorization", f"Bearer {KEYS[0]}".encode()),))
    for metadata in (None, (), bearer(""), bearer("k1"), bearer(KEYS[0] + KEYS[1]),
                     (("authorization", KEYS[0]),), (("authorization", f"Token {KEYS[0]}"),),
                     bearer("kë-non-ascii")):
        assert not auth.is_allowed(metadata), metadata
    with pytest.raises(ValueError):
        ApiKeyAuth((), open_services=())


def test_api_key_files_and_flags(tmp_path: Path) -> None:
    key_file = tmp_path / "keys"
    key_file.write_text(f"# gateway keys\n\n  {KEYS[0]}  \n{KEYS[1]}\n")
    assert read_api_keys(str(key_file)) == KEYS
    config, _ = config_from_args(["--engine", "h:1", "--api-key", "k0-flag", "--api-key-file",
                                  str(key_file), "--api-key", KEYS[0]])
    assert config.api_keys == ("k0-flag", *KEYS)
    assert all(key not in repr(config) for key in config.api_keys)
    assert config_from_args(["--engine", "h:1"])[0].api_keys == ()

    with pytest.raises(ValueError, match="no API keys"):
        parse_api_keys("# only a comment\n\n", "keys.txt")
    with pytest.raises(ValueError, match="cannot read the API key file"):
        read_api_keys(str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="API key #2") as caught:
        GatewayConfig(engine_addresses=("h:1",), api_keys=("ok", "has space"))
    assert "has space" not in str(caught.value)


@pytest.mark.parametrize(
    "argv",
    [
        ["--api-key-file", "/no/such/file"],
        ["--tls-cert", "c.pem"],
        ["--tls-key", "k.pem"],
        ["--tls-client-ca", "ca.pem"],
        ["--api-key", "bad key"],
        ["--engine-stop-timeout", "0"],
    ],
)
def test_cli_rejects_bad_security_flags(argv: list[str]) -> None:
    with pytest.raises(SystemExit) as caught:
        config_from_args(["--engine", "h:1", *argv] if "--engine-stop" not in argv[0] else argv)
    assert caught.value.code == 2


def test_cli_security_and_size_flags() -> None:
    config, _ = config_from_args([
        "--tls-cert", "c.pem", "--tls-key", "k.pem", "--tls-client-ca", "ca.pem",
        "--max-request-bytes", "1000", "--max-response-bytes", "3000000", "--grace-period", "7",
        "--engine-stop-timeout", "3",
    ])
    assert config.tls == TlsConfig("c.pem", "k.pem", "ca.pem")
    assert (config.max_request_bytes, config.max_response_bytes) == (1000, 3000000)
    assert config.grace_period_s == 7.0 and config.spawn.terminate_timeout_s == 3.0
    assert config_from_args([])[0].tls is None
    assert config_from_args([])[0].max_response_bytes == 64 * MIB


# --- message sizes -----------------------------------------------------------------------------


def test_engine_messages_over_the_response_limit_are_refused() -> None:
    async def body() -> None:  # per-request: multiplexed streams need 2 MiB or more
        async with gateway_with_engine(max_response_bytes=1024,
                                       engine_streams="per-request") as (_, client, engine):
            big = pb.GenerateStreamResponse(text="x" * 2000, finish_reason=pb.FINISH_REASON_STOP)
            engine.engine.chunks = [big]
            error = await stream_error(client.stub.GenerateStream(GOOD))
            assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "--max-response-bytes" in error.details()
            # Small deltas that add up to a unary response over the limit.
            small = pb.GenerateStreamResponse(text="y" * 600)
            engine.engine.chunks = [small, small, pb.GenerateStreamResponse(
                finish_reason=pb.FINISH_REASON_LENGTH)]
            chunks = [c async for c in client.stub.GenerateStream(GOOD)]
            assert sum(len(c.text) for c in chunks) == 1200
            error = await rpc_error(client.stub.Generate(GOOD))
            assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED

    run(body())
