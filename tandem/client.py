"""A small Python client for Tandem's public API (`tandem.v1.Generation` and gRPC health).

    from tandem.client import Client

    with Client("localhost:50051") as client:
        print(client.generate("Once upon a time", max_tokens=32, temperature=0).text)
        for delta in client.stream(messages=[{"role": "user", "content": "Hi!"}]):
            print(delta.text, end="", flush=True)

`AsyncClient` is the same for asyncio programs: `await client.generate(...)`, `async for delta
in client.stream(...)`, `async with AsyncClient(...) as client`.

Sampling keywords are the fields of `SamplingParams` (`max_tokens`, `temperature`, `top_p`,
`top_k`, `min_p`, `seed`, `stop`, `stop_token_ids`, `logit_bias` (a dict), `ignore_eos`,
`logprobs`, `top_logprobs`, ...); `None` leaves a field unset. Every RPC failure is raised as a
`TandemError`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from typing import Any, TypeAlias

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tandem.v1 import generation_pb2 as pb
from tandem.v1 import generation_pb2_grpc

__all__ = [
    "AsyncClient", "Client", "Completion", "Delta", "ModelInfo", "Timing", "TokenLogprob",
    "Tokens", "TandemError",
]

DEFAULT_ADDRESS = "localhost:50051"
SAMPLING_FIELDS = frozenset(pb.SamplingParams.DESCRIPTOR.fields_by_name)

# A chat turn: {"role": "user", "content": "..."} or ("user", "...").
Message: TypeAlias = Mapping[str, str] | tuple[str, str]


class TandemError(Exception):
    """A failed RPC: its gRPC status code and the server's message."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message

    @classmethod
    def from_rpc_error(cls, error: grpc.RpcError) -> TandemError:
        code = error.code() if hasattr(error, "code") else grpc.StatusCode.UNKNOWN
        details = error.details() if hasattr(error, "details") else str(error)
        return cls(code, details or "")


@dataclasses.dataclass(frozen=True)
class Timing:
    """Seconds from the request's arrival at the engine (see `tandem.v1.Timing`)."""

    queue_seconds: float
    first_token_seconds: float
    total_seconds: float


@dataclasses.dataclass(frozen=True)
class TokenLogprob:
    """A generated token's log-probability and, when asked, the top alternatives
    as (token_id, logprob) pairs, most likely first; `token` is the token's text."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]]
    token: str = ""


@dataclasses.dataclass(frozen=True)
class Completion:
    """A whole completion. `finish_reason` is "stop" or "length" (None if the server sent none)."""

    text: str
    token_ids: list[int]
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int
    logprobs: list[TokenLogprob]
    request_id: str
    timing: Timing | None
    cached_prompt_tokens: int = 0  # of prompt_tokens, served from the prefix cache


@dataclasses.dataclass(frozen=True)
class Delta:
    """One piece of a stream. The last one carries `finish_reason`, the token counts and
    `timing`; on the others they are None."""

    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprob]
    request_id: str
    finish_reason: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    timing: Timing | None = None
    cached_prompt_tokens: int | None = None


@dataclasses.dataclass(frozen=True)
class Tokens:
    """An input as the model sees it: token ids and each token's text piece."""

    token_ids: list[int]
    tokens: list[str]


@dataclasses.dataclass(frozen=True)
class ModelInfo:
    """The model being served and the limits requests must keep (see `tandem.v1.ModelInfo`)."""

    model: str
    vocab_size: int
    max_context_tokens: int
    default_max_tokens: int
    eos_token_ids: list[int]
    max_top_logprobs: int
    device: str
    dtype: str
    mode: str
    kv_block_size: int
    kv_num_blocks: int


