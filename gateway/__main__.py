"""Entry point: `python -m gateway [flags] [-- ENGINE_ARGS...]`.

Builds the GatewayConfig from flags, sets up logging, runs the server until SIGINT/SIGTERM
(a graceful drain, then exit 0) or until the local engine keeps failing or refuses its flags
(exit 1).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import re
import shlex
import signal
import sys
from collections.abc import Sequence

from gateway.config import (
    DEFAULT_LISTEN,
    ENGINE_STREAMS,
    MIB,
    ROUTINGS,
    GatewayConfig,
    SpawnConfig,
    TlsConfig,
)
from gateway.security import read_api_keys
from gateway.server import GatewayServer, build_server
from tandem import LOG_FORMAT

logger = logging.getLogger("gateway")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m gateway",
        description="Tandem's public gRPC gateway (tandem.v1.Generation, health, reflection).",
        epilog="Arguments after `--` are passed to the spawned engine (python -m tokenizer_svc).",
    )
    parser.add_argument("--listen", default=DEFAULT_LISTEN, metavar="ADDR",
                        help=f"address to serve on (default {DEFAULT_LISTEN})")
    parser.add_argument("--engine", action="append", default=[], metavar="ADDR",
                        help="an engine to route to, e.g. unix:///tmp/e.sock or 127.0.0.1:6000 "
                        "(repeatable)")
    parser.add_argument("--spawn-engine", action="store_true",
                        help="start and supervise a local engine (the default without --engine)")
    parser.add_argument("--engine-command", metavar="CMD",
                        help="command that starts a spawned engine (default: "
                        "'<this python> -m tokenizer_svc'); --listen and ENGINE_ARGS are appended")
    parser.add_argument("--engine-max-quick-failures", type=int, default=5, metavar="N",
                        help="give up (exit 1) after N quick engine failures in a row (default 5)")
    parser.add_argument("--engine-stop-timeout", type=float, default=10.0, metavar="S",
                        help="on shutdown, SIGKILL the spawned engine if it has not exited this "
                        "long after SIGTERM (default 10)")
    parser.add_argument("--max-request-bytes", type=int, default=4 * MIB, metavar="N",
                        help="largest request message accepted (default 4 MiB)")
    parser.add_argument("--max-response-bytes", type=int, default=64 * MIB, metavar="N",
                        help="largest message relayed from an engine or sent to a client "
                        "(default 64 MiB; long unary answers: use GenerateStream)")
    parser.add_argument("--max-engine-message-bytes", type=int,
                        default=GatewayConfig.max_engine_message_bytes, metavar="N",
                        help="largest message sent to an engine, a request with its wrapping "
                        "(default 64 MiB, as engines accept; at least --max-request-bytes + "
                        "64 KiB); a request over it is refused with RESOURCE_EXHAUSTED")
    parser.add_argument("--request-timeout", type=float, metavar="S",
                        help="deadline for generation requests that set none, enforced even "
                        "on a client that stopped reading (default: none)")
    parser.add_argument("--rpc-timeout", type=float, default=30.0, metavar="S",
                        help="deadline for Tokenize and internal calls that set none (default 30)")
    parser.add_argument("--routing", choices=ROUTINGS, default="prefix",
                        help="prefix (default): send a request to the engine its input's "
                        "beginning went to before (that engine's prefix cache), unless that "
                        "engine is busier than the least loaded one by more than a small "
                        "margin; least-loaded: always the fewest requests in flight")
    parser.add_argument("--engine-streams", choices=ENGINE_STREAMS, default="multiplexed",
                        help="multiplexed (default): one stream per engine carries every "
                        "request, one message per engine step (needs --max-response-bytes of "
                        "at least 2 MiB); per-request: one stream to the engine per request")
    parser.add_argument("--metrics-port", type=int, metavar="PORT",
                        help="serve Prometheus metrics on this port (0: any free port; "
                        "default: off)")
    parser.add_argument("--metrics-host", default="127.0.0.1",
                        help="address of the metrics endpoint (0.0.0.0 to expose it)")
    parser.add_argument("--http-listen", metavar="HOST:PORT",
                        help="also serve an OpenAI-compatible HTTP API here (/v1/completions, "
                        "/v1/chat/completions, /v1/models, /tokenize; TLS and API keys as on "
                        "the gRPC port; port 0: any free port; default: off)")
    parser.add_argument("--health-interval", type=float, default=0.5, metavar="S",
                        help="how often each engine's health is polled (default 0.5)")
    parser.add_argument("--grace-period", type=float, default=5.0, metavar="S",
                        help="on SIGTERM: health NOT_SERVING, new requests UNAVAILABLE, and "
                        "in-flight requests get this long to finish before they are cancelled "
                        "(default 5)")
    security = parser.add_argument_group("security")
    security.add_argument("--tls-cert", metavar="FILE",
                          help="serve TLS with this PEM certificate chain (needs --tls-key)")
    security.add_argument("--tls-key", metavar="FILE", help="the PEM private key of --tls-cert")
    security.add_argument("--tls-client-ca", metavar="FILE",
                          help="mutual TLS: clients must present a certificate signed by this "
                          "PEM CA bundle")
    security.add_argument("--api-key-file", metavar="FILE",
                          help="require `authorization: Bearer <key>` with one of the keys in "
                          "FILE (one per line, # comments) on all but health and reflection")
    security.add_argument("--api-key", action="append", default=[], metavar="KEY",
                          help="an accepted API key (repeatable; visible in `ps`: prefer "
                          "--api-key-file)")
    parser.add_argument("--log-level", default="INFO",
                        choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    return parser


def config_from_args(argv: Sequence[str]) -> tuple[GatewayConfig, str]:
    """The config (and the log level) for a command line; exits 2 on a bad one."""
    argv = list(argv)
    engine_args: list[str] = []
    if "--" in argv:
        split = argv.index("--")
        argv, engine_args = argv[:split], argv[split + 1:]
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return _build_config(args, tuple(engine_args)), args.log_level
    except ValueError as exc:
        parser.error(_in_flag_names(str(exc)))
        raise  # unreachable: parser.error exits


# The flag that sets each GatewayConfig/SpawnConfig field whose name its errors give.
FLAG_OF_FIELD = {
    "engine_command": "--engine-command",
    "max_quick_failures": "--engine-max-quick-failures",
    "terminate_timeout_s": "--engine-stop-timeout",
    "max_request_bytes": "--max-request-bytes",
    "max_response_bytes": "--max-response-bytes",
    "max_engine_message_bytes": "--max-engine-message-bytes",
    "default_timeout_s": "--request-timeout",
    "rpc_timeout_s": "--rpc-timeout",
    "health_poll_interval_s": "--health-interval",
    "grace_period_s": "--grace-period",
    "metrics_port": "--metrics-port",
    "http_listen": "--http-listen",
    "engine_streams": "--engine-streams",
    "listen address": "--listen",
    "engine addresses": "--engine",
}


def _in_flag_names(message: str) -> str:
    """A config error as the command line's user knows it: fields renamed to their flags."""
    for field, flag in FLAG_OF_FIELD.items():
        message = re.sub(rf"\b{field}\b", flag, message)
    return message


