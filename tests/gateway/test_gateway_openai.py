"""The OpenAI-compatible HTTP API: body translation, and a gateway with --http-listen in front
of a fake engine (responses, streams, errors, API keys, cancellation)."""

from __future__ import annotations

import json
import ssl

import grpc
import pytest

aiohttp = pytest.importorskip("aiohttp")

from gateway_certs import make_certs  # noqa: E402
from gateway_fakes import gateway_with_engine, run, wait_until  # noqa: E402

from gateway.__main__ import config_from_args  # noqa: E402
from gateway.config import TlsConfig  # noqa: E402
from gateway.openai_api import BadRequest, generate_request  # noqa: E402

pytestmark = pytest.mark.timeout(60)

CHAT = {"messages": [{"role": "user", "content": "Hi"}]}


def test_a_completions_body_becomes_the_request():
    (request,), stream, include_usage = generate_request({
        "model": "m", "prompt": "Once", "stream": True, "max_tokens": 7, "temperature": 0,
        "top_p": 0.5, "seed": 3, "stop": "END", "presence_penalty": 0.5, "frequency_penalty": -0.5,
        "logit_bias": {"42": -100, "7": 2}, "logprobs": 2, "top_k": 4, "min_p": 0.1,
        "repetition_penalty": 1.1, "min_tokens": 2, "ignore_eos": True,
        "stop_token_ids": [5], "priority": 3, "user": "ignored",
        "stream_options": {"include_usage": True}}, chat=False, request_id="r1")
    assert request.text == "Once" and request.request_id == "r1" and request.priority == 3
    s = request.sampling
    assert s.HasField("temperature") and s.temperature == 0
    assert (s.max_tokens, s.top_p, s.seed, list(s.stop), s.presence_penalty,
            s.frequency_penalty, s.logprobs, s.top_logprobs, s.top_k, s.min_tokens,
            s.ignore_eos, list(s.stop_token_ids)) == (7, 0.5, 3, ["END"], 0.5, -0.5, True, 2, 4,
                                                      2, True, [5])
    assert dict(s.logit_bias) == {42: -100.0, 7: 2.0}
    assert s.min_p == pytest.approx(0.1) and s.repetition_penalty == pytest.approx(1.1)
    assert stream and include_usage
    (unset,), _, _ = generate_request({"prompt": [[1, 2, 3]]}, chat=False, request_id="r2")
    assert list(unset.token_ids.ids) == [1, 2, 3]
    assert not unset.sampling.HasField("temperature") and unset.sampling.max_tokens == 0


def test_a_chat_body_becomes_the_request():
    (request,), stream, include_usage = generate_request({
        "messages": [{"role": "system", "content": "Be brief."},
                     {"role": "user", "content": [{"type": "text", "text": "Hi "},
                                                  {"type": "text", "text": "there"}]}],
        "max_tokens": 9, "max_completion_tokens": 5, "logprobs": True, "top_logprobs": 3,
        "continue_final_message": True}, chat=True, request_id="r")
    assert [(m.role, m.content) for m in request.messages.messages] == [
        ("system", "Be brief."), ("user", "Hi there")]
    assert (request.sampling.max_tokens, request.sampling.logprobs,
            request.sampling.top_logprobs) == (5, True, 3)  # max_completion_tokens wins
    assert request.messages.continue_final_message
    assert not stream and not include_usage


@pytest.mark.parametrize("body, chat, param", [
    ([], False, None),
    ({"prompt": ["a", "b"]}, False, "prompt"),
    ({"prompt": 5}, False, "prompt"),
    ({"prompt": "a", "n": 0}, False, "n"),
    ({"prompt": "a", "n": 17}, False, "n"),
    ({"prompt": "a", "n": 2.0}, False, "n"),
    ({"prompt": "a", "best_of": 2}, False, "best_of"),
    ({"prompt": "a", "echo": True}, False, "echo"),
    ({"prompt": "a", "temperature": "hot"}, False, "temperature"),
    ({"prompt": "a", "max_tokens": True}, False, "max_tokens"),
    ({"prompt": "a", "max_tokens": 0}, False, "max_tokens"),
    ({"prompt": "a", "stream": "yes"}, False, "stream"),
    ({"prompt": "a", "seed": -1}, False, "seed"),
    ({"prompt": "a", "stop": [1]}, False, "stop"),
    ({"prompt": "a", "logit_bias": {"x": 1}}, False, "logit_bias"),
    ({"messages": []}, True, "messages"),
    ({"messages": [{"content": "no role"}]}, True, "messages"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, True, "messages"),
    ({**CHAT, "top_logprobs": 2}, True, "top_logprobs"),
    ({**CHAT, "tools": [{"type": "function"}]}, True, "tools"),
    ({**CHAT, "response_format": {"type": "json_object"}}, True, "response_format"),
])
def test_bodies_it_cannot_serve_are_refused_naming_the_field(body, chat, param):
    with pytest.raises(BadRequest) as caught:
        generate_request(body, chat, "r")
    assert caught.value.param == param