class _Connection:
    """The channel, stubs, metadata and default deadline that both clients share."""

    _grpc: Any = grpc  # AsyncClient: grpc.aio

    def __init__(self, address: str = DEFAULT_ADDRESS, *, api_key: str | None = None,
                 tls: bool = False, root_certificates: bytes | None = None,
                 timeout: float | None = None) -> None:
        if tls or root_certificates is not None:
            creds = grpc.ssl_channel_credentials(root_certificates=root_certificates)
            self._channel = self._grpc.secure_channel(address, creds)
        else:
            self._channel = self._grpc.insecure_channel(address)
        self.address = address
        self.timeout = timeout
        self._metadata = (("authorization", f"Bearer {api_key}"),) if api_key else ()
        self._stub = generation_pb2_grpc.GenerationStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)

    def _timeout(self, timeout: float | None) -> float | None:
        return self.timeout if timeout is None else timeout

    def _stream_call(self, request: pb.GenerateRequest, timeout: float | None) -> Any:
        return self._stub.GenerateStream(request, timeout=self._timeout(timeout),
                                         metadata=self._metadata)


class Client(_Connection):
    """A connection to a Tandem gateway. Use it as a context manager, or call `close()`.

    `api_key` is sent as `authorization: Bearer <key>` metadata on every call. `tls` (or
    `root_certificates`, PEM bytes) opens a secure channel. `timeout` is the default deadline
    of each call in seconds (None: none); every method takes `timeout=` to override it.
    """

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def generate(self, prompt: str | None = None, *, messages: Sequence[Message] | None = None,
                 token_ids: Sequence[int] | None = None, request_id: str | None = None,
                 priority: int = 0, continue_final_message: bool = False,
                 timeout: float | None = None, **sampling: Any) -> Completion:
        """Generates a completion of exactly one of `prompt`, `messages` or `token_ids`.
        A higher `priority` is scheduled first (see `GenerateRequest.priority`);
        `continue_final_message` continues the last, assistant, message instead of starting
        a new turn (see `ChatMessages.continue_final_message`)."""
        request = build_request(prompt, messages, token_ids, request_id, sampling, "generate",
                                priority, continue_final_message)
        return completion(self._call(self._stub.Generate, request, timeout))

    def stream(self, prompt: str | None = None, *, messages: Sequence[Message] | None = None,
               token_ids: Sequence[int] | None = None, request_id: str | None = None,
               priority: int = 0, continue_final_message: bool = False,
               timeout: float | None = None, **sampling: Any) -> Iterator[Delta]:
        """Streams a completion as it is produced. Stopping the iteration early (or closing
        the iterator) cancels the generation on the server."""
        return _deltas(self._stream_call(
            build_request(prompt, messages, token_ids, request_id, sampling, "stream",
                          priority, continue_final_message), timeout))

    def tokenize(self, prompt: str | None = None, *, messages: Sequence[Message] | None = None,
                 continue_final_message: bool = False, timeout: float | None = None) -> Tokens:
        """Tokenizes `prompt` or `messages` exactly as `generate` would."""
        request = tokenize_request(prompt, messages, continue_final_message)
        response = self._call(self._stub.Tokenize, request, timeout)
        return Tokens(token_ids=list(response.token_ids), tokens=list(response.tokens))

    def model_info(self, *, timeout: float | None = None) -> ModelInfo:
        """Describes the model being served."""
        return model_info(self._call(self._stub.GetModelInfo, pb.GetModelInfoRequest(),
                                     timeout))

    def health(self, service: str = "", *, timeout: float | None = None) -> str:
        """The gRPC health status of `service` ("" is the whole server): "SERVING",
        "NOT_SERVING", ..."""
        request = health_pb2.HealthCheckRequest(service=service)
        return health_status(self._call(self._health.Check, request, timeout))

    def _call(self, method: Any, request: Any, timeout: float | None) -> Any:
        try:
            return method(request, timeout=self._timeout(timeout), metadata=self._metadata)
        except grpc.RpcError as error:
            raise TandemError.from_rpc_error(error) from None