def _build_config(args: argparse.Namespace, engine_args: tuple[str, ...]) -> GatewayConfig:
    spawn = None
    if args.spawn_engine or not args.engine:
        spawn_kwargs = {}
        if args.engine_command:
            spawn_kwargs["engine_command"] = tuple(shlex.split(args.engine_command))
        spawn = SpawnConfig(engine_args=engine_args,
                            max_quick_failures=args.engine_max_quick_failures,
                            terminate_timeout_s=args.engine_stop_timeout, **spawn_kwargs)
    elif engine_args or args.engine_command:
        raise ValueError("engine arguments after `--` and --engine-command need a spawned "
                         "engine (--spawn-engine)")
    return GatewayConfig(
        listen=args.listen,
        engine_addresses=tuple(args.engine),
        spawn=spawn,
        max_request_bytes=args.max_request_bytes,
        max_response_bytes=args.max_response_bytes,
        max_engine_message_bytes=args.max_engine_message_bytes,
        default_timeout_s=args.request_timeout,
        rpc_timeout_s=args.rpc_timeout,
        health_poll_interval_s=args.health_interval,
        grace_period_s=args.grace_period,
        routing=args.routing,
        engine_streams=args.engine_streams,
        metrics_port=args.metrics_port,
        metrics_host=args.metrics_host,
        http_listen=args.http_listen,
        tls=_tls_config(args),
        api_keys=_api_keys(args),
    )


def _tls_config(args: argparse.Namespace) -> TlsConfig | None:
    if args.tls_cert is None and args.tls_key is None:
        if args.tls_client_ca is not None:
            raise ValueError("--tls-client-ca needs TLS (--tls-cert and --tls-key)")
        return None
    if args.tls_cert is None or args.tls_key is None:
        raise ValueError("TLS needs both --tls-cert and --tls-key")
    return TlsConfig(args.tls_cert, args.tls_key, args.tls_client_ca)


def _api_keys(args: argparse.Namespace) -> tuple[str, ...]:
    keys = list(args.api_key)
    if args.api_key_file is not None:
        keys.extend(read_api_keys(args.api_key_file))
    return tuple(dict.fromkeys(keys))  # without duplicates, in order


async def serve(config: GatewayConfig) -> int:
    """Runs the gateway until a signal (0) or a fatal engine failure (1)."""
    try:
        server = await build_server(config)
    except (ValueError, RuntimeError) as exc:  # a file it cannot read, an address in use
        logger.error("cannot start: %s", exc)
        return 1
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, _on_signal, server, sig)
    try:
        try:
            await server.start()
        except RuntimeError as exc:  # the HTTP API's address in use
            logger.error("cannot start: %s", exc)
            return 1
        exit_code = await server.wait()
    finally:
        await server.drain()
    return exit_code


def _on_signal(server: GatewayServer, sig: signal.Signals) -> None:
    logger.info("received %s; draining (grace period %.1f s)", sig.name,
                server.config.grace_period_s)
    server.request_stop(exit_code=0)


def main(argv: Sequence[str] | None = None) -> int:
    config, log_level = config_from_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=log_level, format=LOG_FORMAT)
    try:
        return asyncio.run(serve(config))
    except Exception:  # noqa: BLE001 - a fatal error: report it and exit non-zero
        logger.exception("gateway failed")
        return 1


if __name__ == "__main__":
    sys.exit(main())
