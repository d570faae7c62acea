"""An OpenAI-compatible HTTP API in front of the gateway's own gRPC service (`--http-listen`).

`POST /v1/completions` and `POST /v1/chat/completions` (both streamed as server-sent events
with `"stream": true`), `GET /v1/models` (and `/v1/models/{id}`), `POST /tokenize` and `GET
/health`. Each choice becomes one call to `tandem.v1.Generation` over a private Unix socket of
the same gateway, so validation, API keys (the `Authorization` header is passed on), deadlines
(`--request-timeout`), routing, metrics and draining are the gRPC API's own: this module only
translates, in both directions. A client that disconnects cancels its call.

Differences from OpenAI's API: one prompt per request; `n` choices (up to `MAX_CHOICES`) are
`n` gRPC calls made at once, choice `i` seeded with `seed + i` where a seed is given, so that
it equals a request of its own with that seed; Tandem's own sampling fields (`top_k`,
`min_p`, `repetition_penalty`, `min_tokens`, `ignore_eos`, `stop_token_ids`), `priority` and
chat's `continue_final_message` are taken too, and `return_token_ids` adds each choice's (or
delta's) `token_ids`; fields Tandem has no use for (`user`, `metadata`, ...) are ignored.
"""

from __future__ import annotations

import asyncio
import json
import logging
import ssl
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import grpc
from aiohttp import web
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gateway.config import TlsConfig
from tandem.v1 import generation_pb2 as pb
from tandem.v1 import generation_pb2_grpc

logger = logging.getLogger(__name__)

# gRPC status -> (HTTP status, OpenAI error type)
HTTP_OF_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: (400, "invalid_request_error"),
    grpc.StatusCode.OUT_OF_RANGE: (400, "invalid_request_error"),
    grpc.StatusCode.UNAUTHENTICATED: (401, "authentication_error"),
    grpc.StatusCode.PERMISSION_DENIED: (403, "permission_error"),
    grpc.StatusCode.NOT_FOUND: (404, "not_found_error"),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (429, "rate_limit_error"),
    grpc.StatusCode.CANCELLED: (499, "cancelled"),
    grpc.StatusCode.UNAVAILABLE: (503, "service_unavailable"),
    grpc.StatusCode.DEADLINE_EXCEEDED: (504, "timeout"),
}
FINISH_REASONS = {pb.FINISH_REASON_STOP: "stop", pb.FINISH_REASON_LENGTH: "length"}
# body field -> SamplingParams field, for the plain numbers and flags both endpoints share
SAMPLING_FIELDS = {
    "temperature": float, "top_p": float, "top_k": int, "min_p": float, "seed": int,
    "presence_penalty": float, "frequency_penalty": float, "repetition_penalty": float,
    "min_tokens": int, "ignore_eos": bool,
}
# accepted only at their default: anything else is refused rather than ignored
UNSUPPORTED = {"best_of": 1, "echo": False, "suffix": None, "tools": None,
               "tool_choice": None, "functions": None, "function_call": None}
MAX_CHOICES = 16  # `n`: each choice is an engine request of its own