class AsyncClient(_Connection):
    """`Client` for asyncio (grpc.aio): the same arguments, and the same methods as
    coroutines; `stream()` is an async iterator, and leaving it early (or `aclose()`)
    cancels the generation on the server. Use it as an async context manager, or `await
    close()`."""

    _grpc = grpc.aio

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self._channel.close()

    async def generate(self, prompt: str | None = None, *,
                       messages: Sequence[Message] | None = None,
                       token_ids: Sequence[int] | None = None, request_id: str | None = None,
                       priority: int = 0, continue_final_message: bool = False,
                       timeout: float | None = None, **sampling: Any) -> Completion:
        """Generates a completion of exactly one of `prompt`, `messages` or `token_ids`."""
        request = build_request(prompt, messages, token_ids, request_id, sampling, "generate",
                                priority, continue_final_message)
        return completion(await self._call(self._stub.Generate, request, timeout))

    def stream(self, prompt: str | None = None, *, messages: Sequence[Message] | None = None,
               token_ids: Sequence[int] | None = None, request_id: str | None = None,
               priority: int = 0, continue_final_message: bool = False,
               timeout: float | None = None, **sampling: Any) -> AsyncIterator[Delta]:
        """Streams a completion as it is produced (an async iterator)."""
        return _async_deltas(self._stream_call(
            build_request(prompt, messages, token_ids, request_id, sampling, "stream",
                          priority, continue_final_message), timeout))

    async def tokenize(self, prompt: str | None = None, *,
                       messages: Sequence[Message] | None = None,
                       continue_final_message: bool = False,
                       timeout: float | None = None) -> Tokens:
        """Tokenizes `prompt` or `messages` exactly as `generate` would."""
        request = tokenize_request(prompt, messages, continue_final_message)
        response = await self._call(self._stub.Tokenize, request, timeout)
        return Tokens(token_ids=list(response.token_ids), tokens=list(response.tokens))

    async def model_info(self, *, timeout: float | None = None) -> ModelInfo:
        """Describes the model being served."""
        return model_info(await self._call(self._stub.GetModelInfo, pb.GetModelInfoRequest(),
                                           timeout))

    async def health(self, service: str = "", *, timeout: float | None = None) -> str:
        """The gRPC health status of `service` ("" is the whole server)."""
        request = health_pb2.HealthCheckRequest(service=service)
        return health_status(await self._call(self._health.Check, request, timeout))

    async def _call(self, method: Any, request: Any, timeout: float | None) -> Any:
        try:
            return await method(request, timeout=self._timeout(timeout),
                                metadata=self._metadata)
        except grpc.RpcError as error:
            raise TandemError.from_rpc_error(error) from None


def _deltas(call: Any) -> Iterator[Delta]:
    try:
        for msg in call:
            yield delta(msg)
    except grpc.RpcError as error:
        raise TandemError.from_rpc_error(error) from None
    finally:
        call.cancel()  # a no-op once the stream has ended; stops the server when abandoned


async def _async_deltas(call: Any) -> AsyncIterator[Delta]:
    try:
        async for msg in call:
            yield delta(msg)
    except grpc.RpcError as error:
        raise TandemError.from_rpc_error(error) from None
    finally:
        call.cancel()


def completion(response: pb.GenerateResponse) -> Completion:
    return Completion(
        text=response.text,
        token_ids=list(response.token_ids),
        finish_reason=finish_reason_name(response.finish_reason),
        prompt_tokens=response.usage.prompt_tokens,
        completion_tokens=response.usage.completion_tokens,
        logprobs=[token_logprob(lp) for lp in response.logprobs],
        request_id=response.request_id,
        timing=timing(response),
        cached_prompt_tokens=response.usage.cached_prompt_tokens,
    )


def tokenize_request(prompt: str | None, messages: Sequence[Message] | None,
                     continue_final: bool = False) -> pb.TokenizeRequest:
    if (prompt is None) == (messages is None):
        raise ValueError("tokenize() takes exactly one of prompt or messages")
    if prompt is not None:
        return pb.TokenizeRequest(text=prompt)
    return pb.TokenizeRequest(messages=chat_messages(messages, continue_final))


