"""The gateway's configuration: one frozen dataclass, built once by `__main__` from flags."""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field

from tandem.link import ENGINE_MAX_MESSAGE_BYTES

DEFAULT_LISTEN = "0.0.0.0:50051"
KIB = 1024
MIB = 1024 * KIB
# what an engine message may add around a client's request (EngineRequest, EngineCall: about
# 80 bytes), with room to spare: --max-engine-message-bytes must exceed --max-request-bytes by it
ENGINE_MESSAGE_MARGIN = 64 * KIB
ROUTINGS = ("prefix", "least-loaded")
ENGINE_STREAMS = ("per-request", "multiplexed")
MUX_MIN_BYTES = 2 * MIB  # engines cut GenerateMany messages at ~1 MiB


def default_engine_command() -> tuple[str, ...]:
    """How a spawned engine is started when no other command is given."""
    return (sys.executable, "-m", "tokenizer_svc")


@dataclass(frozen=True)
class SpawnConfig:
    """The local engine that the gateway starts and supervises itself.

    The child is run as `engine_command + ("--listen", <unix socket>) + engine_args`.
    """

    engine_args: tuple[str, ...] = ()
    engine_command: tuple[str, ...] = field(default_factory=default_engine_command)
    # A child that exits within `stable_after_s` of its start counts as a quick failure;
    # after `max_quick_failures` in a row the gateway gives up and exits non-zero.
    max_quick_failures: int = 5
    stable_after_s: float = 60.0
    restart_backoff_s: float = 1.0  # doubled after each quick failure
    max_restart_backoff_s: float = 30.0
    terminate_timeout_s: float = 10.0  # SIGTERM, then SIGKILL after this long

    def __post_init__(self) -> None:
        if not self.engine_command:
            raise ValueError("engine_command must not be empty")
        if self.max_quick_failures < 1:
            raise ValueError(f"max_quick_failures must be >= 1, got {self.max_quick_failures}")
        _require_positive("stable_after_s", self.stable_after_s)
        _require_positive("restart_backoff_s", self.restart_backoff_s)
        _require_positive("terminate_timeout_s", self.terminate_timeout_s)
        if self.max_restart_backoff_s < self.restart_backoff_s:
            raise ValueError(
                f"max_restart_backoff_s ({self.max_restart_backoff_s}) must be >= "
                f"restart_backoff_s ({self.restart_backoff_s})"
            )


@dataclass(frozen=True)
class TlsConfig:
    """TLS on the public port: the server's certificate chain and key (PEM files), and
    optionally a CA whose certificates clients must present (mutual TLS)."""

    cert_file: str
    key_file: str
    client_ca_file: str | None = None

    def __post_init__(self) -> None:
        if not self.cert_file or not self.key_file:
            raise ValueError("TLS needs both a certificate and a key file (--tls-cert, --tls-key)")
        if self.client_ca_file == "":
            raise ValueError("client_ca_file must not be empty")