class BadRequest(Exception):
    """A body that cannot become a GenerateRequest: HTTP 400 naming the field."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


# --- HTTP body -> GenerateRequest ---------------------------------------------------------


def generate_request(body: Any, chat: bool,
                     request_id: str) -> tuple[list[pb.GenerateRequest], bool, bool]:
    """The gRPC requests for a completions (or, with `chat`, chat completions) body, one per
    choice (`n`), whether they are to be streamed, and whether the stream ends with the
    usage (`stream_options.include_usage`)."""
    if not isinstance(body, dict):
        raise BadRequest("the body must be a JSON object")
    for name, default in UNSUPPORTED.items():
        if body.get(name, default) not in (default, None):
            raise BadRequest(f"{name}: not supported (only {json.dumps(default)})", name)
    response_format = body.get("response_format")
    if response_format not in (None, {"type": "text"}):
        raise BadRequest("response_format: only {\"type\": \"text\"} is supported",
                         "response_format")
    request = pb.GenerateRequest(request_id=request_id,
                                 priority=_typed(body, "priority", int, 0))
    if chat:
        request.messages.CopyFrom(_messages(body.get("messages")))
        request.messages.continue_final_message = _typed(body, "continue_final_message", bool,
                                                         False)
    else:
        _prompt(body.get("prompt"), request)
    request.sampling.CopyFrom(_sampling(body, chat))
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise BadRequest("stream_options: must be an object", "stream_options")
    return (_choices(request, _typed(body, "n", int, 1)), _typed(body, "stream", bool, False),
            bool(options.get("include_usage")))


def _choices(request: pb.GenerateRequest, n: int) -> list[pb.GenerateRequest]:
    """`n` copies of `request`, the i-th with request id `<id>-<i>` and, when seeded, seed
    `seed + i` (so that each choice is what a request of its own with that seed gives)."""
    if not 1 <= n <= MAX_CHOICES:
        raise BadRequest(f"n: must be in [1, {MAX_CHOICES}], got {n}", "n")
    if n == 1:
        return [request]
    out = []
    for i in range(n):
        choice = pb.GenerateRequest()
        choice.CopyFrom(request)
        choice.request_id = f"{request.request_id}-{i}"
        if request.sampling.HasField("seed"):
            choice.sampling.seed = (request.sampling.seed + i) % (1 << 64)
        out.append(choice)
    return out


def _typed(body: dict, name: str, kind: type, default: Any = None) -> Any:
    value = body.get(name)
    if value is None:
        return default
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
        raise BadRequest(f"{name}: expected {_KIND_NAMES[kind]}, got {json.dumps(value)}", name)
    return value


_KIND_NAMES = {float: "a number", int: "an integer", bool: "true or false", str: "a string",
               list: "an array", dict: "an object"}


def _prompt(prompt: Any, request: pb.GenerateRequest) -> None:
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str):
        request.text = prompt
    elif isinstance(prompt, list) and prompt and all(
            isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        request.token_ids.ids.extend(prompt)
    elif isinstance(prompt, list) and len(prompt) > 1:
        raise BadRequest("prompt: one prompt per request (send several requests)", "prompt")
    else:
        raise BadRequest("prompt: expected a string or an array of token ids", "prompt")


def _messages(messages: Any) -> pb.ChatMessages:
    if not isinstance(messages, list) or not messages:
        raise BadRequest("messages: expected a non-empty array", "messages")
    out = pb.ChatMessages()
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise BadRequest(f"messages[{i}]: expected an object with a role", "messages")
        out.messages.add(role=message["role"], content=_content(message.get("content"), i))
    return out


def _content(content: Any, i: int) -> str:
    """A message's content: a string, or text parts joined."""
    if content is None or isinstance(content, str):
        return content or ""
    if isinstance(content, list):
        texts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(
                    part.get("text"), str):
                raise BadRequest(f"messages[{i}].content: only text parts are supported",
                                 "messages")
            texts.append(part["text"])
        return "".join(texts)
    raise BadRequest(f"messages[{i}].content: expected a string or an array of text parts",
                     "messages")


