"""Security at the edge: TLS credentials for the public port and API-key authentication.

API keys are checked by `ApiKeyAuth`, a server interceptor, before a call reaches any servicer:
every method needs `authorization: Bearer <key>` metadata matching one of the keys, except
those of the services in `open_services` (health and reflection, so that probes and tools
work without a key). A refused call ends with UNAUTHENTICATED before its request message is
even parsed. Keys are compared in constant time, against every key, so neither the timing nor
the position of a match says anything about the keys.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Awaitable, Callable, Iterable

import grpc

from gateway.config import TlsConfig

logger = logging.getLogger(__name__)

INVALID_API_KEY = "missing or invalid API key"
AUTHORIZATION = "authorization"
BEARER = "bearer"


def parse_api_keys(text: str, source: str) -> tuple[str, ...]:
    """The keys in a key file: one per line; blank lines and `#` comments are skipped."""
    lines = (line.strip() for line in text.splitlines())
    keys = tuple(line for line in lines if line and not line.startswith("#"))
    if not keys:
        raise ValueError(f"{source}: no API keys in it (one key per line)")
    return keys


def read_api_keys(path: str) -> tuple[str, ...]:
    """The keys in the file at `path` (ValueError if it cannot be read or holds none)."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"cannot read the API key file {path}: {exc}") from exc
    return parse_api_keys(text, path)


def server_credentials(tls: TlsConfig) -> grpc.ServerCredentials:
    """Credentials for the public port; with a client CA, clients must present a certificate
    that it signed (mutual TLS)."""
    cert, key = _read(tls.cert_file, "TLS certificate"), _read(tls.key_file, "TLS key")
    client_ca = None if tls.client_ca_file is None else _read(tls.client_ca_file, "client CA")
    return grpc.ssl_server_credentials(
        [(key, cert)], root_certificates=client_ca, require_client_auth=client_ca is not None
    )


def _read(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise ValueError(f"cannot read the {what} {path}: {exc}") from exc
    if not data.strip():
        raise ValueError(f"the {what} {path} is empty")
    return data


Continuation = Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler | None]]


class ApiKeyAuth(grpc.aio.ServerInterceptor):
    """Refuses calls without a valid `authorization: Bearer <key>` with UNAUTHENTICATED."""

    def __init__(self, keys: Iterable[str], open_services: Iterable[str]) -> None:
        self._keys = tuple(key.encode() for key in keys)
        if not self._keys:
            raise ValueError("ApiKeyAuth needs at least one key")
        self._open_prefixes = tuple(f"/{service}/" for service in open_services)
        self._refusal = grpc.unary_unary_rpc_method_handler(_refuse)

    async def intercept_service(
        self, continuation: Continuation, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler | None:
        method = handler_call_details.method
        if method.startswith(self._open_prefixes) or self.is_allowed(
            handler_call_details.invocation_metadata
        ):
            return await continuation(handler_call_details)
        logger.debug("refused %s: %s", method, INVALID_API_KEY)
        return self._refusal

    def is_allowed(self, metadata: Iterable[tuple[str, str | bytes]] | None) -> bool:
        """Whether the metadata carries `authorization: Bearer <one of the keys>`."""
        presented = _bearer_token(metadata or ())
        if presented is None:
            return False
        is_match = False
        for key in self._keys:  # no early exit: the time taken does not depend on which matched
            is_match |= hmac.compare_digest(presented, key)
        return is_match


def _bearer_token(metadata: Iterable[tuple[str, str | bytes]]) -> bytes | None:
    """The token of the first `authorization` entry if it uses the Bearer scheme."""
    for key, value in metadata:
        if key.lower() != AUTHORIZATION:
            continue
        text = value.decode("latin-1") if isinstance(value, bytes) else value
        scheme, _, token = text.strip().partition(" ")
        token = token.strip()
        if scheme.lower() != BEARER or not token:
            return None
        return token.encode()
    return None


async def _refuse(request: bytes, context: grpc.aio.ServicerContext) -> None:
    await context.abort(grpc.StatusCode.UNAUTHENTICATED, INVALID_API_KEY)