def test_n_choices_are_n_requests_seeded_apart():
    requests, _, _ = generate_request({"prompt": "a", "n": 3, "seed": 2**64 - 2,
                                       "temperature": 0.5}, chat=False, request_id="r")
    assert [r.request_id for r in requests] == ["r-0", "r-1", "r-2"]
    assert [r.sampling.seed for r in requests] == [2**64 - 2, 2**64 - 1, 0]
    assert {(r.text, r.sampling.temperature) for r in requests} == {("a", 0.5)}
    unseeded, _, _ = generate_request({**CHAT, "n": 2}, chat=True, request_id="r")
    assert not any(r.sampling.HasField("seed") for r in unseeded)


def test_the_flag_is_checked():
    config, _ = config_from_args(["--http-listen", "[::]:8000"])
    assert config.http_listen == "[::]:8000"
    with pytest.raises(SystemExit):
        config_from_args(["--http-listen", "8000"])


async def http(**overrides):
    """A gateway with the HTTP API on a free port, its base URL and an HTTP session."""
    context = gateway_with_engine(http_listen="127.0.0.1:0", **overrides)
    server, client, engine = await context.__aenter__()
    session = aiohttp.ClientSession(f"http://127.0.0.1:{server.http_port}")

    async def close():
        await session.close()
        await context.__aexit__(None, None, None)
    session.port = server.http_port
    return session, engine.engine, close


def events(text: str) -> list:
    """The server-sent events of a stream, the JSON ones parsed."""
    out = []
    for block in text.split("\n\n"):
        if block:
            assert block.startswith("data: ")
            data = block.removeprefix("data: ")
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


def test_chat_completion_models_and_health():
    async def body():
        session, engine, close = await http()
        try:
            r = await session.post("/v1/chat/completions", json={
                **CHAT, "model": "fake-model", "logprobs": True}, headers={"X-Request-Id": "abc"})
            out = await r.json()
            assert r.status == 200 and r.headers["X-Request-Id"] == "abc"
            assert out["id"] == "chatcmpl-abc" and out["object"] == "chat.completion"
            assert out["model"] == "fake-model"
            (choice,) = out["choices"]
            assert choice["message"] == {"role": "assistant", "content": "Hello world"}
            assert choice["finish_reason"] == "stop"
            content = choice["logprobs"]["content"]  # named by their text, else by id
            assert [c["token"] for c in content] == [
                "Hel", "token_id:12", "token_id:13", "token_id:14"]
            assert (content[0]["bytes"], content[1]["bytes"]) == ([72, 101, 108], None)
            assert [t["token"] for t in content[0]["top_logprobs"]] == ["Hel", "token_id:9"]
            assert out["usage"] == {"prompt_tokens": 5, "completion_tokens": 4,
                                    "total_tokens": 9, "prompt_tokens_details": {
                                        "cached_tokens": 0}}
            sent = engine.requests[-1].request
            assert [(m.role, m.content) for m in sent.messages.messages] == [("user", "Hi")]
            assert sent.request_id == "abc" and sent.sampling.logprobs
            r = await session.get("/v1/models")
            assert (await r.json())["data"][0]["id"] == "fake-model"
            r = await session.get("/health")
            assert (r.status, await r.json()) == (200, {"status": "SERVING"})
        finally:
            await close()
    run(body())