def _sampling(body: dict, chat: bool) -> pb.SamplingParams:
    s = pb.SamplingParams()
    max_tokens = _typed(body, "max_completion_tokens", int) if chat else None
    if max_tokens is None:
        max_tokens = _typed(body, "max_tokens", int)
    if max_tokens is not None:
        if max_tokens < 1:
            raise BadRequest(f"max_tokens: must be at least 1, got {max_tokens}", "max_tokens")
        s.max_tokens = max_tokens
    for name, kind in SAMPLING_FIELDS.items():
        value = _typed(body, name, kind)
        if value is not None:
            if name == "seed" and value < 0:
                raise BadRequest(f"seed: must be >= 0, got {value}", "seed")
            setattr(s, name, value)
    stop = body.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    if stop is not None:
        if not isinstance(stop, list) or not all(isinstance(x, str) for x in stop):
            raise BadRequest("stop: expected a string or an array of strings", "stop")
        s.stop.extend(stop)
    stop_ids = _typed(body, "stop_token_ids", list, [])
    if not all(isinstance(t, int) and not isinstance(t, bool) for t in stop_ids):
        raise BadRequest("stop_token_ids: expected an array of integers", "stop_token_ids")
    s.stop_token_ids.extend(stop_ids)
    for key, bias in _typed(body, "logit_bias", dict, {}).items():
        try:
            s.logit_bias[int(key)] = float(bias)
        except (TypeError, ValueError):
            raise BadRequest(f"logit_bias: expected token id -> number, got "
                             f"{json.dumps(key)}: {json.dumps(bias)}", "logit_bias") from None
    if chat:
        s.logprobs = _typed(body, "logprobs", bool, False)
        s.top_logprobs = _typed(body, "top_logprobs", int, 0)
        if s.top_logprobs and not s.logprobs:
            raise BadRequest("top_logprobs: needs logprobs true", "top_logprobs")
    else:  # completions: logprobs is the number of alternatives
        logprobs = _typed(body, "logprobs", int)
        if logprobs is not None:
            s.logprobs, s.top_logprobs = True, logprobs
    if s.top_logprobs < 0:
        raise BadRequest(f"top_logprobs: must be >= 0, got {s.top_logprobs}", "logprobs")
    return s


# --- responses -> OpenAI JSON -------------------------------------------------------------


def token_name(lp: Any) -> str:
    """How OpenAI's logprobs name a token: its text, from the engine (`token_id:<id>` from an
    engine that sends none)."""
    return lp.token or f"token_id:{lp.token_id}"


def token_bytes(lp: Any) -> list[int] | None:
    return list(lp.token.encode()) if lp.token else None


def logprobs_json(logprobs: Any, chat: bool, text_offset: int = 0) -> dict | None:
    """The `logprobs` of a choice (chat: `content` entries; completions: the legacy
    parallel arrays)."""
    if not logprobs:
        return None
    if chat:
        return {"content": [{"token": token_name(lp), "logprob": lp.logprob,
                             "bytes": token_bytes(lp),
                             "top_logprobs": [{"token": token_name(t), "logprob": t.logprob,
                                               "bytes": token_bytes(t)}
                                              for t in lp.top]} for lp in logprobs]}
    return {"tokens": [token_name(lp) for lp in logprobs],
            "token_logprobs": [lp.logprob for lp in logprobs],
            "top_logprobs": [{token_name(t): t.logprob for t in lp.top} for lp in logprobs],
            "text_offset": [text_offset] * len(logprobs)}


def total_usage(usages: list[pb.Usage]) -> pb.Usage:
    """The usage of a request's choices together: its prompt once (as OpenAI counts it) and
    every choice's completion."""
    return pb.Usage(prompt_tokens=usages[0].prompt_tokens,
                    cached_prompt_tokens=usages[0].cached_prompt_tokens,
                    completion_tokens=sum(u.completion_tokens for u in usages))