@dataclass(frozen=True)
class GatewayConfig:
    """Everything the gateway process needs to know."""

    listen: str = DEFAULT_LISTEN
    engine_addresses: tuple[str, ...] = ()
    spawn: SpawnConfig | None = None  # None: no local engine is spawned
    max_request_bytes: int = 4 * MIB  # largest request a client may send
    max_response_bytes: int = 64 * MIB  # largest message relayed from an engine
    # largest message sent to an engine (a request, wrapped); engines must accept it
    max_engine_message_bytes: int = ENGINE_MAX_MESSAGE_BYTES
    # Deadline applied to Generate/GenerateStream when the client sets none (None: no limit).
    default_timeout_s: float | None = None
    # Deadline of Tokenize and of internal calls (GetModelInfo) when the client sets none.
    rpc_timeout_s: float = 30.0
    health_poll_interval_s: float = 0.5
    health_check_timeout_s: float = 2.0
    # On shutdown (SIGTERM), how long in-flight requests may finish before they are cancelled.
    grace_period_s: float = 5.0
    tls: TlsConfig | None = None  # None: plain text on the public port
    # Clients must send `authorization: Bearer <one of these>` (none: no authentication).
    api_keys: tuple[str, ...] = field(default=(), repr=False)
    keepalive_time_s: float = 20.0  # engine channels: ping after this long without reads
    keepalive_timeout_s: float = 10.0
    max_reconnect_backoff_s: float = 1.0  # engine channels: reconnect quickly after restarts
    # "prefix": prefer the engine a request's input beginning went to before (its prefix
    # cache), within a load margin; "least-loaded": always the fewest requests in flight.
    routing: str = "prefix"
    # "multiplexed": one GenerateMany stream per engine carries every request (one message
    # per engine step); "per-request": a Generate stream to the engine per request.
    engine_streams: str = "multiplexed"
    metrics_port: int | None = None  # Prometheus /metrics over HTTP (None: off; 0: any port)
    metrics_host: str = "127.0.0.1"
    # The OpenAI-compatible HTTP API (gateway.openai_api), HOST:PORT (None: off; port 0: any)
    http_listen: str | None = None

    def __post_init__(self) -> None:
        if not self.listen:
            raise ValueError("listen address must not be empty")
        if not self.engine_addresses and self.spawn is None:
            raise ValueError("no engine: give at least one engine address or spawn one")
        if any(not address for address in self.engine_addresses):
            raise ValueError("engine addresses must not be empty")
        if len(set(self.engine_addresses)) != len(self.engine_addresses):
            raise ValueError(f"duplicate engine addresses: {list(self.engine_addresses)}")
        for name in ("max_request_bytes", "max_response_bytes", "max_engine_message_bytes"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.max_engine_message_bytes < self.max_request_bytes + ENGINE_MESSAGE_MARGIN:
            raise ValueError(  # else a request the gateway accepts could not reach an engine
                f"max_engine_message_bytes ({self.max_engine_message_bytes}) must be at least "
                f"max_request_bytes ({self.max_request_bytes}) + {ENGINE_MESSAGE_MARGIN // KIB} "
                "KiB")
        if self.default_timeout_s is not None:
            _require_positive("default_timeout_s", self.default_timeout_s)
        for name in (
            "rpc_timeout_s",
            "health_poll_interval_s",
            "health_check_timeout_s",
            "keepalive_time_s",
            "keepalive_timeout_s",
            "max_reconnect_backoff_s",
        ):
            _require_positive(name, getattr(self, name))
        if self.routing not in ROUTINGS:
            raise ValueError(f"routing must be one of {', '.join(ROUTINGS)}, not {self.routing!r}")
        if self.metrics_port is not None and not 0 <= self.metrics_port <= 65535:
            raise ValueError(f"metrics_port must be 0-65535, got {self.metrics_port}")
        if self.http_listen is not None:
            split_host_port(self.http_listen)
        if self.engine_streams not in ENGINE_STREAMS:
            raise ValueError(f"engine_streams must be one of {', '.join(ENGINE_STREAMS)}, "
                             f"not {self.engine_streams!r}")
        if self.engine_streams == "multiplexed" and self.max_response_bytes < MUX_MIN_BYTES:
            raise ValueError(  # one engine message carries many requests: never refuse one
                f"max_response_bytes must be at least {MUX_MIN_BYTES // MIB} MiB with "
                f"multiplexed engine streams (engines send messages of up to ~1 MiB), "
                f"got {self.max_response_bytes}")
        if not math.isfinite(self.grace_period_s) or self.grace_period_s < 0:
            raise ValueError(f"grace_period_s must be finite and >= 0, got {self.grace_period_s}")
        for i, key in enumerate(self.api_keys):  # never echo a key in a message
            if not key or not key.isascii() or not key.isprintable() or " " in key:
                raise ValueError(f"API key #{i + 1} is empty or not printable ASCII without "
                                 "spaces (it must fit an `authorization: Bearer` header)")

    @property
    def spawn_engine(self) -> bool:
        return self.spawn is not None


def split_host_port(address: str) -> tuple[str, int]:
    """HOST:PORT (an IPv6 host in brackets) as (host, port); ValueError if it is not one."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"http_listen must be HOST:PORT with a port 0-65535, got {address!r}")
    return host.strip("[]"), int(port)


def _require_positive(name: str, value: float) -> None:
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {value}")