def test_tokenize_and_the_model_card():
    async def body():
        session, engine, close = await http()
        try:
            r = await session.post("/tokenize", json={"prompt": "hello"})
            assert (r.status, await r.json()) == (200, {"tokens": [7, 8], "count": 2,
                                                        "max_model_len": 2048})
            assert engine.tokenize_requests[-1].text == "hello"
            r = await session.post("/tokenize", json={
                "messages": [{"role": "assistant", "content": "{"}],
                "continue_final_message": True})
            sent = engine.tokenize_requests[-1].messages
            assert r.status == 200 and sent.continue_final_message
            assert [(m.role, m.content) for m in sent.messages] == [("assistant", "{")]
            r = await session.post("/tokenize", json={"prompt": 5})
            assert r.status == 400 and (await r.json())["error"]["param"] == "prompt"
            r = await session.post("/tokenize", data="{nope")
            assert r.status == 400
            r = await session.get("/v1/models/fake-model")
            assert (await r.json())["id"] == "fake-model"
            r = await session.get("/v1/models/gpt-4")
            assert r.status == 404 and (await r.json())["error"]["code"] == "model_not_found"
        finally:
            await close()
    run(body())


def test_streams_are_server_sent_events_that_concatenate_to_the_text():
    async def body():
        session, _, close = await http()
        try:
            r = await session.post("/v1/chat/completions", json={
                **CHAT, "stream": True, "stream_options": {"include_usage": True}})
            assert r.status == 200 and r.headers["Content-Type"] == "text/event-stream"
            chat = events(await r.text())
            assert chat[-1] == "[DONE]" and chat[-2]["choices"] == []
            assert chat[-2]["usage"]["completion_tokens"] == 4
            chunks = chat[:-2]
            assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
            assert {c["object"] for c in chunks} == {"chat.completion.chunk"}
            assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == \
                "Hello world"
            assert [c["choices"][0]["finish_reason"] for c in chunks][-1] == "stop"
            assert len({c["id"] for c in chunks}) == 1
            r = await session.post("/v1/completions", json={"prompt": "Hi", "stream": True,
                                                             "return_token_ids": True})
            plain = events(await r.text())
            assert plain[-1] == "[DONE]" and "usage" not in plain[-2]
            assert "".join(c["choices"][0]["text"] for c in plain[:-1]) == "Hello world"
            assert [c["choices"][0]["token_ids"] for c in plain[:-1]] == [[11], [12, 13], [14]]
            assert "token_ids" not in chunks[0]["choices"][0]  # only when asked for
        finally:
            await close()
    run(body())


def test_errors_have_the_http_status_of_their_grpc_code():
    async def body():
        session, engine, close = await http()
        try:
            async def status(path, body, **kw):
                r = await session.post(path, **({"data": body} if isinstance(body, str)
                                                else {"json": body}), **kw)
                return r.status, (await r.json())["error"]

            code, error = await status("/v1/completions", {"prompt": "a", "top_p": 2})
            assert (code, error["type"], error["code"]) == (400, "invalid_request_error",
                                                            "INVALID_ARGUMENT")
            assert "top_p" in error["message"]
            code, error = await status("/v1/completions", {"prompt": "a",
                                                           "return_token_ids": "yes"})
            assert (code, error["param"]) == (400, "return_token_ids")
            code, error = await status("/v1/completions", "{not json")
            assert code == 400 and "JSON" in error["message"]
            code, error = await status("/v1/completions", {"prompt": "a" * (5 << 20)})
            assert code == 413 and "--max-request-bytes" in error["message"]
            code, error = await status("/v1/completions", {"prompt": "a", "model": "gpt-4"})
            assert (code, error["code"]) == (404, "model_not_found")
            engine.error = (grpc.StatusCode.RESOURCE_EXHAUSTED, "the engine's queue is full")
            code, error = await status("/v1/completions", {"prompt": "a"})
            assert (code, error["message"]) == (429, "the engine's queue is full")
            engine.error = (grpc.StatusCode.UNAVAILABLE, "engine down")
            code, _ = await status("/v1/chat/completions", {**CHAT, "stream": True})
            assert code == 503  # an error before the first event keeps its status
        finally:
            await close()
    run(body())