def usage_json(usage: pb.Usage) -> dict:
    return {"prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens,
            "total_tokens": usage.prompt_tokens + usage.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": usage.cached_prompt_tokens}}


class Completion:
    """The ids and the envelope of one HTTP completion, and its JSON shapes."""

    def __init__(self, chat: bool, model: str, request_id: str,
                 token_ids: bool = False) -> None:
        self.chat, self.model, self.token_ids = chat, model, token_ids
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{request_id}"
        self.created = int(time.time())

    def envelope(self, chunk: bool, **fields: Any) -> dict:
        kind = ("chat.completion.chunk" if chunk else "chat.completion") if self.chat \
            else "text_completion"
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model,
                **fields}

    def whole(self, responses: list[pb.GenerateResponse]) -> dict:
        """The completion of every choice, `responses[i]` being choice i."""
        choices = []
        for index, response in enumerate(responses):
            choice: dict[str, Any] = {
                "index": index, "finish_reason": FINISH_REASONS.get(response.finish_reason),
                "logprobs": logprobs_json(response.logprobs, self.chat)}
            if self.chat:
                choice["message"] = {"role": "assistant", "content": response.text}
            else:
                choice["text"] = response.text
            if self.token_ids:
                choice["token_ids"] = list(response.token_ids)
            choices.append(choice)
        usage = total_usage([r.usage for r in responses])
        return self.envelope(False, choices=choices, usage=usage_json(usage))

    def chunk(self, msg: pb.GenerateStreamResponse, first: bool, offset: int,
              index: int = 0) -> dict:
        """Choice `index`'s next delta; `first` for its first, `offset` the length of the
        text it streamed before."""
        choice: dict[str, Any] = {"index": index,
                                  "finish_reason": FINISH_REASONS.get(msg.finish_reason),
                                  "logprobs": logprobs_json(msg.logprobs, self.chat, offset)}
        if self.chat:
            delta = {"role": "assistant"} if first else {}
            if msg.text or first:
                delta["content"] = msg.text
            choice["delta"] = delta
        else:
            choice["text"] = msg.text
        if self.token_ids:
            choice["token_ids"] = list(msg.token_ids)
        return self.envelope(True, choices=[choice])

    def usage_chunk(self, usage: pb.Usage) -> dict:
        return self.envelope(True, choices=[], usage=usage_json(usage))