def model_info(info: pb.ModelInfo) -> ModelInfo:
    fields = {f.name: getattr(info, f.name) for f in dataclasses.fields(ModelInfo)}
    fields["eos_token_ids"] = list(info.eos_token_ids)
    return ModelInfo(**fields)


def health_status(response: health_pb2.HealthCheckResponse) -> str:
    return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)


def build_request(prompt: str | None, messages: Sequence[Message] | None,
                  token_ids: Sequence[int] | None, request_id: str | None,
                  sampling: Mapping[str, Any], caller: str,
                  priority: int = 0, continue_final: bool = False) -> pb.GenerateRequest:
    """The `GenerateRequest` for one input and the sampling keywords (None: unset)."""
    unknown = sorted(set(sampling) - SAMPLING_FIELDS)
    if unknown:
        raise TypeError(f"{caller}() got an unexpected keyword argument {unknown[0]!r}")
    given = [name for name, value in (("prompt", prompt), ("messages", messages),
                                      ("token_ids", token_ids)) if value is not None]
    if len(given) != 1:
        raise ValueError(f"{caller}() takes exactly one of prompt, messages or token_ids, "
                         f"got {', '.join(given) or 'none'}")
    fields = {k: v for k, v in sampling.items() if v is not None}
    if isinstance(fields.get("stop"), str):
        fields["stop"] = [fields["stop"]]
    request = pb.GenerateRequest(
        sampling=pb.SamplingParams(**fields),
        request_id=request_id or "",
        priority=priority,
    )
    if prompt is not None:
        request.text = prompt
    elif messages is not None:
        request.messages.CopyFrom(chat_messages(messages, continue_final))
    else:
        request.token_ids.ids.extend(token_ids)
    return request


def chat_messages(messages: Sequence[Message], continue_final: bool = False) -> pb.ChatMessages:
    turns = []
    for message in messages:
        if isinstance(message, Mapping):
            turns.append(pb.ChatMessage(role=message["role"], content=message["content"]))
        else:
            role, content = message
            turns.append(pb.ChatMessage(role=role, content=content))
    return pb.ChatMessages(messages=turns, continue_final_message=continue_final)


def finish_reason_name(value: int) -> str | None:
    """FINISH_REASON_STOP -> "stop", FINISH_REASON_LENGTH -> "length", unspecified -> None."""
    if value == pb.FINISH_REASON_UNSPECIFIED:
        return None
    try:
        return pb.FinishReason.Name(value).removeprefix("FINISH_REASON_").lower()
    except ValueError:  # a reason newer than this client
        return f"unknown_{value}"


def timing(msg: pb.GenerateResponse | pb.GenerateStreamResponse) -> Timing | None:
    if not msg.HasField("timing"):
        return None
    t = msg.timing
    return Timing(t.queue_seconds, t.first_token_seconds, t.total_seconds)


def token_logprob(lp: pb.TokenLogprob) -> TokenLogprob:
    return TokenLogprob(lp.token_id, lp.logprob, [(t.token_id, t.logprob) for t in lp.top],
                        lp.token)


def delta(msg: pb.GenerateStreamResponse) -> Delta:
    usage = msg.usage if msg.HasField("usage") else None
    return Delta(
        text=msg.text,
        token_ids=list(msg.token_ids),
        logprobs=[token_logprob(lp) for lp in msg.logprobs],
        request_id=msg.request_id,
        finish_reason=finish_reason_name(msg.finish_reason),
        prompt_tokens=usage.prompt_tokens if usage else None,
        completion_tokens=usage.completion_tokens if usage else None,
        timing=timing(msg),
        cached_prompt_tokens=usage.cached_prompt_tokens if usage else None,
    )