def test_api_keys_apply_to_http_too():
    async def body():
        session, _, close = await http(api_keys=("k1-secret-0123",))
        try:
            r = await session.post("/v1/completions", json={"prompt": "a"})
            assert r.status == 401
            r = await session.get("/v1/models")
            assert r.status == 401
            r = await session.post("/v1/completions", json={"prompt": "a"},
                                   headers={"Authorization": "Bearer k1-secret-0123"})
            assert r.status == 200 and (await r.json())["choices"][0]["text"] == "Hello world"
        finally:
            await close()
    run(body())


def test_with_mutual_tls_the_http_port_serves_https_to_trusted_clients_only(tmp_path):
    certs = make_certs(tmp_path)

    async def body():
        tls = TlsConfig(str(certs.server_cert), str(certs.server_key), str(certs.ca))
        credentials = grpc.ssl_channel_credentials(
            certs.ca.read_bytes(), certs.client_key.read_bytes(), certs.client_cert.read_bytes())
        async with gateway_with_engine(tls=tls, credentials=credentials,
                                       http_listen="127.0.0.1:0") as (server, _, _):
            url = f"https://localhost:{server.http_port}/v1/completions"
            trusted = ssl.create_default_context(cafile=str(certs.ca))
            trusted.load_cert_chain(str(certs.client_cert), str(certs.client_key))
            async with aiohttp.ClientSession() as session:
                r = await session.post(url, json={"prompt": "a"}, ssl=trusted)
                assert r.status == 200 and (await r.json())["choices"][0]["text"] == \
                    "Hello world"
                anonymous = ssl.create_default_context(cafile=str(certs.ca))
                with pytest.raises(aiohttp.ClientError):
                    r = await session.post(url, json={"prompt": "a"}, ssl=anonymous)
                    await r.read()
    run(body())


@pytest.mark.parametrize("n", [1, 2])
def test_a_client_that_disconnects_cancels_its_generation(n):
    async def body():
        session, engine, close = await http()
        engine.hang = True  # streams all but the last chunk, then waits
        try:
            r = await session.post("/v1/completions",
                                   json={"prompt": "a", "stream": True, "n": n})
            assert (await r.content.readuntil(b"\n\n")).startswith(b"data: ")
            await wait_until(lambda: engine.num_active == n)
            r.close()
            await wait_until(lambda: engine.num_cancelled == n)  # every choice
            assert engine.num_active == 0
        finally:
            await close()
    run(body())


def test_an_address_in_use_is_a_clear_start_error():
    async def body():
        session, _, close = await http()
        try:
            with pytest.raises(RuntimeError, match="cannot listen on 127.0.0.1"):
                async with gateway_with_engine(http_listen=f"127.0.0.1:{session.port}"):
                    pass
        finally:
            await close()
    run(body())


def test_n_choices_come_back_together_and_streamed_by_index():
    async def body():
        session, engine, close = await http()
        try:
            r = await session.post("/v1/completions", json={"prompt": "a", "n": 3},
                                   headers={"X-Request-Id": "abc"})
            out = await r.json()
            assert r.status == 200 and out["id"] == "cmpl-abc"
            assert [(c["index"], c["text"]) for c in out["choices"]] == [
                (0, "Hello world"), (1, "Hello world"), (2, "Hello world")]
            assert (out["usage"]["prompt_tokens"], out["usage"]["completion_tokens"]) == (5, 12)
            assert sorted(e.request.request_id for e in engine.requests) == [
                "abc-0", "abc-1", "abc-2"]
            r = await session.post("/v1/chat/completions", json={
                **CHAT, "n": 2, "stream": True, "stream_options": {"include_usage": True}})
            chat = events(await r.text())
            assert chat[-1] == "[DONE]" and chat[-2]["usage"]["completion_tokens"] == 8
            for index in (0, 1):
                deltas = [c["choices"][0] for c in chat[:-2]
                          if c["choices"][0]["index"] == index]
                assert deltas[0]["delta"]["role"] == "assistant"
                assert "".join(d["delta"].get("content", "") for d in deltas) == "Hello world"
                assert deltas[-1]["finish_reason"] == "stop"
            engine.error = (grpc.StatusCode.RESOURCE_EXHAUSTED, "the engine's queue is full")
            r = await session.post("/v1/completions", json={"prompt": "a", "n": 2})
            assert r.status == 429
        finally:
            await close()
    run(body())