def error_json(message: str, kind: str, param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def http_error(status: int, message: str, kind: str, param: str | None = None,
               code: str | None = None) -> web.Response:
    return web.json_response(error_json(message, kind, param, code), status=status)


def rpc_error_json(error: grpc.aio.AioRpcError) -> tuple[int, dict]:
    """The HTTP status and the OpenAI error body of a failed gRPC call."""
    status, kind = HTTP_OF_STATUS.get(error.code(), (500, "server_error"))
    return status, error_json(error.details() or error.code().name, kind,
                              code=error.code().name)


def rpc_error_response(error: grpc.aio.AioRpcError) -> web.Response:
    status, body = rpc_error_json(error)
    return web.json_response(body, status=status)


# --- the server ----------------------------------------------------------------------------


class OpenAIApi:
    """The aiohttp application, calling the gateway's gRPC service at `target` (a Unix
    socket of the same process)."""

    def __init__(self, target: str, max_request_bytes: int, max_response_bytes: int) -> None:
        self._channel = grpc.aio.insecure_channel(target, options=[
            ("grpc.max_send_message_length", max_request_bytes),
            ("grpc.max_receive_message_length", max_response_bytes)])
        self._stub = generation_pb2_grpc.GenerationStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)
        self._model: str | None = None
        self.app = web.Application(client_max_size=max_request_bytes)
        self.app.add_routes([
            web.post("/v1/completions", self._completions),
            web.post("/v1/chat/completions", self._chat_completions),
            web.get("/v1/models", self._models),
            web.get("/v1/models/{model}", self._models),
            web.post("/tokenize", self._tokenize),
            web.get("/health", self._health_check),
        ])
        self._runner: web.AppRunner | None = None
        self.port: int | None = None

    async def start(self, host: str, port: int, tls: TlsConfig | None) -> int:
        self._runner = web.AppRunner(self.app, handler_cancellation=True, access_log=None,
                                     shutdown_timeout=1.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port, ssl_context=_ssl_context(tls),
                           reuse_port=False)
        try:
            await site.start()
        except OSError:
            await self._runner.cleanup()
            self._runner = None
            raise
        self.port = self._runner.addresses[0][1]
        return self.port

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        await self._channel.close()

    # --- handlers ---
    async def _completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, chat=False)

    async def _chat_completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, chat=True)

    async def _generate(self, request: web.Request, chat: bool) -> web.StreamResponse:
        request_id = request.headers.get("X-Request-Id") or uuid.uuid4().hex
        metadata = _metadata(request)
        body = await _json_body(request)
        if isinstance(body, web.Response):
            return body
        try:
            messages, stream, include_usage = generate_request(body, chat, request_id)
            token_ids = _typed(body, "return_token_ids", bool, False)
            model = await self._check_model(body.get("model"), metadata)
        except BadRequest as exc:
            return http_error(400, str(exc), "invalid_request_error", exc.param)
        except _ModelNotServed as exc:
            return http_error(404, str(exc), "not_found_error", "model", "model_not_found")
        except grpc.aio.AioRpcError as exc:
            return rpc_error_response(exc)
        completion = Completion(chat, model, request_id, token_ids)
        headers = {"X-Request-Id": request_id}
        if not stream:
            try:
                responses = await _gather(
                    [self._stub.Generate(m, metadata=metadata) for m in messages])
            except grpc.aio.AioRpcError as exc:
                return rpc_error_response(exc)
            return web.json_response(completion.whole(responses), headers=headers)
        return await self._stream(request, messages, metadata, completion, include_usage,
                                  headers)

    async def _stream(self, request: web.Request, messages: list[pb.GenerateRequest],
                      metadata: tuple, completion: Completion, include_usage: bool,
                      headers: dict) -> web.StreamResponse:
        calls = [self._stub.GenerateStream(m, metadata=metadata) for m in messages]
        events = _events(calls, completion, include_usage)
        try:
            try:  # the first event before the headers: an early error keeps its status
                first = await anext(events)
            except grpc.aio.AioRpcError as exc:
                return rpc_error_response(exc)
            response = web.StreamResponse(headers={
                **headers, "Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
            await response.prepare(request)
            await response.write(_sse(first))
            try:
                async for event in events:
                    await response.write(_sse(event))
            except grpc.aio.AioRpcError as exc:  # after the headers: an error event
                await response.write(_sse(rpc_error_json(exc)[1]))
            await response.write(b"data: [DONE]\n\n")
            await response.write_eof()
            return response
        finally:
            await events.aclose()
            for call in calls:
                call.cancel()  # a no-op once it ended; stops the generation of a gone client

    async def _models(self, request: web.Request) -> web.Response:
        """`GET /v1/models`: the list of the one model served; `/v1/models/{model}`: its
        card, or 404 for another."""
        try:
            info = await self._stub.GetModelInfo(pb.GetModelInfoRequest(),
                                                 metadata=_metadata(request))
        except grpc.aio.AioRpcError as exc:
            return rpc_error_response(exc)
        self._model = info.model
        wanted = request.match_info.get("model")
        if wanted is None:
            return web.json_response({"object": "list", "data": [_card(info)]})
        if wanted != info.model:
            return http_error(404, f"model {json.dumps(wanted)} is not served here (GET "
                              "/v1/models)", "not_found_error", "model", "model_not_found")
        return web.json_response(_card(info))

    async def _tokenize(self, request: web.Request) -> web.Response:
        """`{"prompt": "..."}` or `{"messages": [...]}` (chat template applied, and
        `continue_final_message`): `{"tokens": [ids], "count", "max_model_len"}`."""
        metadata = _metadata(request)
        body = await _json_body(request)
        if isinstance(body, web.Response):
            return body
        try:
            if not isinstance(body, dict):
                raise BadRequest("the body must be a JSON object")
            if "messages" in body:
                message = pb.TokenizeRequest(messages=_messages(body["messages"]))
                message.messages.continue_final_message = _typed(
                    body, "continue_final_message", bool, False)
            else:
                message = pb.TokenizeRequest(text=_typed(body, "prompt", str, ""))
            info = await self._stub.GetModelInfo(pb.GetModelInfoRequest(), metadata=metadata)
            reply = await self._stub.Tokenize(message, metadata=metadata)
        except BadRequest as exc:
            return http_error(400, str(exc), "invalid_request_error", exc.param)
        except grpc.aio.AioRpcError as exc:
            return rpc_error_response(exc)
        return web.json_response({"tokens": list(reply.token_ids), "count": len(reply.token_ids),
                                  "max_model_len": info.max_context_tokens})

    async def _health_check(self, request: web.Request) -> web.Response:
        try:
            reply = await self._health.Check(health_pb2.HealthCheckRequest(service=""))
        except grpc.aio.AioRpcError as exc:
            return rpc_error_response(exc)
        name = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
        return web.json_response({"status": name},
                                 status=200 if name == "SERVING" else 503)

    async def _check_model(self, model: Any, metadata: tuple) -> str:
        """The served model's name; `_ModelNotServed` when the body names another."""
        if self._model is None:
            info = await self._stub.GetModelInfo(pb.GetModelInfoRequest(), metadata=metadata)
            self._model = info.model
        if model not in (None, "", self._model):
            raise _ModelNotServed(f"model {json.dumps(model)} is not served here; this server "
                                  f"serves {json.dumps(self._model)} (GET /v1/models)")
        return self._model


class _ModelNotServed(Exception):
    pass


def _card(info: pb.ModelInfo) -> dict:
    return {"id": info.model, "object": "model", "created": 0, "owned_by": "tandem",
            "max_model_len": info.max_context_tokens}


async def _gather(calls: list) -> list:
    """The responses of unary calls already under way, in order; the first error cancels
    the others and is raised."""
    tasks = [asyncio.ensure_future(call) for call in calls]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        return [task.result() for task in tasks]  # raises the first error in choice order
    finally:
        for call, task in zip(calls, tasks, strict=True):
            call.cancel()
            task.add_done_callback(_retrieved)  # the other choices' errors: nobody's to report


def _retrieved(task: asyncio.Future) -> None:
    if not task.cancelled():
        task.exception()


async def _events(calls: list, completion: Completion,
                  include_usage: bool) -> AsyncIterator[dict]:
    """The chunks of the choices' streams (`calls[i]`: choice i) as OpenAI JSON, in the order
    they come, then the usage chunk if asked for."""
    first, offsets = [True] * len(calls), [0] * len(calls)
    usages: list[pb.Usage | None] = [None] * len(calls)
    async for index, msg in _merge(calls):
        yield completion.chunk(msg, first[index], offsets[index], index)
        first[index], offsets[index] = False, offsets[index] + len(msg.text)
        if msg.HasField("usage"):
            usages[index] = msg.usage
    if include_usage and None not in usages:
        yield completion.usage_chunk(total_usage(usages))


async def _merge(calls: list) -> AsyncIterator[tuple[int, Any]]:
    """(i, message) for the messages of streaming calls, as they come; the first error of any
    call is raised at once (the caller cancels the others)."""
    if len(calls) == 1:  # no task nor queue in between: gRPC's flow control reaches the client
        async for msg in calls[0]:
            yield 0, msg
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(index: int, call: Any) -> None:
        try:
            async for msg in call:
                queue.put_nowait((index, msg))
        except grpc.aio.AioRpcError as exc:
            queue.put_nowait((index, exc))
        else:
            queue.put_nowait((index, None))

    tasks = [asyncio.create_task(pump(i, call)) for i, call in enumerate(calls)]
    try:
        left = len(calls)
        while left:
            index, item = await queue.get()
            if item is None:
                left -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield index, item
    finally:
        for task in tasks:
            task.cancel()


async def _json_body(request: web.Request) -> Any:
    """The request's JSON body, or the error response to send instead."""
    try:
        return await request.json()
    except (ValueError, UnicodeDecodeError):
        return http_error(400, "the body is not valid JSON", "invalid_request_error")
    except web.HTTPRequestEntityTooLarge:
        return http_error(413, f"the body is over {request.client_max_size} bytes "
                          "(--max-request-bytes)", "invalid_request_error")


def _sse(event: dict) -> bytes:
    return f"data: {json.dumps(event, separators=(',', ':'))}\n\n".encode()


def _metadata(request: web.Request) -> tuple:
    auth = request.headers.get("Authorization")
    return (("authorization", auth),) if auth else ()


def _ssl_context(tls: TlsConfig | None) -> ssl.SSLContext | None:
    """HTTPS with the gRPC port's certificate (and client CA) when it has TLS."""
    if tls is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(tls.cert_file, tls.key_file)
    if tls.client_ca_file:
        context.load_verify_locations(tls.client_ca_file)
        context.verify_mode = ssl.CERT_REQUIRED
    return context
